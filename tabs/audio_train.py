"""The "Fine-tune Whisper" section of the Audio tab: a folder (local use) or a zip of recordings + transcripts,
settings, start / cancel / resume, live progress and logs, dev-set WER before and after with example lines. Training
runs as a background GPU job (it goes on if the browser closes); the result appears in the Whisper model list."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import gradio as gr

from studio.context import StudioContext
from tabs._session import started_note

log = logging.getLogger(__name__)

BASES = ("whisper-tiny.en", "whisper-base", "whisper-small", "whisper-medium", "whisper-large-v3")


def build_training(ctx: StudioContext, model_dropdown: Any = None, model_choices: Any = None) -> None:
    """`model_dropdown`/`model_choices()`: the Audio tab's Whisper list, refreshed when a tuned model is ready."""
    gr.Markdown(
        "Teach Whisper your vocabulary, names and accent from your own recordings: a folder of audio files with a "
        "`.txt` (or `.srt`) of the same name beside each, or a `manifest.csv` / `manifest.jsonl` with `audio` and "
        "`text` columns (optional `split` = train/dev). Clips must be 30 s or shorter. tiny/base/small are tuned "
        "fully, medium and larger with LoRA. The tuned model is exported for faster-whisper and appears in the "
        "Whisper model list above as `tuned:<name>`."
    )
    local = ctx.settings.is_loopback
    with gr.Row():
        with gr.Column():
            folder = gr.Textbox(
                "", label="Training folder on this computer" if local else "Training folder (local use only)",
                interactive=local, placeholder="/home/me/recordings" if local else "upload a zip instead",
            )  # fmt: skip
            archive = gr.File(label="…or a zip of the folder", file_types=[".zip"], file_count="single")
            with gr.Row():
                base = gr.Dropdown(list(BASES), value=BASES[0], label="Base model")
                name = gr.Textbox("my-whisper", label="Name of the tuned model")
            with gr.Row():
                epochs = gr.Number(3, label="Epochs")
                lr = gr.Number(1e-5, label="Learning rate")
                batch = gr.Number(8, precision=0, label="Batch size")
                language = gr.Textbox("en", label="Language")
            with gr.Accordion("Advanced", open=False):
                method = gr.Radio(["auto", "full", "lora"], value="auto", label="Method (auto: LoRA from medium up)")
                precision = gr.Radio(["auto", "fp32", "fp16", "bf16"], value="auto", label="Precision")
                optim = gr.Radio(["auto", "adamw", "adamw8bit"], value="auto", label="Optimizer (auto: 8-bit on CUDA)")
                with gr.Row():
                    checkpointing = gr.Checkbox(True, label="Gradient checkpointing")
                    spec = gr.Checkbox(False, label="SpecAugment masking")
                    freeze = gr.Checkbox(False, label="Freeze the encoder (names and vocabulary only)")
                resume = gr.Textbox("", label="Resume from run id (a cancelled run of this section)")
            with gr.Row():
                start = gr.Button("Start fine-tuning", variant="primary")
                cancel = gr.Button("Cancel (saves a checkpoint)")
        with gr.Column():
            state = gr.Markdown("No fine-tuning running.")
            logs = gr.Textbox(label="Log", lines=8, max_lines=12, autoscroll=True)
            table = gr.Dataframe(headers=["reference", "before", "after"], label="Dev set, before / after",
                                 interactive=False, wrap=True)  # fmt: skip
    job_id = gr.State(None)
    timer = gr.Timer(1.0, active=False)

    def start_job(folder_v, archive_v, base_v, name_v, epochs_v, lr_v, batch_v, lang_v, method_v, prec_v, optim_v,
                  ckpt_v, spec_v, freeze_v, resume_v):  # fmt: skip
        from backends.audio import TuneConfig

        data_dir = _data_folder(ctx, folder_v, archive_v, local)
        try:
            cfg = TuneConfig(
                data_dir=str(data_dir), base_model=base_v, output_name=(name_v or "").strip(),
                epochs=float(epochs_v or 0), learning_rate=float(lr_v or 0), batch_size=int(batch_v or 0),
                language=(lang_v or "en").strip(), method=method_v, precision=prec_v, optimizer=optim_v,
                gradient_checkpointing=bool(ckpt_v), spec_augment=bool(spec_v), freeze_encoder=bool(freeze_v),
                resume_run=(resume_v or "").strip(),
            )  # fmt: skip
            job = ctx.backends.whisper_tuner.submit(cfg)
        except Exception as e:
            raise gr.Error(str(e)[:1500]) from None
        return job.id, started_note(job), "", None, gr.Timer(active=True)

    def poll(jid):
        job = ctx.jobs.get(jid) if jid else None
        if job is None:
            return "No fine-tuning running.", gr.update(), gr.update(), gr.Timer(active=False), gr.update()
        head = f"**{job.name}** · {job.status} · {job.progress:.0%} · {job.message}"
        rows, choices = gr.update(), gr.update()
        if job.is_finished:
            head += _finished(job)
            res = job.result
            if res is not None and res.examples:
                rows = [[e["reference"], e["before"], e["after"]] for e in res.examples]
            if res is not None and res.model_id and model_dropdown is not None:
                choices = gr.update(choices=model_choices(), value=res.model_id)
        return head, "\n".join(job.logs[-200:]), rows, gr.Timer(active=not job.is_finished), choices

    def cancel_job(jid):
        if jid and ctx.jobs.cancel(jid):
            return "Cancelling: the job saves a checkpoint and stops (resume it with its run id)."
        return "Nothing to cancel."

    inputs = [folder, archive, base, name, epochs, lr, batch, language, method, precision, optim, checkpointing, spec,
              freeze, resume]  # fmt: skip
    start.click(start_job, inputs, [job_id, state, logs, table, timer], concurrency_limit=1)
    outputs = [state, logs, table, timer, model_dropdown if model_dropdown is not None else gr.State()]
    timer.tick(poll, job_id, outputs)
    cancel.click(cancel_job, job_id, state)


