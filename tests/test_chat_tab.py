"""Chat tab: it builds with the real context, its helpers export and parse correctly, and its events stream."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from tabs import chat
from tests import _llm_support

llm_ctx, llm = _llm_support.llm_ctx, _llm_support.llm  # session fixtures (the converted SmolLM2)

HISTORY = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is **Paris**."},
]


def test_tab_builds_without_loading_a_model(ctx):
    import warnings

    import gradio as gr

    with warnings.catch_warnings(record=True) as caught, gr.Blocks() as demo:
        warnings.simplefilter("always")
        chat.TAB.build(ctx)
    assert not [w for w in caught if "arguments for function" in str(w.message)]  # gr.Request params are injected
    assert chat.TAB.title == "Chat"
    labels = {getattr(b, "label", None) for b in demo.blocks.values()}
    assert {"Model", "Engine", "Conversation", "Active adapter (switching does not reload the base model)"} <= labels
    assert not ctx.residency.is_registered("chat:smollm2-135m")  # building the UI loads nothing


def test_model_choices_mark_missing_models(ctx):
    choices = dict((v, k) for k, v in chat.model_choices(ctx.backends.llm))
    assert "not on this machine" not in choices["smollm2-135m"]
    assert "not on this machine" in choices["llama-3.1-8b-instruct"]


def test_parse_stop_strings():
    assert chat.parse_stop("</s>\n\n  \nUser:\\n") == ("</s>", "User:\n")
    assert chat.parse_stop("") == ()


def test_export_markdown_and_json(ctx):
    md_path = chat.export_conversation(ctx, HISTORY, "markdown", {"model": "smollm2-135m"})
    text = Path(md_path).read_text(encoding="utf-8")
    assert "**User:**" in text and "The capital of France is **Paris**." in text
    assert md_path.startswith(str(ctx.settings.outputs_dir))
    js_path = chat.export_conversation(ctx, HISTORY, "json", {"model": "smollm2-135m"})
    data = json.loads(Path(js_path).read_text(encoding="utf-8"))
    assert data["messages"] == HISTORY and data["meta"]["model"] == "smollm2-135m"
    with pytest.raises(ValueError, match="empty"):
        chat.export_conversation(ctx, [], "json", {})


def test_stats_line():
    from backends.llm.backend import GenerationStats

    line = chat.stats_line(GenerationStats(new_tokens=12, decode_tokens_per_s=20.5, ttft_s=0.3, decoder="eager",
                                           finish_reason="eos"))  # fmt: skip
    assert line == "12 tokens · 20.5 tok/s · first token 0.30 s · decoder: eager · finished: eos"


def _events(ctx):
    import gradio as gr

    with gr.Blocks() as demo:
        chat.TAB.build(ctx)
    return {f.fn.__name__: f.fn for f in demo.fns.values() if getattr(f, "fn", None)}


def test_send_streams_the_reply_and_stop_ends_it(llm_ctx, llm):
    import gradio as gr

    fns = _events(llm_ctx)
    req = SimpleNamespace(session_hash="s1")
    for bad in ("   ", "a\x00b"):
        with pytest.raises(gr.Error):
            fns["add_user"](bad, [], req)
    _, hist, _ = fns["add_user"]("What is the capital of France?", [], req)
    args = [hist, "smollm2-135m", "In-process (transformers)", "", "", "", 4096, "", 0.0, 0.95, 16, 1.0, "", req]
    steps = list(fns["respond"](*args))
    assert len(steps) >= 3  # streamed, not one final update
    shown, new_hist, status = steps[-1]
    assert shown == new_hist
    assert new_hist[-1]["role"] == "assistant" and "Paris" in new_hist[-1]["content"]
    assert "decoder: eager" in status

    _, hist2, _ = fns["add_user"]("Tell me a long story.", new_hist, req)
    fns["stop_generation"](req)  # Stop pressed while the reply waits in the GPU queue: it ends after one token
    *_, (_, _, status) = fns["respond"](hist2, *args[1:])
    assert "1 tokens" in status and "cancelled" in status
