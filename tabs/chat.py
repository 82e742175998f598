"""Chat tab: stream replies from a local model (through the residency manager) or an OpenAI-compatible server.

One source of truth: the conversation lives in a `gr.State` as plain {"role", "content"} dicts and the Chatbot only
displays it; every path that changes the view (its trash icon, retry, undo and edit buttons, Clear, reopening a
saved conversation) changes the state. Stop sets a per-session flag (a gr.State) that the backend checks before
every token; each new request (send, regenerate, continue, edit) clears it first, so Regenerate after Stop works.
Generation defaults follow the model's size (a 135M model gets a low temperature and a repetition penalty).
"""

# No `from __future__ import annotations` here: Gradio finds `evt: gr.EditData` parameters through
# typing.get_type_hints, which needs the real annotation objects.
import json
import logging
import time
from typing import Any

import gradio as gr

from studio.context import StudioContext, Tab
from tabs import chat_saved
from tabs._session import StopFlag, bind, on_page_load

log = logging.getLogger(__name__)
BASE = "(base model, no adapter)"
ENGINES = {"In-process (transformers)": "transformers", "OpenAI-compatible server": "openai"}


# ---- pure helpers (tested without a browser) ---------------------------------------------------------------------
def parse_stop(text: str) -> tuple[str, ...]:
    """One stop string per line; `\\n` may be written literally."""
    return tuple(s.replace("\\n", "\n") for s in (text or "").splitlines() if s.strip())


def to_markdown(history: list[dict[str, str]], title: str = "Conversation") -> str:
    parts = [f"# {title}", ""]
    for m in history:
        parts += [f"**{m['role'].capitalize()}:**", "", m["content"], ""]
    return "\n".join(parts)


def to_json(history: list[dict[str, str]], meta: dict[str, Any]) -> str:
    return json.dumps({"meta": meta, "messages": history}, indent=2, ensure_ascii=False)


def stats_line(stats: Any, wall_first_s: float | None = None) -> str:
    """Tokens, speed and first-token time; `wall_first_s` (from the click) reveals a load the decoder did not see."""
    if stats is None:
        return ""
    speed = f" · {stats.decode_tokens_per_s:.1f} tok/s" if stats.decode_tokens_per_s else ""
    first = f" · first token {stats.ttft_s:.2f} s" if stats.ttft_s else ""
    load_s = max(getattr(stats, "load_s", 0.0), (wall_first_s or 0.0) - (stats.ttft_s or 0.0))
    if load_s >= 1.0:
        first += f" (after {load_s:.0f} s loading the model)"
    weights = f" · weights: {stats.weights}" if getattr(stats, "weights", "") else ""
    if getattr(stats, "reused_tokens", 0):
        first += f" ({stats.reused_tokens:,} prompt tokens reused)"
    return (f"{stats.new_tokens} tokens{speed}{first}{weights} · decoder: {stats.decoder} · "
            f"finished: {stats.finish_reason}")  # fmt: skip


def context_meter(used: int, limit: int) -> str:
    frac = min(1.0, used / max(1, limit))
    bar = "▓" * round(frac * 20) + "░" * (20 - round(frac * 20))
    warn = " · nearly full: the oldest turns will be trimmed" if frac > 0.85 else ""
    return f"Context {bar} {used} / {limit} tokens ({frac:.0%}){warn}"


def model_choices(backend: Any) -> list[tuple[str, str]]:
    return [(s.title + ("" if present else " — not on this machine"), s.id) for s, present in backend.chat_models()]


def export_conversation(ctx: StudioContext, history: list[dict[str, str]], fmt: str, meta: dict[str, Any]) -> str:
    """Write the conversation under outputs/chat/ atomically; return the file path."""
    from studio.safety import atomic_write_text, unguessable_stamp

    if not history:
        raise ValueError("Nothing to export yet: the conversation is empty.")
    stamp = unguessable_stamp()  # random part: two exports never collide and no other user can guess the name
    path = ctx.settings.outputs_dir / "chat" / f"chat-{stamp}.{'md' if fmt == 'markdown' else 'json'}"
    atomic_write_text(path, to_markdown(history) if fmt == "markdown" else to_json(history, meta))
    return str(path)


