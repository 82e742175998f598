"""The RAG models: the embedding model and the cross-encoder rerankers, as residency loaders.

Precision policy ("auto"): fp16 on CUDA; bf16 on a CPU whose oneDNN runs bf16 matrix products natively (AMX or
AVX-512 BF16); else fp32, announced once. On a CPU, bf16 and int8 run through OpenVINO when it is installed
(openvino_embed: bf16 there is ~3x PyTorch fp32 in batches of 16 and ~1.4x PyTorch bf16, vectors within cosine
0.9999 of fp32's; int8 needs NNCF too and is opt-in); without OpenVINO bf16 runs in PyTorch (2-3x fp32, cosine
0.998). fp32 always runs in PyTorch (the bench's baseline). "int8" asked for on CUDA runs fp16. A knowledge base keeps the same embedding model whatever the precision (the vectors agree to that
tolerance), so precision is not part of its identity; it is part of the residency key, so two precisions can live
side by side (the bench compares them in one process).

Rerankers: sentence-transformers `CrossEncoder` folders from the catalog (bge-reranker-base, ms-marco-MiniLM-L-6-v2,
downloaded in the Models tab), or the untrained demo cross-encoder: a one-layer BERT with random weights (fixed
seed) over the offline embedding model's vocabulary, built once into `cache_dir/rag/`. Its scores are noise: it is
there so the reranking path runs offline and in tests, and the UI labels it "untrained demo model".
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from backends.rag.openvino_embed import KINDS, openvino_available

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
DEMO_RERANKER = "tiny-random-cross-encoder"
REAL_RERANKERS = ("bge-reranker-base", "ms-marco-minilm-l6")  # "auto" picks the first one downloaded
DEMO_VERSION = 1
_announced: set[str] = set()


def cpu_has_fast_bf16() -> bool:
    """True when oneDNN runs bf16 GEMMs natively on this CPU (AMX / AVX-512 BF16)."""
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: str) -> str:
    """The dtype name "auto" stands for on `device` (see the module docstring)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: choose one of {PRECISIONS}.")
    if device.startswith("cuda"):
        return "fp16" if precision in ("auto", "int8") else precision
    if precision != "auto":
        return precision
    if cpu_has_fast_bf16():
        return "bf16"
    if "fp32" not in _announced:
        _announced.add("fp32")
        log.info("this CPU has no native bf16 (AMX/AVX-512 BF16): embeddings run in fp32")
    return "fp32"


class SentenceModelLoader:
    """Residency loader for a sentence-transformers model (SentenceTransformer or CrossEncoder) from a folder.

    `folder` may be a callable that returns the folder (the demo reranker is built on first load). A
    SentenceTransformer in bf16 or int8 on the CPU loads the OpenVINO copy when OpenVINO is installed (`engine`),
    prepared into `cache_dir` on first use (int8: calibrated on `calibration()` passages)."""

    def __init__(self, key: str, folder: Any, cls_name: str, estimate: int, precision: str = "fp32",
                 cache_dir: Path | None = None, calibration: Any = None) -> None:  # fmt: skip
        self.key, self._folder, self.cls_name, self._estimate = key, folder, cls_name, estimate
        self.precision, self.cache_dir, self.calibration = precision, cache_dir, calibration
        self.dtype_used, self.engine = "", ""

    def estimate_bytes(self) -> int:
        return self._estimate

    def load(self, device: str) -> Any:
        import sentence_transformers
        import torch

        folder = self._folder() if callable(self._folder) else self._folder
        self.dtype_used = resolve_precision(self.precision, device)
        # OpenVINO only on a machine without CUDA: a model the manager parks in RAM there must be able to move up
        on_cpu_only = not device.startswith("cuda") and not torch.cuda.is_available()
        if self.dtype_used in KINDS and self.cls_name == "SentenceTransformer" and on_cpu_only:
            if openvino_available(self.dtype_used):
                return self._load_openvino(folder)
            if self.dtype_used == "int8":
                raise ValueError(f"{self.key}: precision int8 needs openvino and nncf (pip install nncf).")
        if self.dtype_used == "int8":
            self.dtype_used = "fp32"  # cross-encoders have no int8 path
        self.engine = "torch"
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype_used]
        cls = getattr(sentence_transformers, self.cls_name)
        log.info("loading %s from %s on %s in %s", self.key, folder, device, self.dtype_used)
        return cls(str(folder), device=device, local_files_only=True, model_kwargs={"dtype": dtype})

    def _load_openvino(self, folder: Path) -> Any:
        from backends.rag.openvino_embed import OVEmbedder, prepare

        if self.cache_dir is None:
            raise ValueError(f"{self.key}: OpenVINO needs a cache folder for the converted model.")
        calibration = self.calibration() if callable(self.calibration) else self.calibration
        prepared = prepare(Path(folder), Path(self.cache_dir), self.dtype_used, calibration)
        log.info("loading %s in OpenVINO (%s) from %s", self.key, self.dtype_used, prepared)
        self.engine = "openvino"
        return OVEmbedder(prepared)

    def release(self, obj: Any) -> None:
        pass  # no references kept here; the manager drops its own and empties caches


def ensure_demo_reranker(cache_dir: Path, tokenizer_folder: Path) -> Path:
    """Build the untrained demo cross-encoder once (fixed seed) into `cache_dir/rag/`; return its folder."""
    from studio.safety import atomic_folder

    target = Path(cache_dir) / "rag" / f"{DEMO_RERANKER}-v{DEMO_VERSION}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    t0 = time.perf_counter()
    tok = BertTokenizerFast.from_pretrained(str(tokenizer_folder))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512, num_labels=1)  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = BertForSequenceClassification(cfg).eval()
    with atomic_folder(target, replace=False) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "DEMO.txt").write_text("Random-initialised cross-encoder (BERT, 1 layer): an untrained demo model.\n")
    log.info("built the demo cross-encoder in %s in %.1f s", target, time.perf_counter() - t0)
    return target


def calibration_passages(folder: Path) -> list[str]:
    """Passages the int8 embedding model is calibrated on: the files of `folder` (the sample notes), chunked."""
    from backends.rag.chunk import chunk_document
    from backends.rag.ingest import SkipFile, read_document

    out = []
    for path in sorted(folder.glob("*")) if folder.is_dir() else []:
        try:
            out += [c.embedding_text() for c in chunk_document(read_document(path, path.read_bytes()))]
        except (OSError, SkipFile):
            continue
    return out
