"""RAG tab: build knowledge bases from your folders and files, ask questions, read answers with citations."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from studio.context import StudioContext, Tab
from tabs._session import StopFlag, bind, on_page_load
from tabs.rag_eval import build_eval, reranker_choices

SAMPLE_NOTES = Path(__file__).resolve().parent.parent / "assets" / "notes"
PASSAGE_COLUMNS = ["#", "source", "heading", "vector", "BM25", "fused", "rerank", "text"]
MODE_LABELS = {
    "hybrid (vector + BM25)": "hybrid",
    "vector only": "vector",
    "keyword (BM25) only": "keyword",
}


def _score(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def passage_rows(result: Any) -> list[list[Any]]:
    """One table row per retrieved passage (SearchResult -> rows in PASSAGE_COLUMNS order)."""
    rows = []
    for p in result.passages if result else []:
        text = p.text if len(p.text) <= 400 else p.text[:400] + " ..."
        rows.append([
            p.number, p.citation, p.heading, _score(p.vector_score), _score(p.bm25_score, 2),
            _score(p.fused_score, 4), _score(p.rerank_score), text,
        ])  # fmt: skip
    return rows


def passage_block(p: Any, max_lines: int = 30) -> str:
    """The passage verbatim in a fenced block, each line prefixed with its line number in the source."""
    lines = p.text.split("\n")
    shown = [f"{n:>5} | {line}" for n, line in enumerate(lines[:max_lines], start=p.start_line)]
    if len(lines) > max_lines:
        shown.append(f"      | ... {len(lines) - max_lines} more lines")
    body = "\n".join(shown)
    longest = max((len(m) for m in re.findall(r"`+", body)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{body}\n{fence}"


def citations_markdown(update: Any) -> str:
    """The passages cited in the answer (or all of them when no answer was written), mapped to file:lines."""
    result = update.search
    if not result.passages:
        return ""
    numbers = update.cited or [p.number for p in result.passages]
    title = "Cited passages" if update.cited else "Retrieved passages"
    parts = [f"### {title}"]
    for n in numbers:
        p = result.passages[n - 1]
        parts.append(f"**[{n}] `{p.citation}`**" + (f" · {p.heading}" if p.heading else "") + "\n\n" + passage_block(p))
    return "\n\n".join(parts)


def answer_markdown(update: Any) -> str:
    note = f"\n\n*{update.note}*" if update.note else ""
    if update.abstained:
        return "**No answer: the notes do not seem to hold it.**" + note
    if update.text:
        return update.text + note
    if update.done and not update.llm_used:
        return "*No answer written: the retrieved passages are below.*" + note
    return "*...*" + note


def job_markdown(job: Any) -> str:
    if job is None:
        return ""
    text = f"**{job.status}** · {job.progress:.0%} · {job.message or ''}"
    if job.error:
        text += f"\n\n**Error:** {job.error}"
    return text


def kb_markdown(backend: Any, kb: str | None) -> str:
    if not kb:
        return "No knowledge base yet: type a name and press **Create**, or just ingest (it is created for you)."
    try:
        info = backend.kb_info(kb)
    except ValueError as e:
        return str(e)
    sources = ", ".join(f"`{s}`" for s in info.sources) or "none yet"
    return f"**{info.name}**: {info.files} files, {info.chunks} chunks · sources: {sources} · updated {info.updated}"


def ingest_stream(backend: Any, kb_v: str | None, new_v: str, folder_v: str, files: list[str] | None, poll_s=0.5):
    """Start the ingest job and stream (job id, kb choices, status, notes, kb info) until it ends."""
    import gradio as gr

    name = (new_v or "").strip() or kb_v or "notes"  # a typed new name wins over the selected base
    try:
        target = backend.save_uploads(name, files) if files else backend.check_ingest_folder(folder_v)
        job = backend.start_ingest(name, target)
    except ValueError as e:
        raise gr.Error(str(e)) from None
    choices = gr.update(choices=backend.knowledge_bases(), value=name)
    yield job.id, choices, job_markdown(job), "", kb_markdown(backend, name)
    while not job.wait(poll_s):
        yield job.id, gr.skip(), job_markdown(job), "\n".join(job.logs[-200:]), gr.skip()
    report = job.result
    notes = "\n".join(report.notes) if report else "\n".join(job.logs[-200:])
    status = f"**{job.status}** · {report.summary()}" if report else job_markdown(job)
    yield None, gr.skip(), status, notes, kb_markdown(backend, name)


# Passage blocks wrap instead of running off the right edge; the passage table scrolls inside its own box.
PASSAGE_CSS = """<style>
.rag-cited pre, .rag-cited code { white-space: pre-wrap !important; overflow-wrap: anywhere; word-break: break-word; }
.rag-cited pre { max-width: 100%; overflow-x: auto; }
</style>"""


def steps_markdown(update: Any) -> str:
    """The step log of a tool-calling answer: each call with its arguments and (the start of) its result."""
    if not update.steps:
        return ""
    lines = [f"{i}. `{s.split(' -> ', 1)[0]}` → {s.split(' -> ', 1)[-1][:200]}" for i, s in enumerate(update.steps, 1)]
    return "**Tool calls**\n\n" + "\n".join(lines)


def ask_stream(backend: Any, kb_v: str | None, q: str, mode_v: str, k: float, llm_v: bool, tokens: float,
               tools_v: bool = False, reranker_v: str = "auto"):  # fmt: skip
    """Stream (ranking note, answer, citations, passage rows, step log) for one question."""
    import gradio as gr

    if not kb_v:
        raise gr.Error("Choose a knowledge base first (or create one and ingest a folder).")
    reranker = None if reranker_v in ("auto", "none", None) else reranker_v
    try:
        stream = backend.answer(kb_v, q, top_k=int(k), mode=MODE_LABELS[mode_v], use_llm=bool(llm_v),
                                max_new_tokens=int(tokens), use_tools=bool(tools_v), reranker=reranker,
                                rerank=reranker_v != "none")  # fmt: skip
        first = True
        for update in stream:
            rows = passage_rows(update.search) if first or update.done else gr.skip()
            first = False
            yield (update.search.ranking_note, answer_markdown(update), citations_markdown(update), rows,
                   steps_markdown(update))  # fmt: skip
    except (ValueError, RuntimeError) as e:  # bad input, or no embedding model / out of memory
        raise gr.Error(str(e)) from None


def kb_choices(backend: Any, current: str | None):
    """On page load: the knowledge bases that exist now (another tab or a restart may have changed them)."""
    import gradio as gr

    names = backend.knowledge_bases()
    value = current if current in names else (names[0] if names else None)
    return gr.update(choices=names, value=value), kb_markdown(backend, value)


def create(backend: Any, name: str):
    import gradio as gr

    try:
        info = backend.create_kb(name)
    except ValueError as e:
        raise gr.Error(str(e)) from None
    return gr.update(choices=backend.knowledge_bases(), value=info.name), kb_markdown(backend, info.name), ""


def delete(backend: Any, kb_v: str | None):
    import gradio as gr

    if not kb_v:
        raise gr.Error("Choose the knowledge base to delete first.")
    try:
        backend.delete_kb(kb_v)
    except ValueError as e:
        raise gr.Error(str(e)) from None
    left = backend.knowledge_bases()
    return gr.update(choices=left, value=left[0] if left else None), kb_markdown(backend, left[0] if left else None)


def ingest(backend: Any, kb_v: str | None, new_v: str, folder_v: str, files: list[str] | None):
    yield from ingest_stream(backend, kb_v, new_v, folder_v, files)


def ask(ctx: StudioContext, backend: Any, busy: StopFlag, kb_v, q, mode_v, k, llm_v, tokens, tools_v, reranker_v):
    busy.set()
    try:
        with ctx.queues.hold(ctx.queues.queue_id("RAG"), "a RAG answer (RAG)"):
            yield from ask_stream(backend, kb_v, q, mode_v, k, llm_v, tokens, tools_v, reranker_v)
    finally:
        busy.clear()


def ask_pressed(ctx: StudioContext, busy: StopFlag) -> str:
    """Shown at once: a question asked while another streams is queued (the latest one wins), never ignored."""
    from studio.waiting import explain_wait

    if busy.is_set():
        return "⏳ *Queued: your new question starts when the current answer ends (press Stop to end it now).*"
    return explain_wait(ctx, ctx.queues.queue_id("RAG")) or "*Searching…*"


def _build_library(backend: Any) -> dict[str, Any]:
    import gradio as gr

    names = backend.knowledge_bases()
    kb = gr.Dropdown(names, value=names[0] if names else None, label="Knowledge base", interactive=True)
    with gr.Row():
        new_name = gr.Textbox(label="New knowledge base", placeholder="my-notes", scale=3)
        create_btn = gr.Button("Create", scale=1)
    kb_info = gr.Markdown(kb_markdown(backend, names[0] if names else None))
    folders = backend.ingest_choices()
    folder = gr.Dropdown(
        folders, value=folders[0] if folders else None, label="Folder to ingest (on the studio's computer: "
        "data/ingest, the sample notes, or the settings' ingest_roots)",
    )  # fmt: skip
    uploads = gr.File(label="... or upload files", file_count="multiple", type="filepath")
    with gr.Row():
        ingest_btn = gr.Button("Ingest", variant="primary")
        cancel_btn = gr.Button("Cancel ingest")
        delete_btn = gr.Button("Delete knowledge base", variant="stop")
    ingest_status = gr.Markdown()
    ingest_notes = gr.Textbox(label="Skipped files and notes", lines=5, max_lines=12)
    return locals()


def _build_question(backend: Any) -> dict[str, Any]:
    import gradio as gr

    question = gr.Textbox(label="Question", lines=2, placeholder="How much water goes into the sourdough?")
    with gr.Row():
        mode = gr.Radio(list(MODE_LABELS), value=next(iter(MODE_LABELS)), label="Retrieval")
        top_k = gr.Slider(1, 20, value=5, step=1, label="Passages")
    with gr.Row():
        use_llm = gr.Checkbox(True, label="Write an answer with the chat model")
        max_tokens = gr.Slider(16, 1024, value=200, step=16, label="Answer length (tokens)")
    with gr.Row():
        use_tools = gr.Checkbox(False, label="Let the chat model call tools (search_notes, open_file, calculator)")
        reranker = gr.Dropdown([("auto (a downloaded cross-encoder)", "auto"), *reranker_choices(backend)],
                               value="auto", label="Reranker")  # fmt: skip
    with gr.Row():
        ask_btn = gr.Button("Ask", variant="primary")
        stop_btn = gr.Button("Stop")
    ranking = gr.Markdown()
    answer = gr.Markdown(label="Answer")
    steps = gr.Markdown(label="Tool calls")
    cited = gr.Markdown(elem_classes=["rag-cited"])
    return locals()


def build(ctx: StudioContext) -> None:
    import gradio as gr

    backend = ctx.backends.rag
    chosen = backend.default_reranker()
    rerank_line = (
        f"Reranking: the **{chosen} cross-encoder** reorders the best 20 candidates."
        if chosen
        else "Reranking: **no reranker installed: ranking by hybrid score** (download bge-reranker-base or the "
        "ms-marco cross-encoder in the Models tab to rerank; the untrained demo cross-encoder only tests the path)."
    )
    gr.Markdown(
        "## RAG: ask your notes and code\nIngest a folder (Markdown, text, code, PDF) into a knowledge base; the "
        "offline **all-MiniLM-L6-v2** model embeds it into a local Chroma index. Questions are answered from "
        "the best passages, found by vector search and BM25 keywords fused together, with citations to "
        f"file and lines. {rerank_line} The offline chat model (SmolLM2-135M) is small: judge the passages, "
        "and treat its answer as a draft."
    )
    gr.HTML(PASSAGE_CSS, padding=False)
    job_id, busy = gr.State(None), gr.State(StopFlag())
    with gr.Row():
        with gr.Column(scale=2):
            lib = _build_library(backend)
        with gr.Column(scale=3):
            q = _build_question(backend)
    passages = gr.Dataframe(
        headers=PASSAGE_COLUMNS, label="Retrieved passages (scores)", wrap=True, interactive=False,
        column_widths=["4%", "20%", "16%", "7%", "7%", "7%", "7%", "32%"],
    )  # fmt: skip
    kb = lib["kb"]
    on_page_load(bind(kb_choices, backend), kb, [kb, lib["kb_info"]], queue=False)
    lib["create_btn"].click(bind(create, backend), lib["new_name"], [kb, lib["kb_info"], lib["new_name"]])
    kb.change(lambda v: kb_markdown(backend, v), kb, lib["kb_info"])
    folder = lib["folder"]
    folder.focus(lambda v: gr.update(choices=backend.ingest_choices(), value=v), folder, folder)
    lib["ingest_btn"].click(
        bind(ingest, backend), [kb, lib["new_name"], folder, lib["uploads"]],
        [job_id, kb, lib["ingest_status"], lib["ingest_notes"], lib["kb_info"]], concurrency_limit=None,
        api_name="rag_ingest",
    )  # fmt: skip
    lib["cancel_btn"].click(lambda jid: ctx.jobs.cancel(jid) if jid else None, job_id, None)
    lib["delete_btn"].click(bind(delete, backend), kb, [kb, lib["kb_info"]])
    inputs = [busy, kb, q["question"], q["mode"], q["top_k"], q["use_llm"], q["max_tokens"], q["use_tools"],
              q["reranker"]]  # fmt: skip
    outputs = [q["ranking"], q["answer"], q["cited"], passages, q["steps"]]
    events = []
    for i, trigger in enumerate((q["ask_btn"].click, q["question"].submit)):
        trigger(bind(ask_pressed, ctx), busy, q["ranking"], queue=False)
        # always_last: pressed while an answer streams, the newest question runs next (not silently dropped)
        events.append(trigger(bind(ask, ctx, backend), inputs, outputs, trigger_mode="always_last",
                              api_name=None if i else "rag_ask", **ctx.queues.event_kwargs("RAG")))  # fmt: skip
    q["stop_btn"].click(None, None, None, cancels=events)
    build_eval(ctx, backend, kb)


TAB = Tab("RAG", build)