# ---- handlers (module level; the backend is bound with tabs._session.bind) -----------------------------------------
def add_user(text, hist, flag, conv_id):
    text = (text or "").strip()
    if not text:
        raise gr.Error("The message is empty: type something to send.")
    if "\x00" in text:
        raise gr.Error("The message contains a null byte (\\x00); remove it and send again.")
    flag.clear()
    hist = [*hist, {"role": "user", "content": text}]
    return "", hist, hist, conv_id or chat_saved.new_id()


def drop_last_reply(hist, flag):
    flag.clear()  # a new request: Stop pressed earlier must not cancel it
    while hist and hist[-1]["role"] == "assistant":
        hist = hist[:-1]
    if not hist:
        raise gr.Error("Nothing to regenerate yet.")
    return hist, hist


def check_continue(hist, flag):
    if not hist or hist[-1]["role"] != "assistant":
        raise gr.Error("Nothing to continue: the last message is not a reply. Send a message first.")
    flag.clear()


def edit_message(hist, flag, evt: gr.EditData):
    """Edit-and-resend: the edited user message replaces the original and everything after it is dropped."""
    i = evt.index[0] if isinstance(evt.index, list | tuple) else evt.index
    if not isinstance(i, int) or not 0 <= i < len(hist) or hist[i]["role"] != "user":
        raise gr.Error("Only your own messages can be edited.")
    text = evt.value if isinstance(evt.value, str) else str(evt.value)
    if not text.strip():
        raise gr.Error("The edited message is empty: type something, or press Undo to remove it.")
    flag.clear()
    hist = [*hist[:i], {"role": "user", "content": text.strip()}]
    return hist, hist


def undo_last(hist):
    while hist and hist[-1]["role"] == "assistant":
        hist = hist[:-1]
    return hist[:-1], hist[:-1]


def clear_conversation():
    return [], [], "", None, None, ""


def stop_generation(flag) -> None:
    flag.set()


def waiting_note(ctx: StudioContext) -> str:
    """Shown while the reply waits in the queue: what holds it and for about how long."""
    from studio.waiting import explain_wait

    return explain_wait(ctx, ctx.queues.queue_id("Chat"))


def configure(backend, model_v, engine_v, url, api_model_v, key, ctx_len):
    """This session's engine, URL, key and model, built per call from its own inputs: never shared."""
    return backend.session_config(
        model_id=model_v, engine=ENGINES[engine_v], base_url=(url or "").strip(),
        api_model=(api_model_v or "").strip(), api_key=key or "", max_context_tokens=int(ctx_len or 4096),
    )  # fmt: skip


def _stream(ctx, backend, hist, flag, settings, *, continuing: bool):
    """(chatbot, history, note, meter) updates for one reply."""
    from backends.llm import GenerationOptions

    model_v, engine_v, url, api_model_v, key, ctx_len, sys_v, temp, top, n, rp, stop_v = settings
    try:
        session = configure(backend, model_v, engine_v, url, api_model_v, key, ctx_len)
        opts = GenerationOptions(system_prompt=sys_v or "", temperature=float(temp), top_p=float(top),
                                 max_new_tokens=int(n), repetition_penalty=float(rp), stop=parse_stop(stop_v))  # fmt: skip
        loading = backend.load_note(session)
        if loading:
            yield hist, hist, f"⏳ {loading}", gr.skip()
        base = hist[:-1] if continuing else hist
        shown, trim_note, t0, wall_first, metered = list(hist), "", time.perf_counter(), None, None
        with ctx.queues.hold(ctx.queues.queue_id("Chat"), "a chat reply (Chat)"):
            for update in backend.chat(hist, opts, cancel=flag, config=session, continuing=continuing):
                trim_note = update.note or trim_note
                if update.delta and wall_first is None:
                    wall_first = time.perf_counter() - t0
                shown = [*base, {"role": "assistant", "content": update.text}]
                status = f"⚠️ {trim_note}" if trim_note else ("" if not loading or update.text else f"⏳ {loading}")
                meter, st = gr.skip(), update.stats
                if update.done:
                    status = "  \n".join(x for x in (status, stats_line(st, wall_first)) if x)
                if st and st.prompt_tokens and (update.done or metered is None or st.new_tokens - metered >= 32):
                    metered = st.new_tokens  # the meter moves while the reply streams (every 32 tokens)
                    meter = context_meter(st.prompt_tokens + st.new_tokens, session.max_context_tokens)
                yield shown, shown, status, meter
    except (ValueError, OSError) as e:  # user mistakes and missing/corrupt files: the message says the fix
        log.info("chat refused: %s", e)
        raise gr.Error(str(e)) from None
    except Exception as e:  # anything else (engine down, out of memory): short message, details in the log
        log.exception("chat generation failed")
        raise gr.Error(f"{type(e).__name__}: {e}") from None


