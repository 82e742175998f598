"""The RAG evaluation harness, rerankers, abstention and other languages with the real offline embedding model on
the sample notes (ingested once for this module), and the tab's evaluation stream: two sessions, Stop."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from studio.settings import Settings

NOTES = Path(__file__).resolve().parent.parent / "assets" / "notes"
QUESTIONS = Path(__file__).resolve().parent.parent / "backends" / "rag" / "questions" / "sample-notes.jsonl"


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory):
    from studio.app import build_context

    root = tmp_path_factory.mktemp("rag-eval")
    c = build_context(Settings(data_dir=root / "data", models_dir=root / "models", open_browser=False))
    rag = c.backends.rag
    rag.create_kb("notes")
    rag.ingest("notes", shutil.copytree(NOTES, root / "notes"))
    yield c
    c.jobs.shutdown(timeout=10)


def _last(stream):
    last = None
    for last in stream:  # noqa: B007 (the last step carries the report)
        pass
    return last


def test_harness_scores_the_notes_set_and_saves_a_run(ctx) -> None:
    from backends.rag import EvalOptions, evaluation_stream

    rag = ctx.backends.rag
    final = _last(evaluation_stream(rag, "notes", QUESTIONS, EvalOptions(k=3)))
    report = final.report
    assert report.questions == 6 and report.answerable == 5 and not report.cancelled
    hybrid = report.retrieval["hybrid"]
    assert hybrid["recall@3"] >= 0.8 and hybrid["mrr@10"] >= 0.7 and 0 < hybrid["ndcg@10"] <= 1, report.retrieval
    assert set(report.retrieval) == {"hybrid", "vector", "keyword"}
    assert report.answers["abstention_rate_unanswerable"] == 1.0  # the World Cup is not in the notes
    assert report.answers["false_abstention_rate"] == 0.0 and report.answers["latency_p95_s"] > 0
    assert report.answers["rouge_l"] is None  # no answers written: nothing to score
    run = ctx.runs.get(report.run_id)
    assert run.kind == "rag-eval" and run.status == "done" and run.record["dataset_hash"]
    assert run.record["summary"]["hybrid.mrr@10"] == pytest.approx(hybrid["mrr@10"])
    details = [json.loads(line) for line in (run.dir / "details.jsonl").read_text().splitlines()]
    assert [d["id"] for d in details] == ["n1", "n2", "n3", "n4", "n5", "u1"] and details[5]["abstained"]


def test_answer_metrics_come_from_rouge_score_and_sacrebleu(ctx) -> None:
    from backends.rag.harness import QuestionDetail, _answer_metrics
    from backends.rag.questions import parse_question_set

    qs = parse_question_set(QUESTIONS.read_text())
    details = [QuestionDetail(q.id, q.question, q.answerable) for q in qs]
    details[0].answer, details[0].cited, details[0].cited_supporting = "350 g water at about 30 °C [1].", [1], 1
    details[1].answer, details[1].cited, details[1].cited_supporting = "Bake it at 250 °C [2].", [2, 3], 1
    out = _answer_metrics(qs, details, answered=True)
    assert out["answers_scored"] == 2 and out["citation_precision"] == pytest.approx(0.75)
    assert details[0].rouge_l == pytest.approx(1.0) and 0 < details[1].rouge_l < 1
    assert 0 < out["bleu"] <= 100


def test_demo_reranker_runs_through_residency_and_is_labelled(ctx) -> None:
    rag = ctx.backends.rag
    assert rag.default_reranker() is None  # "auto" never picks the untrained demo model
    ids = {rid: ok for rid, _, ok in rag.rerankers()}
    assert ids == {"bge-reranker-base": False, "ms-marco-minilm-l6": False, "tiny-random-cross-encoder": True}
    result = rag.search("notes", "bread baking time", top_k=4, reranker="tiny-random-cross-encoder")
    assert result.reranked and "untrained demo model" in result.ranking_note
    scores = [p.rerank_score for p in result.passages]
    assert all(s is not None for s in scores) and scores == sorted(scores, reverse=True)
    assert ctx.residency.is_registered("reranker:tiny-random-cross-encoder")


def test_off_topic_and_foreign_questions_are_refused_or_answered_clearly(ctx) -> None:
    rag = ctx.backends.rag
    off = list(rag.answer("notes", "Who won the football World Cup in 1998?", use_llm=False))[-1]
    assert off.abstained and "do not seem to hold the answer" in off.note
    chinese = list(rag.answer("notes", "面团里放多少水？", use_llm=False))[-1]
    assert chinese.abstained and "Chinese or Japanese" in chinese.note and "ask in English" in chinese.note
    french = list(rag.answer("notes", "Combien de grammes d'eau pour la pâte du sourdough ?", use_llm=False))[-1]
    assert "French" in french.note  # answered (the passages are shown) or refused, always with the reason
    assert french.abstained or french.search.passages[0].display == "notes/sourdough.md"
    rtl = list(rag.answer("notes", "\u202ewater\u202c how much in the dough?", use_llm=False))[-1]
    assert rtl.search.passages and not rtl.abstained


def test_tab_evaluation_two_sessions_and_stop(ctx, tmp_path: Path) -> None:
    import gradio as gr

    from tabs.rag_eval import UPLOAD, eval_stream

    rag = ctx.backends.rag
    results: dict[int, list] = {}

    def session(i: int) -> None:
        results[i] = list(eval_stream(rag, "notes", UPLOAD, str(QUESTIONS), ["keyword"], 3, "none", False))

    threads = [threading.Thread(target=session, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for out in results.values():
        status, metrics, details = out[-1]
        assert "6 questions" in status and "Saved as run" in status
        assert [r[0] for r in metrics] == ["keyword"] and len(details) == 6
    cancel = threading.Event()
    stream = eval_stream(rag, "notes", UPLOAD, str(QUESTIONS), ["hybrid"], 3, "none", False, cancel)
    next(stream), next(stream)  # the set is checked, the first question is done
    cancel.set()  # Stop: the harness ends after the current question and keeps what was done
    status, _, details = list(stream)[-1]
    assert "Stopped early" in status and 1 <= len(details) < 6
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q?", "sauce": "x"}\n')
    with pytest.raises(gr.Error, match="line 1: unknown key"):
        list(eval_stream(rag, "notes", UPLOAD, str(bad), ["hybrid"], 3, "none", False))
    with pytest.raises(gr.Error, match="Choose a knowledge base"):
        list(eval_stream(rag, None, UPLOAD, str(QUESTIONS), ["hybrid"], 3, "none", False))
    with pytest.raises(gr.Error, match="modes"):
        list(eval_stream(rag, "notes", UPLOAD, str(QUESTIONS), [], 3, "none", False))


@pytest.mark.slow
def test_real_chat_model_without_tool_template_answers_with_plain_rag(ctx) -> None:
    """SmolLM2's chat template has no tools: the tool mode says so and answers from the passages."""
    ups = list(
        ctx.backends.rag.answer("notes", "How much water goes into the dough?", use_tools=True, max_new_tokens=24)
    )
    final = ups[-1]
    assert final.done and final.llm_used and final.text.strip() and not final.steps
    assert "no tool template: answered with plain RAG" in final.note


@pytest.mark.slow
def test_evaluation_with_answers_scores_rouge_bleu_and_citations(ctx) -> None:
    from backends.rag import EvalOptions, evaluation_stream

    opts = EvalOptions(modes=("hybrid",), k=3, answer=True, max_new_tokens=32)
    report = _last(evaluation_stream(ctx.backends.rag, "notes", QUESTIONS, opts)).report
    a = report.answers
    assert a["answers_scored"] >= 3 and 0 <= a["rouge_l"] <= 1 and 0 <= a["bleu"] <= 100
    assert a["abstention_rate_unanswerable"] == 1.0
