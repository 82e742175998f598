"""Chat tab: it builds with the real context, its helpers export and parse correctly, and its events stream."""

from __future__ import annotations

import json
from pathlib import Path

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

    stats = GenerationStats(new_tokens=12, decode_tokens_per_s=20.5, ttft_s=0.3, decoder="eager", finish_reason="eos")
    line = chat.stats_line(stats)
    assert line == "12 tokens · 20.5 tok/s · first token 0.30 s · decoder: eager · finished: eos"
    assert "after 35 s loading the model" in chat.stats_line(stats, wall_first_s=35.3)  # not a bare "0.30 s"
    stats.reused_tokens = 2340
    assert "first token 0.30 s (2,340 prompt tokens reused)" in chat.stats_line(stats)


def _events(ctx):
    import gradio as gr

    with gr.Blocks() as demo:
        chat.TAB.build(ctx)
    return {f.fn.__name__: f.fn for f in demo.fns.values() if getattr(f, "fn", None)}


def test_send_streams_the_reply_and_stop_ends_it(llm_ctx, llm):
    """On the size defaults of the 135M model the answer says Paris; Stop ends a reply; Regenerate after Stop works."""
    import gradio as gr

    from tabs._session import StopFlag

    fns = _events(llm_ctx)
    flag = StopFlag()
    for bad in ("   ", "a\x00b"):
        with pytest.raises(gr.Error):
            fns["add_user"](bad, [], flag, None)
    _, hist, _, conv = fns["add_user"]("What is the capital of France?", [], flag, None)
    assert conv
    rec = llm.recommended_options("smollm2-135m")
    assert rec.temperature <= 0.3 and rec.repetition_penalty > 1.0 and rec.max_new_tokens <= 256
    settings = ["smollm2-135m", "In-process (transformers)", "", "", "", 4096, "You are a helpful assistant.",
                rec.temperature, rec.top_p, 48, rec.repetition_penalty, ""]  # fmt: skip
    steps = list(fns["respond"](hist, flag, *settings))
    assert len(steps) >= 3  # streamed, not one final update
    shown, new_hist, status, meter = steps[-1]
    assert shown == new_hist
    assert new_hist[-1]["role"] == "assistant" and "Paris" in new_hist[-1]["content"]
    assert "decoder: eager" in status and meter.startswith("Context ")
    live = [m for *_, m in steps[:-1] if isinstance(m, str)]
    assert live and live[0].startswith("Context ")  # the meter moves while the reply streams, not only at its end

    _, hist2, _, _ = fns["add_user"]("Tell me a long story.", new_hist, flag, conv)
    fns["stop_generation"](flag)  # Stop pressed while the reply waits in the GPU queue: it ends after one token
    *_, (_, stopped, status, _) = fns["respond"](hist2, flag, *settings)
    assert "1 tokens" in status and "cancelled" in status
    hist3, _ = fns["drop_last_reply"](stopped, flag)  # Regenerate after Stop: a full reply, not "cancelled"
    *_, (_, regen, status, _) = fns["respond"](hist3, flag, *settings[:9], 12, *settings[10:])
    assert "cancelled" not in status and len(regen[-1]["content"]) > 10

    fns["check_continue"](regen, flag)  # Continue: the same reply grows
    *_, (_, longer, _, _) = fns["continue_reply"](regen, flag, *settings[:9], 8, *settings[10:])
    assert len(longer) == len(regen) and longer[-1]["content"].startswith(regen[-1]["content"])
    with pytest.raises(gr.Error, match="Nothing to continue"):
        fns["check_continue"](hist3, flag)


def test_edit_undo_and_clear_change_the_one_conversation():
    from types import SimpleNamespace as NS

    from tabs._session import StopFlag

    hist = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]  # fmt: skip
    flag = StopFlag()
    flag.set()
    edited, shown = chat.edit_message(hist, flag, NS(index=0, value="a2"))
    assert edited == shown == [{"role": "user", "content": "a2"}] and not flag.is_set()
    assert chat.undo_last(hist)[0] == hist[:2]
    cleared = chat.clear_conversation()
    assert cleared[0] == [] and cleared[1] == [] and cleared[3] is None  # state, view and conversation id


def test_saved_conversations_roundtrip(tmp_path):
    from tabs import chat_saved as cs

    bid = cs.ensure_browser_id(None)
    cid = cs.new_id()
    cs.save(tmp_path, bid, cid, HISTORY)
    assert [s.title for s in cs.listing(tmp_path, bid)] == ["What is the capital of France?"]
    cs.rename(tmp_path, bid, cid, "Geography")
    assert cs.load(tmp_path, bid, cid).title == "Geography" and cs.load(tmp_path, bid, cid).messages == HISTORY
    assert cs.listing(tmp_path, cs.ensure_browser_id(None)) == []  # another browser sees nothing
    for bad in ("../x", "/etc/passwd", "AB"):
        with pytest.raises(ValueError):
            cs.save(tmp_path, bad, cid, HISTORY)
        with pytest.raises(ValueError):
            cs.load(tmp_path, bid, bad)
    cs.delete(tmp_path, bid, cid)
    assert cs.listing(tmp_path, bid) == []


def test_size_presets_and_names():
    from backends.llm.generate import options_for_size, params_from_name

    assert params_from_name("SmolLM2-135M-Instruct") == 0.135 and params_from_name("Llama-3.1-8B") == 8.0
    small, big = options_for_size(0.135), options_for_size(8.0)
    assert small.temperature < big.temperature and small.max_new_tokens < big.max_new_tokens
    assert small.repetition_penalty > 1.0


def test_waiting_explains_who_holds_the_queue():
    from studio.waiting import WorkQueues

    q = WorkQueues(has_gpu=True)
    assert q.why_wait("gpu") == ""
    with q.hold("gpu", "transcription (Audio)"):
        assert "waiting for the GPU: transcription (Audio)" in q.why_wait("gpu")
    with q.hold("gpu", "transcription (Audio)"):
        assert "s left" in q.why_wait("gpu", now=q.holders("gpu")[0].since) or "running" in q.why_wait("gpu")
    assert WorkQueues(has_gpu=False).event_kwargs("Chat")["concurrency_id"] == "cpu-chat"


def test_waiting_note_names_the_holder_from_another_tab(ctx):
    import gradio as gr

    from tabs._session import waiting_note

    q = ctx.queues.queue_id("Audio")
    assert isinstance(waiting_note(ctx, "Audio"), type(gr.skip()))  # free: the status is left alone
    with ctx.queues.hold(ctx.queues.queue_id("Chat"), "a chat reply (Chat)"), ctx.queues.hold(q, "transcription"):
        note = waiting_note(ctx, "Audio")
    assert "transcription" in note and ("the GPU" in note or "CPU slot" in note)