def respond(ctx, backend, hist, flag, *settings):
    if not hist or hist[-1]["role"] != "user":
        raise gr.Error("Send a message first.")
    yield from _stream(ctx, backend, hist, flag, settings, continuing=False)


def continue_reply(ctx, backend, hist, flag, *settings):
    yield from _stream(ctx, backend, hist, flag, settings, continuing=True)


def apply_size_defaults(backend, model_v):
    """Model changed: temperature, top-p, repetition penalty and max tokens follow its size."""
    o = backend.recommended_options(model_v)
    return o.temperature, o.top_p, o.max_new_tokens, o.repetition_penalty


# ---- UI sections ---------------------------------------------------------------------------------------------------
def _build_engine(backend) -> dict[str, Any]:
    cfg = backend.config
    with gr.Row():
        model = gr.Dropdown(model_choices(backend), value=cfg.model_id, label="Model", scale=3)
        engine = gr.Radio(list(ENGINES), value="In-process (transformers)", label="Engine", scale=2)
    with gr.Accordion("OpenAI-compatible server", open=False), gr.Row():
        base_url = gr.Textbox(cfg.base_url, label="Base URL", placeholder="http://127.0.0.1:11434/v1")
        api_model = gr.Textbox(cfg.api_model, label="Model name on the server", placeholder="llama3.1:8b")
        api_key = gr.Textbox("", label="API key (optional)", type="password")
    return {"model": model, "engine": engine, "base_url": base_url, "api_model": api_model, "api_key": api_key}


def _build_generation(backend) -> dict[str, Any]:
    cfg, rec = backend.config, backend.recommended_options()
    with gr.Accordion("Generation (defaults follow the model's size)", open=False):
        system = gr.Textbox("You are a helpful assistant.", label="System prompt", lines=2)
        with gr.Row():
            temperature = gr.Slider(0.0, 2.0, value=rec.temperature, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1.0, value=rec.top_p, step=0.05, label="Top-p")
            max_new = gr.Slider(16, 4096, value=rec.max_new_tokens, step=16, label="Max new tokens")
            rep = gr.Slider(1.0, 2.0, value=rec.repetition_penalty, step=0.05, label="Repetition penalty")
        with gr.Row():
            stop = gr.Textbox("", label="Stop strings (one per line)", lines=2)
            context = gr.Number(cfg.max_context_tokens, label="Context length (tokens)", precision=0)
    return {"system": system, "temperature": temperature, "top_p": top_p, "max_new": max_new, "rep": rep,
            "stop": stop, "context": context}  # fmt: skip


