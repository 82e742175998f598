"""CPU embeddings through OpenVINO: the sentence-transformers model converted once, run in bf16 (or int8).

Why: on a 2-core CPU, ingest is all embedding. OpenVINO's CPU plugin runs all-MiniLM-L6-v2 in bf16 on AMX about
3x faster than PyTorch fp32 in batches of 16 (and ~1.4x PyTorch's own bf16), with vectors within cosine 0.9999 of
fp32's; int8 (NNCF static quantisation, AMX-INT8/VNNI) is about as fast on this 2-core machine but moves vectors
to cosine ~0.99 (a question of the bench's quick subset changed rank), so bf16 is what "auto" uses and int8 is
opt-in (`RAGConfig(embed_precision="int8")`). The bench measures speed and retrieval agreement.

Preparation, once per model file set and kind (keyed by the hash of its weights): export the Transformer module
with `openvino.convert_model` (dynamic batch and length); for int8 also `nncf.quantize(model_type=TRANSFORMER)`
calibrated on a fixed sample of passages (the repo's sample notes, built-in passages, the model card); saved as
OpenVINO IR (`model.xml`/`model.bin`: no pickle) with the tokenizer into `cache_dir/rag/<name>-ov-<kind>-v<N>-<hash>/`
through an atomic folder. Within one process a finished preparation is reused from wherever it was built (the
test suite builds it once).

Encoding (`OVEmbedder.encode`, the same call shape as SentenceTransformer.encode): texts sorted by length so a
batch pads little, each batch tokenised on a worker thread while the previous one runs (OpenVINO releases the
GIL), mean pooling over the attention mask and L2 normalisation as the model's own Pooling/Normalize modules do.
One infer request per call, so concurrent callers never share one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
VERSION = 1
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
CALIBRATION_BATCHES = 8
CALIBRATION_BATCH = 8
FALLBACK_CALIBRATION = (
    "The meeting moved to Thursday; bring the budget figures and the draft of the report.",
    "def parse(line):\n    key, _, value = line.partition('=')\n    return key.strip(), value.strip()",
    "Knead the dough for ten minutes, then leave it covered in a warm place until it doubles in size.",
    "HAMLET. To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
    "## Installation\n\nRun the installer, choose a folder for the models and start the studio from a terminal.",
    "The GPU has 12 GB of memory; the model needs 7 GB for its weights and about 1 GB for activations.",
    "Train leaves at 08:15 from platform 4; change at the junction for the coastal line, arriving 11:40.",
    "Error: file not found. Check the path, the permissions, and that the disk is mounted.",
)
_prepared: dict[str, Path] = {}  # weights hash -> a prepared folder (this process)
_prepare_lock = threading.Lock()


KINDS = ("bf16", "int8")


def openvino_available(kind: str = "bf16") -> bool:
    """True when OpenVINO (and for int8 NNCF) is installed (both pinned in requirements.txt)."""
    mods = ("openvino", "nncf") if kind == "int8" else ("openvino",)
    return all(importlib.util.find_spec(m) is not None for m in mods)


def _weights_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for name in ("model.safetensors", "config.json", "tokenizer.json", "sentence_bert_config.json"):
        p = folder / name
        if p.is_file():
            h.update(name.encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:12]


def prepare(st_folder: Path, cache_dir: Path, kind: str = "bf16", calibration: list[str] | None = None) -> Path:
    """The OpenVINO folder (`kind` bf16 or int8) for the sentence-transformers model in `st_folder`, built once."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: choose one of {KINDS}.")
    st_folder = Path(st_folder)
    weights = _weights_hash(st_folder)
    digest = f"{kind}-{weights}"
    target = Path(cache_dir) / "rag" / f"{st_folder.parent.name}-ov-{kind}-v{VERSION}-{weights}"
    with _prepare_lock:
        if (target / "model.xml").is_file():
            _prepared[digest] = target
            return target
        done = _prepared.get(digest)
        if done is not None and (done / "model.xml").is_file():
            return done
        _build(st_folder, target, _calibration_set(st_folder, calibration or []), kind)
        _prepared[digest] = target
        return target


def _calibration_set(st_folder: Path, given: list[str]) -> list[str]:
    """Given passages + the built-in ones + the model card's paragraphs: varied prose, code and lists."""
    readme = st_folder / "README.md"
    card = readme.read_text("utf-8", "replace").split("\n\n") if readme.is_file() else []
    texts = [t for t in [*given, *FALLBACK_CALIBRATION, *card] if len(t.strip()) > 40]
    return texts[: CALIBRATION_BATCHES * CALIBRATION_BATCH]