def _finished(job) -> str:
    res = job.result
    if job.error:
        return f"\n\n**Failed:** {job.error[:1500]}"
    if res is None:
        return ""
    wer = ""
    if res.wer_before is not None and res.wer_after is not None:
        wer = f" Dev WER **{res.wer_before:.3f} → {res.wer_after:.3f}**."
    if res.status == "cancelled":
        return f"\n\nCancelled after {res.steps_done} steps; checkpoint kept in run `{res.run_id}` (resume with it)."
    paused = f" Paused for other GPU work {res.paused_s:.0f} s." if res.paused_s else ""
    return f"\n\n{res.status}: {res.steps_done} steps.{wer} Model **{res.model_id}** is in the list above.{paused}"


def _data_folder(ctx: StudioContext, folder_v: str, archive_v: Any, local: bool) -> Path:
    """The folder to train from: an uploaded zip (unpacked under the data dir) or, for local use, a typed path."""
    from backends.audio import DatasetError, extract_zip

    if archive_v:
        src = Path(archive_v if isinstance(archive_v, str) else getattr(archive_v, "name", archive_v))
        target = (
            ctx.settings.data_dir / "uploads" / "whisper-data" / f"{src.stem[:40]}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
        try:
            return extract_zip(src, target)
        except DatasetError as e:
            raise gr.Error(str(e)) from None
    text = (folder_v or "").strip()
    if not text:
        raise gr.Error("No training data: type the folder's path or upload a zip of it.")
    if not local:
        raise gr.Error("A server folder can only be chosen when the studio runs on this computer; upload a zip.")
    path = Path(text).expanduser()
    if not path.is_dir():
        raise gr.Error(f"{text!r} is not a folder on this computer.")
    return path
