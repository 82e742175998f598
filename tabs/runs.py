"""Runs tab: every training/evaluation run record (config, metrics plot, artifacts) and the live background jobs.

Jobs run in the studio process, not in the browser: closing this page does not stop them, and they are listed
here again on the next visit. Cancel asks a job to stop; it saves what it has and ends as "cancelled".
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import gradio as gr

from studio.context import StudioContext, Tab
from studio.runs import METRICS

log = logging.getLogger(__name__)

RUN_HEADERS = ["id", "kind", "status", "started", "duration", "key metrics"]
JOB_HEADERS = ["id", "name", "device", "status", "progress", "message", "elapsed"]
ARTIFACT_HEADERS = ["name", "path", "size"]
WEIGHT_SUFFIXES = (".pt", ".safetensors", ".onnx", ".bin", ".gguf", ".json", ".yaml", ".csv", ".png", ".jsonl")
LR_KEYS = ("lr", "learning_rate")
MAX_PLOTS = 6  # plot slots built once; a run fills as many as it has metric groups (see metric_plots)
JOBS_REFRESH_S = 2.0


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else ""


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _fmt_metrics(values: dict[str, Any], limit: int = 4) -> str:
    parts = []
    for k, v in values.items():
        if k in {"time"} or v is None:
            continue
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return ", ".join(parts[:limit])


def runs_rows(ctx: StudioContext) -> list[list[str]]:
    rows = []
    for run in ctx.runs.list():
        rec = run.record
        end = rec.get("finished") or (time.time() if run.status == "running" else rec.get("started"))
        key = rec.get("summary") or run.last_metrics()
        rows.append(
            [
                run.id,
                run.kind,
                run.status,
                _when(rec.get("started")),
                _duration((end or 0) - (rec.get("started") or 0)),
                _fmt_metrics(key),
            ]
        )
    return rows


def metrics_frame(rows: list[dict[str, Any]], keys: tuple[str, ...] | None = None, exclude: tuple[str, ...] = ()):
    """Long format (step, value, metric) for gr.LinePlot; non-numeric and missing values are dropped.
    `keys` keeps only those metrics, `exclude` drops some."""
    import pandas as pd

    long = [
        {"step": r["step"], "value": float(v), "metric": k}
        for r in rows
        for k, v in r.items()
        if k not in {"step", "time", *exclude} and (keys is None or k in keys) and _numeric(v)
    ]  # fmt: skip
    frame = pd.DataFrame(long, columns=["step", "value", "metric"])
    # typed even when empty: the plot fixes its axis types from the first value it gets
    return frame.astype({"step": "int64", "value": "float64", "metric": "str"})


def artifact_files(run: Any, limit: int = 200) -> list[Any]:
    """Every file the run wrote (best.pt, last.pt, model.safetensors, results.csv, ...), registered or not."""
    files = {Path(a["path"]).resolve() for a in run.artifacts if Path(a["path"]).is_file()}
    files |= {p.resolve() for p in Path(run.dir).rglob("*") if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES}
    return sorted(files, key=lambda p: (p.suffix not in (".pt", ".safetensors", ".onnx"), str(p)))[:limit]


def metric_plots(rows: list[dict[str, Any]]) -> tuple[list[tuple[str, Any]], list[str]]:
    """(plots, left out): one (title, frame) per plot, each on its own axis as in the Tiny LM tab's live plots.

    Policy: metrics of one unit share a plot (every loss in "Loss", every learning rate in "Learning rate"); any
    other metric (tokens/s, perplexity, mAP, bytes, latency) gets a plot of its own. Order: loss, the others as
    first logged, learning rate last. At most MAX_PLOTS plots: the other metrics beyond them are left out by name.
    """
    order = list(dict.fromkeys(k for r in rows for k, v in r.items() if k not in {"step", "time"} and _numeric(v)))
    losses = tuple(k for k in order if "loss" in k.lower())
    rates = tuple(k for k in order if k in LR_KEYS or k.lower().startswith(("lr/", "lr_", "lr-")))
    others = [k for k in order if k not in losses and k not in rates]
    room = MAX_PLOTS - bool(losses) - bool(rates)
    groups = [("Loss", losses)] if losses else []
    groups += [(k, (k,)) for k in others[:room]]
    groups += [("Learning rate", rates)] if rates else []
    return [(title, metrics_frame(rows, keys=keys)) for title, keys in groups], others[room:]


def _numeric(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def run_details(ctx: StudioContext, run_id: str | None):
    """(record without artifacts, plots as metric_plots gives them, artifact rows, headline) for one run."""
    if not run_id:
        return {}, [], [], "Select a run in the table above."
    try:
        run = ctx.runs.get(run_id)
    except KeyError as e:
        return {}, [], [], f"**{e.args[0]}**"
    rec = {k: v for k, v in run.record.items() if k != "artifacts"}
    root = Path(run.dir).resolve()
    artifacts = [[p.name, str(p.relative_to(root)) if p.is_relative_to(root) else str(p), _size(p.stat().st_size)]
                 for p in artifact_files(run)]  # fmt: skip
    headline = f"**{run.id}** — {run.kind}, {run.status}; folder `{run.dir}`"
    plots, left_out = metric_plots(run.metrics())
    if left_out:
        headline += f". Not plotted (only {MAX_PLOTS} plots): {', '.join(left_out)}; they are in `{METRICS}`."
    return rec, plots, artifacts, headline


def detail_outputs(ctx: StudioContext, run_id: str | None) -> list[Any]:
    """run_details for the UI: the record, one update per plot slot (the unused ones hidden), artifacts, headline.

    A slot without a plot gets None, not an empty frame: a plot that once showed an empty frame draws no lines later.
    """
    rec, plots, artifacts, headline = run_details(ctx, run_id)
    slots = [gr.update(value=frame, label=title, y_title=title, visible=True) for title, frame in plots]
    empty = gr.update(value=None, label="Metrics", y_title="value", visible=True)  # slot 0 says there are none
    slots += [empty if i == 0 else gr.update(value=None, visible=False) for i in range(len(plots), MAX_PLOTS)]
    return [rec, *slots, artifacts, headline]


def prepare_downloads(ctx: StudioContext, run_id: str | None) -> list[str]:
    """Copy the run's files into outputs/runs/<id>/ (the only folder the UI serves) and list them for download."""
    import shutil

    from studio.safety import contained_path

    if not run_id:
        raise gr.Error("Select a run in the table above first.")
    try:
        run = ctx.runs.get(run_id)
    except KeyError as e:
        raise gr.Error(str(e.args[0])) from None
    dest_root = contained_path(ctx.settings.outputs_dir / "runs", run.id)
    out = []
    for src in artifact_files(run):
        dest = dest_root / src.relative_to(Path(run.dir).resolve()) if src.is_relative_to(Path(run.dir).resolve()) \
            else dest_root / src.name  # fmt: skip
        if (
            not dest.is_file()
            or dest.stat().st_size != src.stat().st_size
            or dest.stat().st_mtime < src.stat().st_mtime
        ):
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".part")
            shutil.copyfile(src, tmp)
            tmp.replace(dest)
        out.append(str(dest))
    if not out:
        raise gr.Error(f"Run {run.id} has no files to download yet.")
    return out


