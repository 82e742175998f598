"""The four model families of the residency benchmark, architecture-true with random weights, and their disk tier.

Full size (GPU): an nf4 (double-quant) Llama-3.1-8B-architecture LLM (~6.8 GB), an SD1.5-architecture fp16
UNet + VAE + CLIP text encoder (~2.1 GB), a YOLOv8s detector (fp32) and a Whisper-small-architecture model (fp16).
`--quick` builds tiny versions of the same classes so the script can be checked on a CPU.

Disk tier: each model is built once, its tensors saved to one safetensors file, and the object kept as a
weightless skeleton; `SnapshotLoader.load(device)` deep-copies the skeleton and fills it from the file
(safetensors to the device, pageable). That is faster than a real `from_pretrained` with nf4 quantisation
(7.5 s for this LLM on an H200, GPU.md), so it flatters the unload-after-use baseline, never our manager.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from studio.residency.accel import CudaAccelerator
from studio.residency.pinned import model_modules, move_down, tensor_slots

log = logging.getLogger(__name__)
GiB = 2**30


@dataclass
class Family:
    key: str
    request: Callable[[Any], None]  # one user request on the leased model (reads the model's own device)
    working_hint: int  # what a backend would pass as working_bytes for this request
    bytes: int = 0  # weights, measured at build


def _device_of(obj: Any) -> torch.device:
    return next(p for m in model_modules(obj) for p in m.parameters()).device


def _relink_bnb(obj: Any) -> None:
    """deepcopy gives a Linear4bit's module-level quant_state its own copy; point it back at the weight's."""
    for m in obj.modules():
        w = getattr(m, "weight", None)
        if getattr(w, "quant_state", None) is not None:
            w.module = m
            if hasattr(m, "quant_state"):
                m.quant_state = w.quant_state


class SnapshotLoader:
    """Loader of the residency manager backed by a safetensors file of the model's tensor slots."""

    def __init__(self, key: str, obj: Any, path: Path) -> None:
        pool = None
        if any(t.is_cuda for t in tensor_slots(obj)):  # via a pinned pool: 55 GB/s instead of 1.5 GB/s to pageable
            accel = CudaAccelerator()
            pool = move_down(obj, None, accel, accel.host_buffer).pool
        slots = tensor_slots(obj)
        self.nbytes = sum(t.numel() * t.element_size() for t in slots)
        plain = [(t.detach().clone() if t.is_inference() else t.detach()).contiguous() for t in slots]  # YOLO anchors
        save_file({f"t{i}": t for i, t in enumerate(plain)}, str(path))
        del plain
        for t in slots:  # the object becomes a weightless skeleton
            t.data = torch.empty(0, dtype=t.dtype)
        if pool is not None:
            pool.close()
        self.key, self.skeleton, self.path, self.count = key, obj, path, len(slots)
        self.loads = 0

    def estimate_bytes(self) -> int:
        return self.nbytes

    def load(self, device: str) -> Any:
        device = device if torch.cuda.is_available() else "cpu"  # --quick on a simulated card
        obj = copy.deepcopy(self.skeleton)
        _relink_bnb(obj)
        tensors = load_file(str(self.path), device=device)
        slots = tensor_slots(obj)
        if len(slots) != self.count:
            raise RuntimeError(f"{self.key}: skeleton has {len(slots)} tensors, file {self.count}")
        for i, t in enumerate(slots):
            t.data = tensors[f"t{i}"]
        self.loads += 1
        return obj

    def release(self, obj: Any) -> None:
        pass


class SDModel(torch.nn.Module):
    """UNet + VAE + text encoder of an SD1.5-architecture pipeline (what a txt2img request touches)."""

    def __init__(self, comps: dict[str, Any]) -> None:
        super().__init__()
        self.unet, self.vae, self.text_encoder = comps["unet"], comps["vae"], comps["text_encoder"]


# ---- builders: each returns (model on `device`, request function, working hint) -----------------------------------
def build_llm(device: str, quick: bool) -> tuple[Any, Callable, int]:
    from studio.bench.llm_models import LLAMA_8B, TINY, build_nf4_llama

    cfg = {**TINY, "intermediate_size": 768} if quick else LLAMA_8B  # bnb's CPU kernels need multiples of 32
    model = build_nf4_llama(cfg, device)
    if device == "cpu":  # keep bitsandbytes' CPU kernels from repacking the weights in place (--quick only)
        for m in model.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
    vocab, prompt = cfg["vocab_size"], 16 if quick else 128

    @torch.inference_mode()
    def chat(m: Any) -> None:  # prefill of a 128-token prompt: the first token of a chat answer
        ids = torch.randint(vocab, (1, prompt), device=_device_of(m))
        m(input_ids=ids, logits_to_keep=1, use_cache=False)

    return model, chat, (2 * 2**20 if quick else int(0.4 * GiB))