def _build_adapters(ctx: StudioContext, backend, engine_inputs: list[Any]) -> Any:
    with gr.Accordion("LoRA adapter", open=False):
        with gr.Row():
            adapter_path = gr.Dropdown([], label="Adapter folder (under the data or models folder)",
                                       allow_custom_value=True, scale=3)  # fmt: skip
            refresh = gr.Button("Refresh", size="sm", scale=0)
            attach = gr.Button("Attach", scale=0)
        active = gr.Dropdown([BASE], value=BASE, label="Active adapter (switching does not reload the base model)")
    note = gr.Markdown("")

    def refresh_adapters():
        root = ctx.settings.data_dir
        paths = [str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in backend.available_adapters()]
        return gr.update(choices=paths, value=paths[0] if paths else None)

    def attach_adapter(path_v, *engine_v):
        if not path_v:
            raise gr.Error("Choose an adapter folder first (Fine-tune tab outputs appear here after Refresh).")
        try:
            session = configure(backend, *engine_v)
            folder = path_v if path_v.startswith("/") else str(ctx.settings.data_dir / path_v)
            name = backend.attach_adapter(folder, model_id=session.model_id)
        except (ValueError, OSError) as e:
            raise gr.Error(str(e)) from None
        names, _ = backend.adapter_status(session.model_id)
        return gr.update(choices=[BASE, *names], value=name), f"Attached adapter **{name}**."

    def switch(name, model_v):
        try:
            backend.switch_adapter(None if name in (None, BASE) else name, model_id=model_v)
        except ValueError as e:
            raise gr.Error(str(e)) from None
        return f"Active: **{name}**."

    refresh.click(refresh_adapters, None, adapter_path)
    attach.click(attach_adapter, [adapter_path, *engine_inputs], [active, note], **ctx.queues.event_kwargs("Chat"))
    active.change(switch, [active, engine_inputs[0]], note)
    return note


def _build_saved(ctx: StudioContext, history, chatbot, conv_id, browser, meter) -> Any:
    data = ctx.settings.data_dir
    with gr.Accordion("Saved conversations (kept in this browser's list, saved after every reply)", open=False):
        with gr.Row():
            pick = gr.Dropdown([], label="Conversation", scale=3)
            open_btn = gr.Button("Open", scale=0)
            new_btn = gr.Button("New chat", scale=0)
        with gr.Row():
            title = gr.Textbox(label="Rename to", scale=3)
            rename_btn = gr.Button("Rename", scale=0)
            delete_btn = gr.Button("Delete", variant="stop", scale=0)

    def listing(bid):
        bid = chat_saved.ensure_browser_id(bid)
        return bid, gr.update(choices=chat_saved.choices(data, bid))

    def reopen(bid, cid):
        if not cid:
            raise gr.Error("Pick a conversation in the list first.")
        try:
            item = chat_saved.load(data, bid, cid)
        except ValueError as e:
            raise gr.Error(str(e)) from None
        return item.messages, item.messages, cid, item.title, ""

    def do_rename(bid, cid, new):
        try:
            chat_saved.rename(data, bid, cid or "", new)
        except ValueError as e:
            raise gr.Error(str(e)) from None
        return gr.update(choices=chat_saved.choices(data, bid), value=cid)

    def do_delete(bid, cid, current):
        if not cid:
            raise gr.Error("Pick a conversation to delete first.")
        chat_saved.delete(data, bid, cid)
        keep = current if current != cid else None
        return gr.update(choices=chat_saved.choices(data, bid), value=None), keep

    on_page_load(listing, browser, [browser, pick], queue=False)
    open_btn.click(reopen, [browser, pick], [history, chatbot, conv_id, title, meter], queue=False)
    new_btn.click(clear_conversation, None, [history, chatbot, meter, conv_id, pick, title], queue=False)
    rename_btn.click(do_rename, [browser, pick, title], pick, queue=False)
    delete_btn.click(do_delete, [browser, pick, conv_id], [pick, conv_id], queue=False)
    return pick


def autosave(ctx: StudioContext, bid, cid, hist):
    if not hist or not cid:
        return gr.skip()
    try:
        chat_saved.save(ctx.settings.data_dir, chat_saved.ensure_browser_id(bid), cid, hist)
    except (ValueError, OSError) as e:
        log.warning("could not save the conversation: %s", e)
        return gr.skip()
    return gr.update(choices=chat_saved.choices(ctx.settings.data_dir, bid), value=cid)


