"""Tiny LM lab tab: train a character-level GPT on Shakespeare from scratch, watch the loss, sample from it."""

from __future__ import annotations

from studio.context import StudioContext, Tab

SIZES = {  # name -> model config; all fit a 12 GB card with room to spare
    "tiny (0.1 M params, CPU-friendly)": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64},
    "small (0.8 M params)": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128},
    "medium (10 M params, GPU)": {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256},
}


def build(ctx: StudioContext) -> None:
    import gradio as gr
    import pandas as pd

    from backends.tinylm import TrainOptions, available_works

    backend = ctx.backends.tinylm
    gr.Markdown(
        "## Tiny LM lab\nTrain a small GPT (nanoGPT-style, character level) **from scratch** on Shakespeare's plays, "
        "shipped offline. Loss starts near ln(vocabulary) ≈ 4.2 and falls as it learns spelling, then words, then "
        "verse. Runs are recorded in the Runs tab."
    )
    job_id = gr.State(None)
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
            plot = gr.LinePlot(x="step", y="loss", color="split", title="Loss", height=260)
            logs = gr.Textbox(label="Log", lines=6, max_lines=6, autoscroll=True)
    gr.Markdown("### Sample")
    with gr.Row():
        model = gr.Dropdown(backend.trained_models(), label="Trained model (run id)", allow_custom_value=False)
        refresh = gr.Button("Refresh list", size="sm")
    with gr.Row():
        prompt = gr.Textbox("ROMEO.\n", label="Start text", lines=2)
        max_new = gr.Slider(10, 2000, value=300, step=10, label="Characters to write")
        temperature = gr.Slider(0.1, 2.0, value=0.8, step=0.05, label="Temperature")
    sample_btn = gr.Button("Write")
    sample_out = gr.Textbox(label="Output", lines=12)

    def start(works_v, size_v, steps_v, batch_v, lr_v, seed_v):
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

    def poll(jid):
        job = ctx.jobs.get(jid) if jid else None
        if job is None:
            return gr.skip(), gr.skip(), gr.skip()
        rows = []
        result_run = getattr(job.result, "run_id", None)
        runs = [r for r in ctx.runs.list() if r.kind == "tinylm"]
        run = next((r for r in runs if r.id == result_run), runs[0] if runs else None)
        for m in run.metrics() if run else []:
            rows += [
                {"step": m["step"], "loss": m["train_loss"], "split": "train"},
                {"step": m["step"], "loss": m["val_loss"], "split": "validation"},
            ]
        text = f"**{job.status}** · {job.progress:.0%} · {job.message or ''}" + (
            f"\n\n{job.error}" if job.error else ""
        )
        return text, pd.DataFrame(rows, columns=["step", "loss", "split"]), "\n".join(job.logs[-50:])

    def write(run_id, prompt_v, n, temp):
        if not run_id:
            raise gr.Error("Choose a trained model first (train one above, then press Refresh list).")
        try:
            return backend.sample(run_id, prompt_v, int(n), float(temp))
        except (ValueError, FileNotFoundError) as e:
            raise gr.Error(str(e)) from None

    train_btn.click(start, [works, size, steps, batch, lr, seed], [job_id, status])
    cancel_btn.click(lambda jid: ctx.jobs.cancel(jid) if jid else None, job_id, None)
    gr.Timer(2.0).tick(poll, job_id, [status, plot, logs])
    refresh.click(lambda: gr.update(choices=backend.trained_models()), None, model)
    sample_btn.click(
        write, [model, prompt, max_new, temperature], sample_out, concurrency_id="gpu", concurrency_limit=1
    )


TAB = Tab("Tiny LM lab", build)