def jobs_rows(ctx: StudioContext) -> list[list[str]]:
    on_gpu = getattr(ctx.residency, "device", "cpu") == "cuda"  # a "GPU" job on a machine without one runs on the CPU
    return [
        [
            j.id,
            j.name,
            "GPU" if j.gpu and on_gpu else "CPU",
            j.status,
            f"{j.progress * 100:.0f}%",
            j.message,
            _duration(j.elapsed()),
        ]
        for j in ctx.jobs.list()
    ]


def cancel_job(ctx: StudioContext, job_id: str | None) -> str:
    if not job_id:
        return "Pick a job to cancel first."
    job = ctx.jobs.get(job_id)
    if job is None:
        return f"No job {job_id!r}; it may have been cleared. Refresh the list."
    if not ctx.jobs.cancel(job_id):
        return f"{job_id} ({job.name}) has already {job.status}; nothing to cancel."
    if job.status == "cancelled":
        return f"{job_id} ({job.name}) was cancelled before it started."
    return f"Asked {job_id} ({job.name}) to stop; it saves its work and ends as 'cancelled'."


def job_logs(ctx: StudioContext, job_id: str | None) -> str:
    job = ctx.jobs.get(job_id) if job_id else None
    if job is None:
        return ""
    text = "\n".join(job.logs[-200:])
    return f"{text}\n\nerror: {job.error}" if job.error else text


