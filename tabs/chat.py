"""Chat tab: stream replies from a local model (through the residency manager) or an OpenAI-compatible server.

The conversation lives in a `gr.State` as plain {"role", "content"} dicts; the Chatbot only displays it. Stop sets a
per-session flag that the backend checks before every token, so generation ends within one token and the GPU lease
is released at once.
"""

# No `from __future__ import annotations` here: Gradio finds `request: gr.Request` parameters through
# typing.get_type_hints, which cannot resolve the string "gr.Request" (gradio is imported inside build()).
import datetime as dt
import json
import logging
import threading
from typing import Any

from studio.context import StudioContext, Tab

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


def stats_line(stats: Any) -> str:
    if stats is None:
        return ""
    speed = f" · {stats.decode_tokens_per_s:.1f} tok/s" if stats.decode_tokens_per_s else ""
    first = f" · first token {stats.ttft_s:.2f} s" if stats.ttft_s else ""
    return f"{stats.new_tokens} tokens{speed}{first} · decoder: {stats.decoder} · finished: {stats.finish_reason}"


def model_choices(backend: Any) -> list[tuple[str, str]]:
    return [(s.title + ("" if present else " — not on this machine"), s.id) for s, present in backend.chat_models()]


def export_conversation(ctx: StudioContext, history: list[dict[str, str]], fmt: str, meta: dict[str, Any]) -> str:
    """Write the conversation under outputs/chat/ atomically; return the file path."""
    from studio.safety import atomic_write_text

    if not history:
        raise ValueError("Nothing to export yet: the conversation is empty.")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")[:-3]  # milliseconds: two exports never collide
    path = ctx.settings.outputs_dir / "chat" / f"chat-{stamp}.{'md' if fmt == 'markdown' else 'json'}"
    atomic_write_text(path, to_markdown(history) if fmt == "markdown" else to_json(history, meta))
    return str(path)


