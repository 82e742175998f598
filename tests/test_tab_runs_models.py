"""Runs and Models tabs: their data functions against a real context, and that both build inside gr.Blocks."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from studio.catalog import Catalog
from studio.context import StudioContext
from studio.jobs import JobRunner
from studio.residency import ResidencyManager
from studio.runs import RunStore
from tabs import models as models_tab
from tabs import runs as runs_tab


@pytest.fixture
def ctx(settings):
    """These tabs never touch the residency manager, so a plain CPU one is enough (and independent of its work)."""
    for folder in (settings.outputs_dir, settings.runs_dir, settings.models_dir):
        folder.mkdir(parents=True, exist_ok=True)
    context = StudioContext(
        settings=settings,
        residency=ResidencyManager("cpu"),
        catalog=Catalog(settings.models_dir),
        jobs=JobRunner(),
        runs=RunStore(settings.runs_dir),
    )
    yield context
    context.jobs.shutdown(timeout=10)


def test_runs_rows_and_details(ctx):
    first = ctx.runs.create("eval", {"split": "val"})
    first.finish("failed", error="boom")
    run = ctx.runs.create("sd_lora", {"lr": 1e-4}, seed=3)
    for step in range(4):
        run.log_metrics(step, loss=1.0 / (step + 1), lr=1e-4, note="text is not plotted")
    out = ctx.settings.outputs_dir / "lora.safetensors"
    out.write_bytes(b"0" * 2048)
    run.add_artifact(out)

    rows = runs_tab.runs_rows(ctx)
    assert [r[0] for r in rows] == [run.id, first.id]
    assert rows[0][1:3] == ["sd_lora", "running"] and "loss=0.25" in rows[0][5]
    assert rows[1][2] == "failed" and "error=boom" in rows[1][5]

    (run.dir / "weights").mkdir()
    (run.dir / "weights" / "best.pt").write_bytes(b"1" * 4096)  # written by the trainer, never registered
    (run.dir / "model.safetensors").write_bytes(b"2" * 1024)

    rec, plots, artifacts, headline = runs_tab.run_details(ctx, run.id)
    assert rec["config"] == {"lr": 1e-4} and rec["seed"] == 3 and "versions" in rec
    assert [title for title, _ in plots] == ["Loss", "Learning rate"]  # the learning rate is not on the loss axis
    (_, frame), (_, lr) = plots
    assert set(frame["metric"]) == {"loss"} and len(frame) == 4
    assert set(lr["metric"]) == {"lr"} and len(lr) == 4
    assert frame[frame.metric == "loss"]["value"].tolist() == pytest.approx([1, 0.5, 1 / 3, 0.25])
    names = [a[0] for a in artifacts]
    assert {"lora.safetensors", "best.pt", "model.safetensors"} <= set(names)
    assert ["best.pt", "weights/best.pt", "4.0 KB"] in artifacts
    assert run.id in headline
    files = runs_tab.prepare_downloads(ctx, run.id)
    outputs = ctx.settings.outputs_dir.resolve()
    assert all(Path(f).resolve().is_relative_to(outputs) for f in files)  # served from the outputs folder only
    assert {Path(f).name for f in files} >= {"best.pt", "model.safetensors"}

    rec, plots, artifacts, headline = runs_tab.run_details(ctx, "../../etc")
    assert rec == {} and plots == [] and artifacts == [] and "invalid run id" in headline


def test_each_metric_gets_its_own_axis_and_losses_share_one(ctx):
    """A fine-tune run logs loss, lr, tokens/s and peak bytes: tokens/s (thousands) once shared the loss axis."""
    run = ctx.runs.create("finetune", {})
    for step in range(1, 4):
        run.log_metrics(step, loss=2.0 / step, lr=1e-4 * step, tokens_per_s=1500.0 + step, peak_bytes=2**30)
        run.log_metrics(step, val_loss=2.5 / step, flag=True, note="x")  # bools and text are never plotted
    _, plots, _, headline = runs_tab.run_details(ctx, run.id)
    frames = dict(plots)
    assert list(frames) == ["Loss", "tokens_per_s", "peak_bytes", "Learning rate"]
    assert set(frames["Loss"]["metric"]) == {"loss", "val_loss"} and len(frames["Loss"]) == 6
    assert frames["tokens_per_s"]["value"].tolist() == [1501.0, 1502.0, 1503.0]
    assert all(set(f["metric"]) == {name} for name, f in frames.items() if name not in ("Loss", "Learning rate"))
    assert "Not plotted" not in headline

    outputs = runs_tab.detail_outputs(ctx, run.id)  # record, MAX_PLOTS slot updates, artifacts, headline
    slots = outputs[1 : 1 + runs_tab.MAX_PLOTS]
    assert len(outputs) == runs_tab.MAX_PLOTS + 3
    assert [u["label"] for u in slots[:4]] == list(frames) and all(u["visible"] for u in slots[:4])
    assert all(u["visible"] is False and u["value"] is None for u in slots[4:])
    empty = runs_tab.detail_outputs(ctx, None)[1 : 1 + runs_tab.MAX_PLOTS]
    assert empty[0]["visible"] and empty[0]["value"] is None and not any(u["visible"] for u in empty[1:])


def test_metrics_beyond_the_plot_slots_are_named_not_dropped_silently(ctx):
    run = ctx.runs.create("detect", {})
    names = [f"m{i}" for i in range(runs_tab.MAX_PLOTS + 1)]
    run.log_metrics(1, box_loss=1.0, **{n: float(i) for i, n in enumerate(names)})
    _, plots, _, headline = runs_tab.run_details(ctx, run.id)
    assert len(plots) == runs_tab.MAX_PLOTS and plots[0][0] == "Loss"
    left = names[runs_tab.MAX_PLOTS - 1 :]
    assert [t for t, _ in plots[1:]] == names[: runs_tab.MAX_PLOTS - 1]
    assert f"Not plotted (only {runs_tab.MAX_PLOTS} plots): {', '.join(left)}" in headline


def test_jobs_panel_lists_progress_and_cancels(ctx):
    started = threading.Event()

    def train(job):
        job.set_progress(0.5, "epoch 1/2")
        job.log("epoch 1 done")
        started.set()
        while not job.should_stop():
            time.sleep(0.01)
        return "saved"

    job = ctx.jobs.submit("train lora", train)
    queued = ctx.jobs.submit("second", lambda j: None)
    assert started.wait(5)
    rows = {r[0]: r for r in runs_tab.jobs_rows(ctx)}
    device = "GPU" if ctx.residency.device == "cuda" else "CPU"  # no GPU: the job runs on the CPU and says so
    assert rows[job.id][1:6] == ["train lora", device, "running", "50%", "epoch 1/2"]
    assert rows[queued.id][3] == "queued" and "position 1" in rows[queued.id][5]
    assert "epoch 1 done" in runs_tab.job_logs(ctx, job.id)

    assert "before it started" in runs_tab.cancel_job(ctx, queued.id)
    assert "Asked" in runs_tab.cancel_job(ctx, job.id)
    assert job.wait(5) and job.status == "cancelled" and job.result == "saved"
    assert "already cancelled" in runs_tab.cancel_job(ctx, job.id)
    assert "Pick a job" in runs_tab.cancel_job(ctx, None)
    assert "No job" in runs_tab.cancel_job(ctx, "job-9999")


def test_models_table_shows_catalog_status_and_demo_label(ctx):
    rows = {r[1]: r for r in models_tab.catalog_rows(ctx)}
    assert set(rows) == {s.key for s in ctx.catalog.specs}
    assert rows["diffusion:tiny-sd-demo"][2] == models_tab.DEMO_LABEL
    assert rows["chat:llama-3.1-8b-instruct"][2] == "absent"  # nothing downloaded in a fresh models dir
    assert rows["chat:llama-3.1-8b-instruct"][6] == "hub meta-llama/Llama-3.1-8B-Instruct"
    for key, row in rows.items():
        spec = ctx.catalog.get(key)
        expected = "present" if ctx.catalog.local_path(spec) else "absent"
        assert row[2] == (models_tab.DEMO_LABEL if spec.demo else expected)
    assert "Disk used" in models_tab.disk_summary(ctx)


def test_download_refused_offline_with_reason(ctx, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reason = models_tab.offline_reason(ctx)
    assert reason and "offline" in reason
    with pytest.raises(ValueError, match="offline"):
        models_tab.start_download(ctx, "chat:phi-3-mini")
    assert ctx.jobs.list() == []


def test_download_validation_when_online(ctx, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert models_tab.offline_reason(ctx) is None
    with pytest.raises(ValueError, match="Pick a model"):
        models_tab.start_download(ctx, None)
    with pytest.raises(ValueError, match="not downloaded from the Hub"):
        models_tab.start_download(ctx, "chat:smollm2-135m")


def test_delete_a_downloaded_model_frees_its_folder(ctx):
    spec = ctx.catalog.get("reranker:ms-marco-minilm-l6")
    folder = ctx.catalog.hub_dir(spec)
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"w" * 5 * 2**20)
    (folder / ".complete").touch()
    assert spec.key in models_tab.deletable(ctx)
    rows = {r[1]: r for r in models_tab.catalog_rows(ctx)}
    assert rows[spec.key][2] == "present" and rows[spec.key][4] == "5.00 MB"
    assert "5.00 MB freed" in models_tab.delete_model(ctx, spec.key)
    assert not folder.exists() and spec.key not in models_tab.deletable(ctx)
    with pytest.raises(ValueError, match="nothing to delete"):
        models_tab.delete_model(ctx, spec.key)


def test_progress_bar_reports_bytes_into_the_job(ctx):
    """The tqdm adapter as huggingface_hub.snapshot_download drives it: a byte bar and a files bar."""

    def work(job):
        bar_cls = models_tab.job_progress_bar(job)
        written = bar_cls(total=0, unit="B", unit_scale=True, desc="Reconstructing", name="hf")
        transfer = bar_cls(total=0, unit="B", desc="Downloading bytes")
        files = bar_cls(total=2, desc="Fetching 2 files")
        written.total = 4 * 2**20
        for _ in range(3):
            written.update(2**20)
            transfer.update(10)
        seen = job.progress
        files.update(1)
        return seen

    job = ctx.jobs.submit("fake download", work, gpu=False)
    assert job.wait(5), job.error
    assert job.result == pytest.approx(0.75)
    assert "3.00 MB of 4.00 MB" in job.message
    assert any("1/2 files" in line for line in job.logs)


def test_both_tabs_build_in_blocks(ctx):
    import gradio as gr

    ctx.runs.create("eval", {}).log_metrics(1, acc=0.9)
    with gr.Blocks() as demo:
        with gr.Tab("Runs"):
            runs_tab.TAB.build(ctx)
        with gr.Tab("Models"):
            models_tab.TAB.build(ctx)
    labels = {getattr(b, "label", None) for b in demo.blocks.values()}
    assert {"Runs (newest first)", "Jobs", "Metrics", "Model from the Hub"} <= labels
    buttons = {b.value: b for b in demo.blocks.values() if isinstance(b, gr.Button)}
    assert buttons["Download"].interactive is False  # tests run offline