def build(ctx: StudioContext) -> None:
    gr.Markdown(
        "## Runs\nEvery training or evaluation run keeps its config, seed, package versions, dataset hash, "
        f"metrics and artifacts under `{ctx.settings.runs_dir}`."
    )
    with gr.Row():
        refresh = gr.Button("Refresh runs", size="sm", scale=0)
    runs_table = gr.Dataframe(
        value=lambda: runs_rows(ctx), headers=RUN_HEADERS, interactive=False, label="Runs (newest first)"
    )
    selected = gr.Textbox(visible=False)
    headline = gr.Markdown("Select a run in the table above.")
    with gr.Row():
        with gr.Column(scale=2):
            plots = []
            for first in range(0, MAX_PLOTS, 2):  # two plots a row, each metric group on its own axis
                with gr.Row():
                    plots += [gr.LinePlot(None, x="step", y="value", color="metric", label="Metrics" if i == 0 else
                                          f"Metric {i + 1}", height=260, visible=i == 0)
                              for i in (first, first + 1)]  # fmt: skip
        with gr.Column(scale=1):
            config = gr.JSON(label="Record (config, seed, versions, dataset hash, summary)")
    artifacts = gr.Dataframe(headers=ARTIFACT_HEADERS, interactive=False, label="Artifacts (files in the run folder)")
    with gr.Row():
        download = gr.Button("Prepare downloads", size="sm", scale=0)
        files = gr.File(label="Downloads", file_count="multiple", interactive=False, scale=3)

    def on_select(evt: gr.SelectData):
        row = evt.row_value or []
        return row[0] if row else ""

    runs_table.select(on_select, None, selected, show_progress="hidden")
    details = [config, *plots, artifacts, headline]
    selected.change(lambda rid: detail_outputs(ctx, rid), selected, details, show_progress="hidden")
    refresh.click(lambda: runs_rows(ctx), None, runs_table).then(
        lambda rid: detail_outputs(ctx, rid), selected, details
    )
    download.click(lambda rid: prepare_downloads(ctx, rid), selected, files)

    _build_jobs_panel(ctx)


def _build_jobs_panel(ctx: StudioContext) -> None:
    gr.Markdown(
        "### Background jobs\nOne GPU job runs at a time; the rest wait in the queue. Jobs keep running when "
        "you close the browser. Cancel asks a job to stop: it saves what it has first."
    )
    jobs_table = gr.Dataframe(value=lambda: jobs_rows(ctx), headers=JOB_HEADERS, interactive=False, label="Jobs")
    with gr.Row():
        job_pick = gr.Dropdown(choices=[], label="Job", allow_custom_value=False, scale=2)
        cancel = gr.Button("Cancel job", variant="stop", scale=1)
    status = gr.Markdown("")
    logs = gr.Textbox(label="Job log", lines=8, max_lines=20, autoscroll=True, interactive=False)
    last_sig = gr.State(None)

    def tick(pick: str | None, sig: Any):
        rows = jobs_rows(ctx)
        ids = [r[0] for r in rows]
        new_sig = (tuple(map(tuple, rows)), pick, len(ctx.jobs.get(pick).logs) if pick and ctx.jobs.get(pick) else 0)
        if new_sig == sig:
            return gr.skip(), gr.skip(), gr.skip(), sig
        value = pick if pick in ids else (ids[0] if ids else None)
        return rows, gr.update(choices=ids, value=value), job_logs(ctx, value), new_sig

    timer = gr.Timer(JOBS_REFRESH_S)
    timer.tick(tick, [job_pick, last_sig], [jobs_table, job_pick, logs, last_sig], show_progress="hidden")
    job_pick.input(lambda j: job_logs(ctx, j), job_pick, logs, show_progress="hidden")
    cancel.click(lambda j: cancel_job(ctx, j), job_pick, status)


TAB = Tab("Runs", build)
