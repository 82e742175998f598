"""Writing the answer: retrieve, decide whether the notes hold it, then plain RAG or the tool-calling chat.

Policy, in order: no passage at all, or the best vector similarity under `min_relevance` -> abstain and say why
(this is also how a question in a language the English embedding model cannot match is refused; one it can match
is answered, with a note about the language). Passages only when no chat model is wanted. With tools: the chat
model may call search_notes / open_file / calculator (rag_tools) through the LLM backend's tool calling, each call
shown as a step; a model whose chat template has no tool support gets plain RAG, and the note says so. Any chat
model failure falls back to the passages, with the reason.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

from backends.rag.answer import (
    AnswerUpdate,
    SearchResult,
    build_messages,
    cited_numbers,
    cut_repetition,
    question_language,
)
from backends.rag.tools import SCHEMAS, ToolSession

log = logging.getLogger(__name__)
MAX_TOOL_ROUNDS = 4
TOOL_PROMPT = (
    "You answer questions about the user's notes. Use search_notes to find passages, open_file to read more of a "
    "file, calculator for arithmetic. Cite sources as file:lines. If the notes do not hold the answer, say so."
)


def gate(result: SearchResult, min_relevance: float) -> str:
    """Why the answer must abstain ('' when it need not)."""
    if not result.passages:
        return "No passage matches the question: the notes do not seem to hold the answer."
    sims = [p.vector_score for p in result.passages if p.vector_score is not None]
    if sims and max(sims) < min_relevance:
        return (f"No passage is close to the question (best similarity {max(sims):.2f}, below {min_relevance:.2f}): "
                "the notes do not seem to hold the answer.")  # fmt: skip
    return ""


def language_note(question: str) -> str:
    lang = question_language(question)
    if lang is None:
        return ""
    return (f"This question looks like {lang}; the embedding model (all-MiniLM-L6-v2) and the offline chat model "
            "were trained on English text, so matches may be poor: ask in English for the best results.")  # fmt: skip


def respond(rag: Any, llm_factory: Any, kb: str, question: str, *, top_k: int, mode: str, rerank: bool,
            reranker: str | None, use_llm: bool, use_tools: bool, max_new_tokens: int,
            cancel: threading.Event | None) -> Iterator[AnswerUpdate]:  # fmt: skip
    result = rag.search(kb, question, top_k=top_k, mode=mode, rerank=rerank, reranker=reranker)
    lang = language_note(result.question)
    why = gate(result, rag.config.min_relevance)
    if why:
        yield AnswerUpdate("", result, note=" ".join(x for x in (why, lang) if x), done=True, abstained=True)
        return
    if not use_llm:
        yield AnswerUpdate("", result, note=lang, done=True)
        return
    try:
        if llm_factory is None:
            raise RuntimeError("no chat model is configured")
        llm = llm_factory()
        opts = llm.recommended_options(temperature=0.0, max_new_tokens=max_new_tokens)
        if use_tools:
            from backends.llm import ToolsNotSupported

            try:
                yield from _with_tools(rag, llm, kb, result, opts, mode, lang, cancel)
                return
            except ToolsNotSupported:
                lang = " ".join(x for x in ("This chat model has no tool template: answered with plain RAG "
                                            "(no tool calls).", lang) if x)  # fmt: skip
        yield from _plain(llm, result, opts, lang, cancel)
    except Exception as e:  # any LLM failure falls back to the passages, with the reason shown
        log.warning("rag answer: chat model failed (%s: %s)", type(e).__name__, e)
        note = f"The chat model is unavailable or failed ({type(e).__name__}: {e}); showing the passages only."
        yield AnswerUpdate("", result, note=note, done=True)


def _plain(llm: Any, result: SearchResult, opts: Any, lang: str, cancel: Any) -> Iterator[AnswerUpdate]:
    messages, used = build_messages(result.question, result.passages)
    notes = [lang] if lang else []
    if used < len(result.passages):
        notes.append(f"The answer was written from passages 1-{used} (prompt size).")
    note = " ".join(notes)
    yield AnswerUpdate("", result, note=note or "retrieved; the chat model is writing the answer ...")
    text = ""
    for update in llm.chat(messages, opts, cancel=cancel):
        text = update.text
        cut = cut_repetition(text)
        if cut is not None:  # a sentence that comes back ends the answer (a small model's greedy loop)
            text = cut
            break
        yield AnswerUpdate(text, result, note=note, cited=cited_numbers(text, used), llm_used=True)
    yield AnswerUpdate(text, result, note=note, cited=cited_numbers(text, used), done=True, llm_used=True)


def _with_tools(rag: Any, llm: Any, kb: str, result: SearchResult, opts: Any, mode: str, lang: str,
                cancel: Any) -> Iterator[AnswerUpdate]:  # fmt: skip
    """The tool loop; raises ToolsNotSupported (before any output) when the model's template has no tools."""
    session = ToolSession(rag, kb, mode)
    messages: list[dict[str, Any]] = [{"role": "system", "content": TOOL_PROMPT},
                                      {"role": "user", "content": result.question}]  # fmt: skip
    text = ""
    for _ in range(MAX_TOOL_ROUNDS):
        last = None
        for last in llm.chat(messages, opts, cancel=cancel, tools=SCHEMAS):
            if not last.tool_calls:
                text = last.text
                yield AnswerUpdate(text, result, note=lang, steps=list(session.steps), llm_used=True)
        if last is None or not last.tool_calls:
            break
        messages.append({"role": "assistant", "content": last.text or None,
                         "tool_calls": [c.to_openai() for c in last.tool_calls]})  # fmt: skip
        for call in last.tool_calls:
            out = session.run(call.name, call.arguments)
            messages.append({"role": "tool", "tool_call_id": call.id, "name": call.name, "content": out})
        yield AnswerUpdate("", result, note=lang or "calling tools ...", steps=list(session.steps), llm_used=True)
    else:
        lang = " ".join(x for x in (lang, f"Stopped after {MAX_TOOL_ROUNDS} rounds of tool calls.") if x)
    yield AnswerUpdate(text, result, note=lang, done=True, llm_used=True, steps=list(session.steps))