# ---- UI ---------------------------------------------------------------------------------------------------------
def build(ctx: StudioContext) -> None:
    import gradio as gr

    backend = ctx.backends.llm
    cfg = backend.config
    cancel_flags: dict[str, threading.Event] = {}  # per browser session

    gr.Markdown(
        "## Chat\nThe offline default is the real **SmolLM2-135M-Instruct** (shipped by a pip package). Bigger models "
        "come from the Models tab (4-bit on the GPU above ~3B parameters), or point the engine at an Ollama / "
        "llama.cpp / vLLM server."
    )
    with gr.Row():
        model = gr.Dropdown(model_choices(backend), value=cfg.model_id, label="Model", scale=3)
        engine = gr.Radio(list(ENGINES), value="In-process (transformers)", label="Engine", scale=2)
    with gr.Accordion("OpenAI-compatible server", open=False), gr.Row():
        base_url = gr.Textbox(cfg.base_url, label="Base URL", placeholder="http://127.0.0.1:11434/v1")
        api_model = gr.Textbox(cfg.api_model, label="Model name on the server", placeholder="llama3.1:8b")
        api_key = gr.Textbox("", label="API key (optional)", type="password")
    with gr.Accordion("Generation", open=False):
        system = gr.Textbox("You are a helpful assistant.", label="System prompt", lines=2)
        with gr.Row():
            temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top-p")
            max_new = gr.Slider(16, 4096, value=512, step=16, label="Max new tokens")
            rep = gr.Slider(1.0, 2.0, value=1.0, step=0.05, label="Repetition penalty")
        with gr.Row():
            stop = gr.Textbox("", label="Stop strings (one per line)", lines=2)
            context = gr.Number(cfg.max_context_tokens, label="Context length (tokens)", precision=0)
    with gr.Accordion("LoRA adapter", open=False):
        with gr.Row():
            adapter_path = gr.Dropdown([], label="Adapter folder (under the data or models folder)",
                                       allow_custom_value=True, scale=3)  # fmt: skip
            refresh = gr.Button("Refresh", size="sm", scale=0)
            attach = gr.Button("Attach", scale=0)
        active = gr.Dropdown([BASE], value=BASE, label="Active adapter (switching does not reload the base model)")
    note = gr.Markdown("")
    chatbot = gr.Chatbot(height=460, label="Conversation")
    history = gr.State([])
    msg = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, lines=2)
    with gr.Row():
        send = gr.Button("Send", variant="primary")
        stop_btn = gr.Button("Stop")
        regen = gr.Button("Regenerate")
        clear = gr.Button("Clear")
        export_md = gr.Button("Export Markdown")
        export_js = gr.Button("Export JSON")
    export_file = gr.File(label="Exported conversation", interactive=False)

    def flag(request: gr.Request) -> threading.Event:
        key = getattr(request, "session_hash", None) or "default"
        return cancel_flags.setdefault(key, threading.Event())

    def add_user(text, hist, request: gr.Request):
        text = (text or "").strip()
        if not text:
            raise gr.Error("The message is empty: type something to send.")
        if "\x00" in text:
            raise gr.Error("The message contains a null byte (\\x00); remove it and send again.")
        flag(request).clear()
        hist = [*hist, {"role": "user", "content": text}]
        return "", hist, hist

    def configure(model_v, engine_v, url, api_model_v, key, ctx_len):
        changes = {"model_id": model_v, "engine": ENGINES[engine_v], "base_url": (url or "").strip(),
                   "api_model": (api_model_v or "").strip(), "api_key": key or "",
                   "max_context_tokens": int(ctx_len or 4096)}  # fmt: skip
        if any(getattr(backend.config, k) != v for k, v in changes.items()):
            backend.configure(**changes)

    def respond(hist, model_v, engine_v, url, api_model_v, key, ctx_len, sys_v, temp, top, n, rp, stop_v,
                request: gr.Request):  # fmt: skip
        if not hist or hist[-1]["role"] != "user":
            raise gr.Error("Send a message first.")
        from backends.llm import GenerationOptions

        try:
            configure(model_v, engine_v, url, api_model_v, key, ctx_len)
            opts = GenerationOptions(system_prompt=sys_v or "", temperature=float(temp), top_p=float(top),
                                     max_new_tokens=int(n), repetition_penalty=float(rp), stop=parse_stop(stop_v))  # fmt: skip
            shown, trim_note = list(hist), ""
            for update in backend.chat(hist, opts, cancel=flag(request)):
                trim_note = update.note or trim_note
                shown = [*hist, {"role": "assistant", "content": update.text}]
                status = f"⚠️ {trim_note}" if trim_note else ""
                if update.done:
                    status = "  \n".join(x for x in (status, stats_line(update.stats)) if x)
                yield shown, shown, status
        except (ValueError, OSError) as e:  # user mistakes and missing/corrupt files: the message says the fix
            raise gr.Error(str(e)) from None
        except Exception as e:  # anything else (engine down, out of memory): short message, details in the log
            log.exception("chat generation failed")
            raise gr.Error(f"{type(e).__name__}: {e}") from None

    def drop_last_reply(hist):
        while hist and hist[-1]["role"] == "assistant":
            hist = hist[:-1]
        if not hist:
            raise gr.Error("Nothing to regenerate yet.")
        return hist, hist

    def refresh_adapters():
        root = ctx.settings.data_dir
        paths = [str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in backend.available_adapters()]
        return gr.update(choices=paths, value=paths[0] if paths else None)

    def attach_adapter(path_v, model_v, engine_v, url, api_model_v, key, ctx_len):
        if not path_v:
            raise gr.Error("Choose an adapter folder first (Fine-tune tab outputs appear here after Refresh).")
        try:
            configure(model_v, engine_v, url, api_model_v, key, ctx_len)
            folder = path_v if path_v.startswith("/") else str(ctx.settings.data_dir / path_v)
            name = backend.attach_adapter(folder)
        except (ValueError, OSError) as e:
            raise gr.Error(str(e)) from None
        names, _ = backend.adapter_status()
        return gr.update(choices=[BASE, *names], value=name), f"Attached adapter **{name}**."

    def switch(name):
        try:
            backend.switch_adapter(None if name in (None, BASE) else name)
        except ValueError as e:
            raise gr.Error(str(e)) from None
        return f"Active: **{name}**."

    def export(hist, fmt):
        try:
            return export_conversation(
                ctx, hist, fmt, {"model": backend.config.model_id, "engine": backend.config.engine}
            )
        except ValueError as e:
            raise gr.Error(str(e)) from None

    gen_inputs = [history, model, engine, base_url, api_model, api_key, context, system, temperature, top_p, max_new,
                  rep, stop]  # fmt: skip
    gpu = {"concurrency_id": "gpu", "concurrency_limit": 1}
    for trigger in (send.click, msg.submit):
        trigger(add_user, [msg, history], [msg, history, chatbot], queue=False).then(
            respond, gen_inputs, [chatbot, history, note], **gpu
        )
    regen.click(drop_last_reply, history, [history, chatbot], queue=False).then(
        respond, gen_inputs, [chatbot, history, note], **gpu
    )

    def stop_generation(request: gr.Request) -> None:
        flag(request).set()

    stop_btn.click(stop_generation, None, None, queue=False)
    clear.click(lambda: ([], [], "", None), None, [history, chatbot, note, export_file], queue=False)
    export_md.click(lambda h: export(h, "markdown"), history, export_file)
    export_js.click(lambda h: export(h, "json"), history, export_file)
    refresh.click(refresh_adapters, None, adapter_path)
    attach.click(attach_adapter, [adapter_path, model, engine, base_url, api_model, api_key, context],
                 [active, note], **gpu)  # fmt: skip
    active.change(switch, active, note)


TAB = Tab("Chat", build)