def _build(st_folder: Path, target: Path, calibration: list[str], kind: str) -> None:
    import openvino as ov
    import torch
    from sentence_transformers import SentenceTransformer

    from studio.safety import atomic_folder

    t0 = time.perf_counter()
    log.info("preparing the %s OpenVINO embedding model in %s (once)", kind, target)
    st = SentenceTransformer(str(st_folder), device="cpu", local_files_only=True)
    tok, max_len = st.tokenizer, int(st.max_seq_length)
    example = tok(calibration[:2], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    with torch.no_grad():
        model = ov.convert_model(st[0].auto_model, example_input={k: example[k] for k in INPUTS if k in example})
    names = [i.get_any_name() for i in model.inputs]
    if kind == "int8":
        model = _quantize(model, tok, max_len, names, calibration)
    with atomic_folder(target, replace=False) as tmp:
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        tok.save_pretrained(str(tmp))
        meta = {"max_seq_length": max_len, "inputs": names, "source": str(st_folder), "version": VERSION,
                "kind": kind, "dimension": int(st[0].auto_model.config.hidden_size)}  # fmt: skip
        (tmp / "studio-openvino.json").write_text(json.dumps(meta, indent=1))
    log.info("%s OpenVINO embedding model ready in %.1f s", kind, time.perf_counter() - t0)


def _quantize(model: Any, tok: Any, max_len: int, names: list[str], calibration: list[str]) -> Any:
    import nncf

    batches = [calibration[i : i + CALIBRATION_BATCH] for i in range(0, len(calibration), CALIBRATION_BATCH)]

    def feed(batch: list[str]) -> dict[str, np.ndarray]:
        enc = tok(batch, padding=True, truncation=True, max_length=max_len, return_tensors="np")
        return {k: enc[k] for k in names}

    dataset = nncf.Dataset(batches[:CALIBRATION_BATCHES], feed)
    return nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=CALIBRATION_BATCHES)


class OVEmbedder:
    """SentenceTransformer-like `encode` over a prepared OpenVINO model (mean pooling, L2-normalised)."""

    def __init__(self, folder: Path, threads: int | None = None) -> None:
        import openvino as ov
        from transformers import AutoTokenizer

        meta = json.loads((Path(folder) / "studio-openvino.json").read_text())
        self.folder, self.max_seq_length, self.inputs = Path(folder), int(meta["max_seq_length"]), meta["inputs"]
        self.dimension = int(meta["dimension"])
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "bf16"}
        config |= {"INFERENCE_NUM_THREADS": threads} if threads else {}
        self.compiled = ov.Core().compile_model(str(Path(folder) / "model.xml"), "CPU", config)
        self.device = "cpu"

    def _tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_seq_length, return_tensors="np")
        return {k: enc[k] for k in self.inputs}

    def _infer(self, request: Any, enc: dict[str, np.ndarray], normalize: bool) -> np.ndarray:
        hidden = request.infer(enc)[0]
        mask = enc["attention_mask"][..., None].astype(np.float32)
        vectors = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
        if normalize:
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors.astype(np.float32)

    def encode(self, texts: list[str] | str, batch_size: int = 32, normalize_embeddings: bool = True,
               show_progress_bar: bool = False, **_: Any) -> np.ndarray:  # fmt: skip
        single = isinstance(texts, str)
        items = [texts] if single else list(texts)
        out = np.zeros((len(items), self.dimension), np.float32)
        if not items:
            return out
        order = np.argsort([-len(t) for t in items], kind="stable")
        groups = [order[lo : lo + batch_size] for lo in range(0, len(items), batch_size)]
        request = self.compiled.create_infer_request()
        with ThreadPoolExecutor(1, thread_name_prefix="rag-tokenize") as pool:
            nxt = pool.submit(self._tokenize, [items[i] for i in groups[0]])
            for n, idx in enumerate(groups):
                enc = nxt.result()
                if n + 1 < len(groups):  # the next batch's tokens are made while this one runs
                    nxt = pool.submit(self._tokenize, [items[i] for i in groups[n + 1]])
                out[idx] = self._infer(request, enc, normalize_embeddings)
        return out[0] if single else out

    def get_sentence_embedding_dimension(self) -> int:
        return self.dimension
