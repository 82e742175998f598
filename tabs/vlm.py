"""VLM tab: chat about images (several per message) and QLoRA on your own image-text pairs.

The conversation lives in a `gr.State` as {"role", "content", "images"} dicts with the uploaded files' paths; the
Chatbot only displays it. Images already in the history are not encoded again (the backend caches their features).
Stop sets a per-session flag that the backend checks before every token. Training runs as a background job; its
panel polls the job (no lock is held across yields) and the trained adapter appears in the adapter list.
"""

# No `from __future__ import annotations`: Gradio resolves `request: gr.Request` through get_type_hints.
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from studio.context import StudioContext, Tab

log = logging.getLogger(__name__)
BASE = "(base model, no adapter)"
DATASET_HELP = (
    "One JSON object per line, image paths relative to the JSONL file, e.g. "
    '`{"images": ["cats/1.png"], "conversations": [{"role": "user", "content": "What animal is this?"}, '
    '{"role": "assistant", "content": "A tabby cat."}]}`. The file must be inside the data folder.'
)


# ---- pure helpers (tested without a browser) ---------------------------------------------------------------------
def to_chatbot(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """State -> Chatbot messages: each image as its own file message, then the text."""
    shown: list[dict[str, Any]] = []
    for m in history:
        for p in m.get("images") or []:
            shown.append({"role": m["role"], "content": {"path": p}})
        if m.get("content"):
            shown.append({"role": m["role"], "content": m["content"]})
    return shown


def user_message(value: Any) -> dict[str, Any]:
    """MultimodalTextbox value -> a history message; refuses an empty prompt and null bytes."""
    value = value or {}
    text = (value.get("text") or "").strip()
    files = [f if isinstance(f, str) else f.get("path", "") for f in value.get("files") or []]
    if not text:
        raise ValueError("The message is empty: type a question about the image(s), e.g. 'What is in this picture?'.")
    if "\x00" in text:
        raise ValueError("The message contains a null byte (\\x00); remove it and send again.")
    return {"role": "user", "content": text, "images": [f for f in files if f]}


def to_markdown(history: list[dict[str, Any]]) -> str:
    parts = ["# VLM conversation", ""]
    for m in history:
        parts.append(f"**{m['role'].capitalize()}:**")
        parts += [f"![{Path(p).name}]({Path(p).name})" for p in m.get("images") or []]
        parts += ["", m.get("content", ""), ""]
    return "\n".join(parts)


def export_conversation(ctx: StudioContext, history: list[dict[str, Any]], fmt: str, meta: dict[str, Any]) -> str:
    """Write the conversation (with image file names) under outputs/vlm/ atomically; return the path."""
    from studio.safety import atomic_write_text, unguessable_stamp

    if not history:
        raise ValueError("Nothing to export yet: the conversation is empty.")
    stamp = unguessable_stamp()  # no other user can guess the file name
    path = ctx.settings.outputs_dir / "vlm" / f"vlm-{stamp}.{'md' if fmt == 'markdown' else 'json'}"
    if fmt == "markdown":
        text = to_markdown(history)
    else:
        msgs = [{**m, "images": [Path(p).name for p in m.get("images") or []]} for m in history]
        text = json.dumps({"meta": meta, "messages": msgs}, indent=2, ensure_ascii=False)
    atomic_write_text(path, text)
    return str(path)


def stats_line(stats: Any) -> str:
    if stats is None:
        return ""
    speed = f" · {stats.decode_tokens_per_s:.1f} tok/s" if stats.decode_tokens_per_s else ""
    return (f"{stats.new_tokens} tokens{speed} · first token {stats.ttft_s:.2f} s · {stats.images} image(s), "
            f"{stats.image_tokens} image tokens, {stats.images_encoded} encoded this turn · decoder: {stats.decoder} "
            f"· finished: {stats.finish_reason}")  # fmt: skip


def model_info(backend: Any, model_id: str) -> str:
    info = backend.describe(model_id)
    label = "**untrained demo model** (random weights: its answers are noise)" if info["demo"] else info["title"]
    return (f"Model: {label} · up to {info['max_images']} images per conversation · image setting: "
            f"{info['resolution']} · decoding: {info['decoder']}")  # fmt: skip


def dataset_path(ctx: StudioContext, name: str) -> Path:
    """A dataset file named relative to the data folder (never outside it)."""
    from studio.safety import contained_path

    data = Path(ctx.settings.data_dir)
    name = (name or "").strip()
    if not name:
        raise ValueError(f"Give the JSONL file's path inside {data}.")
    p = Path(name)
    if p.is_absolute():
        try:
            name = str(p.resolve().relative_to(data.resolve()))
        except ValueError:
            raise ValueError(f"The dataset must be inside the data folder {data}; copy it there.") from None
    return contained_path(data, name)


def training_report(result: Any) -> str:
    if result is None:
        return ""
    lines = [f"**{result.status}** after {result.steps_done} steps · adapter: `{result.adapter}`",
             f"dev loss before {result.dev_loss_before} → after {result.dev_loss_after}", "",
             "| example | question | before | after |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {a['example']} | {a['question']} | {a['before']} | {a['after']} |" for a in result.answers]
    return "\n".join(lines)


# ---- UI ---------------------------------------------------------------------------------------------------------
def build(ctx: StudioContext) -> None:
    import gradio as gr

    from backends.vlm import ImageOptions, VLMError, VLMTrainConfig

    backend = ctx.backends.vlm
    cancel_flags: dict[str, threading.Event] = {}
    choices = [(s.title + ("" if ok else " — download it in the Models tab"), s.id) for s, ok in backend.vlm_models()]

    gr.Markdown(
        "## VLM\nChat about images with LLaVA 1.5 / NeXT / OneVision, Qwen-VL or SmolVLM (4-bit language model, "
        "16-bit vision tower). Offline the model is a tiny **untrained demo model** built from a config; real models "
        "come from the Models tab."
    )
    with gr.Row():
        model = gr.Dropdown(choices, value=backend.config.model_id, label="Model", scale=3)
        max_side = gr.Slider(112, 4096, value=1344, step=16, label="Image max side (px)", scale=2)
        max_tokens = gr.Number(0, label="Image token budget (0 = model default)", precision=0, scale=1)
    info = gr.Markdown(model_info(backend, backend.config.model_id))
    with gr.Accordion("Generation", open=False), gr.Row():
        system = gr.Textbox("", label="System prompt", lines=2)
        temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)")
        top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top-p")
        max_new = gr.Slider(8, 2048, value=256, step=8, label="Max new tokens")
    with gr.Accordion("Adapter", open=False), gr.Row():
        adapter = gr.Dropdown([BASE, *backend.available_adapters()], value=BASE, label="Active adapter")
        refresh = gr.Button("Refresh", size="sm", scale=0)
    note = gr.Markdown("")
    chatbot = gr.Chatbot(height=420, label="Conversation")
    history = gr.State([])
    box = gr.MultimodalTextbox(file_types=["image"], file_count="multiple", show_label=False,
                               placeholder="Ask about your images (attach one or more)")  # fmt: skip
    with gr.Row():
        stop_btn = gr.Button("Stop")
        regen = gr.Button("Regenerate")
        clear = gr.Button("Clear")
        export_md = gr.Button("Export Markdown")
        export_js = gr.Button("Export JSON")
    export_file = gr.File(label="Exported conversation", interactive=False)
    with gr.Accordion("Train an adapter (QLoRA on image-text pairs)", open=False):
        gr.Markdown(DATASET_HELP)
        with gr.Row():
            ds = gr.Textbox("", label="Dataset JSONL (inside the data folder)", scale=3)
            out_name = gr.Textbox("vlm-lora", label="Adapter name")
            steps = gr.Number(200, label="Steps", precision=0)
            lr = gr.Number(2e-4, label="LoRA learning rate")
            rank = gr.Number(16, label="LoRA rank", precision=0)
        with gr.Row():
            train_btn = gr.Button("Train", variant="primary")
            cancel_btn = gr.Button("Cancel training")
        train_status = gr.Markdown("")
    job_id = gr.State("")

    def flag(request: gr.Request) -> threading.Event:
        return cancel_flags.setdefault(getattr(request, "session_hash", None) or "default", threading.Event())

    def add_user(value, hist, request: gr.Request):
        try:
            msg = user_message(value)
        except ValueError as e:
            raise gr.Error(str(e)) from None
        flag(request).clear()
        hist = [*hist, msg]
        return gr.update(value=None), hist, to_chatbot(hist)

    def respond(hist, model_v, side, tokens, sys_v, temp, top, n, request: gr.Request):
        from backends.llm import GenerationOptions

        if not hist or hist[-1]["role"] != "user":
            raise gr.Error("Send a message first.")
        try:
            if model_v and model_v != backend.config.model_id:
                backend.configure(model_id=model_v)  # adapters and training follow the chosen model too
            opts = GenerationOptions(system_prompt=sys_v or "", temperature=float(temp), top_p=float(top),
                                     max_new_tokens=int(n))  # fmt: skip
            img = ImageOptions(max_side=int(side), max_tokens=int(tokens or 0))
            status = ""
            for u in backend.chat(hist, opts, images=img, cancel=flag(request)):
                shown = [*hist, {"role": "assistant", "content": u.text}]
                status = f"⚠️ {u.note}" if u.note else status
                if u.done:
                    status = "  \n".join(x for x in (status, stats_line(u.stats)) if x)
                yield shown, to_chatbot(shown), status
        except (ValueError, OSError) as e:
            raise gr.Error(str(e)) from None
        except Exception as e:
            log.exception("VLM generation failed")
            raise gr.Error(f"{type(e).__name__}: {e}") from None

    def drop_last_reply(hist):
        while hist and hist[-1]["role"] == "assistant":
            hist = hist[:-1]
        if not hist:
            raise gr.Error("Nothing to regenerate yet.")
        return hist, to_chatbot(hist)

    def pick_model(model_v):
        try:
            backend.configure(model_id=model_v)
            return model_info(backend, model_v)
        except (ValueError, OSError) as e:
            raise gr.Error(str(e)) from None

    def pick_adapter(name):
        try:
            backend.switch_adapter(None if name in (None, BASE) else name)
        except (ValueError, OSError) as e:
            raise gr.Error(str(e)) from None
        return f"Active adapter: **{name}**."

    def export(hist, fmt):
        try:
            return export_conversation(ctx, hist, fmt, {"model": backend.config.model_id})
        except ValueError as e:
            raise gr.Error(str(e)) from None

    def start_training(ds_v, name_v, steps_v, lr_v, rank_v, side):
        try:
            cfg = VLMTrainConfig(dataset=dataset_path(ctx, ds_v), output_name=(name_v or "").strip(),
                                 steps=int(steps_v), learning_rate=float(lr_v), rank=int(rank_v),
                                 image_max_side=int(side))  # fmt: skip
            job = backend.submit_training(cfg)
        except (VLMError, ValueError, OSError) as e:
            raise gr.Error(str(e)) from None
        return job.id

    def follow(jid):
        job = ctx.jobs.get(jid) if jid else None
        while job is not None:
            done = job.is_finished
            text = f"{job.status} · {job.progress:.0%} · {job.message}"
            if done:
                text = training_report(job.result) or f"**{job.status}** {job.error or ''}"
                yield text, gr.update(choices=[BASE, *backend.available_adapters()])
                return
            yield text, gr.update()
            time.sleep(1.0)

    gpu = {"concurrency_id": "gpu", "concurrency_limit": 1}
    gen_inputs = [history, model, max_side, max_tokens, system, temperature, top_p, max_new]
    box.submit(add_user, [box, history], [box, history, chatbot], queue=False).then(
        respond, gen_inputs, [history, chatbot, note], **gpu
    )
    regen.click(drop_last_reply, history, [history, chatbot], queue=False).then(
        respond, gen_inputs, [history, chatbot, note], **gpu
    )

    def stop_generation(request: gr.Request) -> None:
        flag(request).set()

    stop_btn.click(stop_generation, None, None, queue=False)
    clear.click(lambda: ([], [], "", None), None, [history, chatbot, note, export_file], queue=False)
    export_md.click(lambda h: export(h, "markdown"), history, export_file)
    export_js.click(lambda h: export(h, "json"), history, export_file)
    model.change(pick_model, model, info)
    refresh.click(lambda: gr.update(choices=[BASE, *backend.available_adapters()]), None, adapter)
    adapter.change(pick_adapter, adapter, note, **gpu)
    train_btn.click(start_training, [ds, out_name, steps, lr, rank, max_side], job_id).then(
        follow, job_id, [train_status, adapter]
    )
    cancel_btn.click(lambda jid: ctx.jobs.cancel(jid) if jid else None, job_id, None, queue=False)


TAB = Tab("VLM", build)