def build(ctx: StudioContext) -> None:
    backend = ctx.backends.llm
    gr.Markdown(
        "## Chat\nThe offline default is the real **SmolLM2-135M-Instruct** (shipped by a pip package). Bigger models "
        "come from the Models tab (4-bit on the GPU above ~3B parameters), or point the engine at an Ollama / "
        "llama.cpp / vLLM server. Small models get cautious defaults (low temperature, repetition penalty)."
    )
    eng = _build_engine(backend)
    gen = _build_generation(backend)
    engine_inputs = [eng["model"], eng["engine"], eng["base_url"], eng["api_model"], eng["api_key"], gen["context"]]
    note = _build_adapters(ctx, backend, engine_inputs)
    chatbot = gr.Chatbot(height=460, label="Conversation", editable="user")
    history, flag, conv_id = gr.State([]), gr.State(StopFlag()), gr.State(None)
    browser = gr.BrowserState("", storage_key="onecard-chat-browser")
    msg = gr.Textbox(placeholder="Type a message: Enter sends, Shift+Enter starts a new line", show_label=False,
                     lines=1, max_lines=8)  # fmt: skip
    with gr.Row():
        send = gr.Button("Send", variant="primary")
        stop_btn = gr.Button("Stop")
        regen = gr.Button("Regenerate")
        cont = gr.Button("Continue")
        clear = gr.Button("Clear")
        export_md = gr.Button("Export Markdown")
        export_js = gr.Button("Export JSON")
    meter = gr.Markdown("")
    export_file = gr.File(label="Exported conversation", interactive=False)
    pick = _build_saved(ctx, history, chatbot, conv_id, browser, meter)
    _wire(ctx, backend, locals() | eng | gen)


def _wire(ctx: StudioContext, backend, c: dict[str, Any]) -> None:
    settings = [c[k] for k in ("model", "engine", "base_url", "api_model", "api_key", "context", "system",
                               "temperature", "top_p", "max_new", "rep", "stop")]  # fmt: skip
    history, chatbot, flag, note, meter = c["history"], c["chatbot"], c["flag"], c["note"], c["meter"]
    gen_in, gen_out = [history, flag, *settings], [chatbot, history, note, meter]
    queue = ctx.queues.event_kwargs("Chat")
    reply, more = bind(respond, ctx, backend), bind(continue_reply, ctx, backend)
    save = (bind(autosave, ctx), [c["browser"], c["conv_id"], history], c["pick"])
    wait = bind(waiting_note, ctx)
    for i, trigger in enumerate((c["send"].click, c["msg"].submit)):  # Send is named for scripts
        first = trigger(add_user, [c["msg"], history, flag, c["conv_id"]], [c["msg"], history, chatbot, c["conv_id"]],
                        queue=False, api_name=None if i else "chat_add_user")  # fmt: skip
        first.then(wait, None, note, queue=False)
        first.then(reply, gen_in, gen_out, api_name=None if i else "chat_respond", **queue).then(*save, queue=False)
    for trigger in (c["regen"].click, chatbot.retry):
        trigger(drop_last_reply, [history, flag], [history, chatbot], queue=False).then(
            reply, gen_in, gen_out, **queue
        ).then(*save, queue=False)
    chatbot.edit(edit_message, [history, flag], [history, chatbot], queue=False).then(
        reply, gen_in, gen_out, **queue
    ).then(*save, queue=False)
    c["cont"].click(check_continue, [history, flag], None, queue=False).success(more, gen_in, gen_out, **queue).then(
        *save, queue=False
    )
    chatbot.undo(undo_last, history, [history, chatbot], queue=False).then(*save, queue=False)
    clear_out = [history, chatbot, meter, c["conv_id"], c["pick"], note]
    chatbot.clear(clear_conversation, None, clear_out, queue=False)
    c["clear"].click(clear_conversation, None, clear_out, queue=False)
    c["stop_btn"].click(stop_generation, flag, None, queue=False)
    c["export_md"].click(bind(export, ctx, "markdown"), [history, c["model"], c["engine"]], c["export_file"])
    c["export_js"].click(bind(export, ctx, "json"), [history, c["model"], c["engine"]], c["export_file"])
    c["model"].change(bind(apply_size_defaults, backend), c["model"],
                      [c["temperature"], c["top_p"], c["max_new"], c["rep"]], queue=False)  # fmt: skip


def export(ctx, fmt, hist, model_v, engine_v):
    """This session's conversation with this session's model and engine in its metadata."""
    try:
        return export_conversation(ctx, hist, fmt, {"model": model_v, "engine": ENGINES.get(engine_v, engine_v)})
    except ValueError as e:
        raise gr.Error(str(e)) from None


TAB = Tab("Chat", build)
