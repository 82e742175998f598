"""The "Train a LoRA" section of the Image tab: pick images (with optional .txt captions), settings, start/cancel,
live progress, logs and sample images. Training runs as a background GPU job (it goes on if the browser closes)."""

from __future__ import annotations

import functools
import logging
from typing import Any

import gradio as gr

from studio.context import StudioContext

log = logging.getLogger(__name__)


def build_training(ctx: StudioContext, diffusion: Any) -> None:
    gr.Markdown(
        "Teach a model a subject or a style from 20-150 images. Give each image a caption in a `.txt` file with the "
        "same name, or one instance prompt for all (e.g. `a photo of sks dog`). The result is one `.safetensors` "
        "LoRA (kohya-style keys: it also loads in AUTOMATIC1111 and ComfyUI) that appears in the LoRA lists above."
    )
    with gr.Row():
        with gr.Column():
            inputs = _settings(diffusion)
            with gr.Row():
                start = gr.Button("Start training", variant="primary")
                cancel = gr.Button("Cancel (saves what it has)")
        with gr.Column():
            state = gr.Markdown("No training running.")
            logs = gr.Textbox(label="Log", lines=10, max_lines=14, autoscroll=True)
            samples = gr.Gallery(label="Samples", columns=3, height=300)
    job_id = gr.State(None)
    timer = gr.Timer(1.0, active=False)
    start.click(functools.partial(start_job, ctx), inputs, [job_id, state, logs, samples, timer])
    timer.tick(functools.partial(poll, ctx), job_id, [state, logs, samples, timer])
    cancel.click(functools.partial(cancel_job, ctx), job_id, state)


def _settings(diffusion: Any) -> list:
    """The settings column's inputs, in `start_job`'s argument order."""
    files = gr.File(label="Training images and .txt captions", file_count="multiple")
    base = gr.Dropdown(diffusion.model_choices(), value=diffusion.config.default_model, label="Base model")
    instance = gr.Textbox("", label="Instance prompt (for images without a caption)")
    name = gr.Textbox("my-lora", label="LoRA name")
    with gr.Row():
        rank = gr.Slider(4, 16, 8, step=1, label="Rank")
        steps = gr.Number(500, precision=0, label="Steps")
        lr = gr.Number(1e-4, label="Learning rate")
        res = gr.Dropdown([256, 512, 768, 1024], value=512, label="Resolution")
    with gr.Accordion("Prior preservation", open=False):
        prior = gr.Checkbox(False, label="Keep the class looking like itself (class images + class prompt)")
        class_prompt = gr.Textbox("", label="Class prompt (e.g. 'a photo of a dog')")
        class_files = gr.File(label="Class images (missing ones are generated once)", file_count="multiple")
        n_class = gr.Number(50, precision=0, label="Number of class images")
    with gr.Row():
        sample_every = gr.Number(0, precision=0, label="Sample image every N steps (0 = off)")
        sample_prompt = gr.Textbox("", label="Sample prompt (default: the first caption)")
    return [files, base, instance, name, rank, steps, lr, res, prior, class_prompt, class_files, n_class,
            sample_every, sample_prompt]  # fmt: skip


def start_job(ctx, files_v, base_v, instance_v, name_v, rank_v, steps_v, lr_v, res_v, prior_v, cprompt_v, cfiles_v,
              n_class_v, every_v, sprompt_v):  # fmt: skip
    from backends.image import LoraTrainConfig

    try:
        cfg = LoraTrainConfig(
            dataset=tuple(str(f) for f in files_v or ()), model=base_v, output_name=name_v or "my-lora",
            instance_prompt=instance_v or "", rank=int(rank_v), steps=int(steps_v or 0), learning_rate=float(lr_v),
            resolution=int(res_v), prior_preservation=bool(prior_v), class_prompt=cprompt_v or "",
            class_images=tuple(str(f) for f in cfiles_v or ()), num_class_images=int(n_class_v or 0),
            sample_every=int(every_v or 0), sample_prompt=sprompt_v or "",
        )  # fmt: skip
        job = ctx.backends.sd_lora.submit(cfg)
    except Exception as e:
        raise gr.Error(str(e)[:400]) from None
    return job.id, f"{job.status.capitalize()}: **{job.name}** ({job.id}).", "", [], gr.Timer(active=True)


def poll(ctx, jid):
    job = ctx.jobs.get(jid) if jid else None
    if job is None:
        return "No training running.", gr.update(), gr.update(), gr.Timer(active=False)
    head = f"**{job.name}** · {job.status} · {job.progress:.0%} · {job.message}"
    if job.is_finished:
        result = job.result
        if job.error:
            head += f"\n\n**Failed:** {job.error}"
        elif result is not None and result.path:
            head += f"\n\nSaved `{result.path.name}` after {result.steps_done} steps ({result.status})."
    shown = [(str(p), p.stem) for p in ctx.backends.sd_lora.samples(job.id)]
    return head, "\n".join(job.logs[-200:]), shown, gr.Timer(active=not job.is_finished)


def cancel_job(ctx, jid):
    if jid and ctx.jobs.cancel(jid):
        return "Cancelling: the job saves what it has learnt and stops."
    return "Nothing to cancel."
