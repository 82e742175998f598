"""Tiny LM lab tab: train a character-level GPT on Shakespeare from scratch, watch the loss, sample from it."""

from __future__ import annotations

from typing import Any

from studio.context import StudioContext, Tab
from tabs._session import bind, job_status, newest_first, on_page_load

SIZES = {  # name -> model config; all fit a 12 GB card with room to spare
    "tiny (0.1 M params, CPU-friendly)": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64},
    "small (0.8 M params)": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128},
    "medium (10 M params, GPU)": {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256},
}


PLOT_COLUMNS = ["step", "loss", "split"]


def loss_frame(metrics: list[dict[str, Any]]):
    """Long format for gr.LinePlot with numeric columns (an object column makes the y-axis categorical)."""
    import pandas as pd

    rows = [
        {"step": float(m["step"]), "loss": float(m[key]), "split": split}
        for m in metrics
        for key, split in (("train_loss", "train"), ("val_loss", "validation"))
        if isinstance(m.get(key), int | float)
    ]
    return pd.DataFrame(rows, columns=PLOT_COLUMNS).astype({"step": "float64", "loss": "float64", "split": "str"})


def start(backend: Any, works_v, size_v, steps_v, batch_v, lr_v, seed_v):
    import gradio as gr

    from backends.tinylm import TrainOptions

    try:
        opts = TrainOptions(
            works=tuple(works_v or ()),
            steps=int(steps_v),
            batch_size=int(batch_v),
            lr=float(lr_v),
            seed=int(seed_v),
            eval_every=max(1, int(steps_v) // 20),
        )
        job = backend.start_training(SIZES[size_v], opts)
    except (ValueError, FileNotFoundError) as e:
        raise gr.Error(str(e)) from None
    return job.id, f"Queued: {job.name}"


def poll(ctx: StudioContext, backend: Any, jid, seen):
    """(status, plot, logs, sample list, seen) every 2 s; the sample list refreshes when a run finishes."""
    import gradio as gr

    job = ctx.jobs.get(jid) if jid else None
    if job is None:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), seen
    result_run = getattr(job.result, "run_id", None)
    runs = [r for r in ctx.runs.list() if r.kind == "tinylm"]
    run = next((r for r in runs if r.id == result_run), runs[0] if runs else None)
    frame = loss_frame(run.metrics() if run else [])
    models = gr.skip()
    if job.is_finished and seen != job.id:
        trained = backend.trained_models()
        models, seen = gr.update(choices=trained, value=trained[0] if trained else None), job.id
    return job_status(job), (None if frame.empty else frame), newest_first(job.logs), models, seen


def write(backend: Any, run_id, prompt_v, n, temp):
    import gradio as gr

    if not run_id:
        raise gr.Error("Choose a trained model first (train one above; it appears here when it finishes).")
    try:
        return backend.sample(run_id, prompt_v, int(n), float(temp))
    except (ValueError, FileNotFoundError) as e:
        raise gr.Error(str(e)) from None


def _build_train() -> dict[str, Any]:
    import gradio as gr

    from backends.tinylm import available_works

    with gr.Row():
        with gr.Column():
            works = gr.Dropdown(available_works(), value=["hamlet", "macbeth"], multiselect=True, label="Texts")
            size = gr.Radio(list(SIZES), value=next(iter(SIZES)), label="Model size")
            with gr.Row():
                steps = gr.Number(1000, label="Steps", precision=0, minimum=1)
                batch = gr.Number(32, label="Batch size", precision=0, minimum=1)
                lr = gr.Number(1e-3, label="Learning rate")
                seed = gr.Number(1337, label="Seed", precision=0)
            with gr.Row():
                train_btn = gr.Button("Train", variant="primary")
                cancel_btn = gr.Button("Stop (keeps the last checkpoint)")
        with gr.Column():
            status = gr.Markdown("No training yet.")
            plot = gr.LinePlot(None, x="step", y="loss", color="split", title="Loss", height=260)
            logs = gr.Textbox(label="Log (newest first)", lines=6, max_lines=6)
    return locals()


def _build_sample(backend: Any) -> dict[str, Any]:
    import gradio as gr

    gr.Markdown("### Sample")
    trained = backend.trained_models()
    model = gr.Dropdown(trained, value=trained[0] if trained else None, label="Trained model (run id, newest first)")
    with gr.Row():
        prompt = gr.Textbox("ROMEO.\n", label="Start text", lines=2)
        max_new = gr.Slider(10, 2000, value=300, step=10, label="Characters to write")
        temperature = gr.Slider(0.1, 2.0, value=0.8, step=0.05, label="Temperature")
    sample_btn = gr.Button("Write")
    sample_out = gr.Textbox(label="Output", lines=12)
    return locals()


def build(ctx: StudioContext) -> None:
    import gradio as gr

    backend = ctx.backends.tinylm
    gr.Markdown(
        "## Tiny LM lab\nTrain a small GPT (nanoGPT-style, character level) **from scratch** on Shakespeare's plays, "
        "shipped offline. Loss starts near ln(vocabulary) ≈ 4.2 and falls as it learns spelling, then words, then "
        "verse. Runs are recorded in the Runs tab."
    )
    job_id, seen = gr.State(None), gr.State(None)
    t = _build_train()
    s = _build_sample(backend)
    model = s["model"]
    t["train_btn"].click(bind(start, backend), [t["works"], t["size"], t["steps"], t["batch"], t["lr"], t["seed"]],
                         [job_id, t["status"]])  # fmt: skip
    t["cancel_btn"].click(lambda jid: ctx.jobs.cancel(jid) if jid else None, job_id, None)
    gr.Timer(2.0).tick(bind(poll, ctx, backend), [job_id, seen], [t["status"], t["plot"], t["logs"], model, seen],
                       show_progress="hidden")  # fmt: skip
    refresh = bind(_trained_update, backend)
    on_page_load(refresh, model, model, queue=False)
    model.focus(refresh, model, model, queue=False)
    s["sample_btn"].click(bind(write, backend), [model, s["prompt"], s["max_new"], s["temperature"]], s["sample_out"],
                          **ctx.queues.event_kwargs("Tiny LM lab"))  # fmt: skip


def _trained_update(backend: Any, current):
    import gradio as gr

    trained = backend.trained_models()
    return gr.update(choices=trained, value=current if current in trained else (trained[0] if trained else None))


TAB = Tab("Tiny LM lab", build)