def build_sd(device: str, quick: bool) -> tuple[Any, Callable, int]:
    from backends.image import tiny

    if quick:
        configs = tiny.TINY_CONFIGS[sorted(tiny.TINY_CONFIGS)[0]]
        comps = tiny.build_components(configs, tokenizer=tiny.build_tokenizer(), device=device)
        size, dtype = 32, torch.float32
    else:
        comps = tiny.build_components(tiny.SD15_CONFIGS, dtype=torch.float16, device=device)
        size, dtype = 512, torch.float16
    model = SDModel(comps).eval()
    vocab = model.text_encoder.config.vocab_size
    steps = 2

    @torch.inference_mode()
    def image(m: SDModel) -> None:  # CFG text encoding, 2 UNet steps at 512x512, VAE decode
        dev = _device_of(m)
        ids = torch.randint(vocab, (2, 77), device=dev)
        cond = m.text_encoder(ids)[0]
        latents = torch.randn(2, 4, size // 8, size // 8, device=dev, dtype=dtype)
        for t in range(steps):
            latents = m.unet(latents, 999 - 400 * t, encoder_hidden_states=cond).sample
        m.vae.decode(latents[:1] / 0.18215)

    return model, image, (4 * 2**20 if quick else int(2.5 * GiB))


def build_yolo(device: str, quick: bool) -> tuple[Any, Callable, int]:
    from ultralytics import YOLO

    yolo = YOLO("yolov8n.yaml" if quick else "yolov8s.yaml")  # architecture from the packaged yaml: no download
    yolo.model.to(device).eval()
    size = 64 if quick else 640

    @torch.inference_mode()
    def detect(y: Any) -> None:
        y.model(torch.rand(1, 3, size, size, device=_device_of(y)))

    return yolo, detect, (2**20 if quick else int(0.3 * GiB))


def build_whisper(device: str, quick: bool) -> tuple[Any, Callable, int]:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    dims = (
        dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
             encoder_ffn_dim=128, decoder_ffn_dim=128, max_source_positions=100)
        if quick
        else dict(d_model=768, encoder_layers=12, decoder_layers=12, encoder_attention_heads=12,
                  decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_source_positions=1500)
    )  # fmt: skip
    cfg = WhisperConfig(vocab_size=51865, num_mel_bins=80, max_target_positions=448, **dims)
    dtype = torch.float32 if quick else torch.float16
    with torch.device(device):
        model = WhisperForConditionalGeneration(cfg).to(dtype).eval()
    frames = 2 * cfg.max_source_positions

    @torch.inference_mode()
    def transcribe(m: Any) -> None:  # a 30 s window: encoder + 32 decoder positions
        dev = _device_of(m)
        feats = torch.randn(1, 80, frames, device=dev, dtype=dtype)
        m(input_features=feats, decoder_input_ids=torch.randint(51865, (1, 32), device=dev), use_cache=False)

    return model, transcribe, (2**20 if quick else int(0.3 * GiB))


BUILDERS = {"llm": build_llm, "sd": build_sd, "yolo": build_yolo, "whisper": build_whisper}


def prepare(device: str, quick: bool, work: Path, only: list[str] | None = None) -> tuple[dict, dict, dict]:
    """Build every family, save it, keep skeletons. Returns (families, loaders, errors); a family that fails to
    build is reported and left out rather than sinking the whole run."""
    families, loaders, errors = {}, {}, {}
    work.mkdir(parents=True, exist_ok=True)
    for name, build in BUILDERS.items():
        if only and name not in only:
            continue
        try:
            torch.manual_seed(0)
            obj, request, hint = build(device, quick)
            request(obj)  # warm-up (kernels, cuDNN autotune) outside every timed strategy
            loader = SnapshotLoader(name, obj, work / f"{name}.safetensors")
            del obj
            if device == "cuda":
                torch.cuda.empty_cache()
            families[name] = Family(name, request, hint, loader.nbytes)
            loaders[name] = loader
            log.info("built %s: %.2f GB", name, loader.nbytes / GiB)
        except Exception as e:  # report and go on with the others
            log.exception("building %s failed", name)
            errors[name] = f"{type(e).__name__}: {e}"
    return families, loaders, errors
