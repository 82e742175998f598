"""Training on a synthetic dataset really learns; cancel keeps last.pt; the run is recorded."""

from __future__ import annotations

import math

import pytest

from backends.vision.data import DatasetError, validate_dataset
from backends.vision.detection import DetectionError
from backends.vision.synth import make_synthetic_dataset
from backends.vision.train import TrainOptions, evaluate, suggest_settings


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_synthetic_dataset(root, n_train=64, n_val=24, imgsz=128, seed=0)
    return root


@pytest.fixture
def det(ctx):
    return ctx.backends.detection


def _train(det, ctx, root, **kw):
    opts = TrainOptions(base="yolov8s-person", imgsz=128, batch=16, warmup_epochs=1, close_mosaic=2, **kw)
    job = det.start_training(root, opts)
    assert job.wait(timeout=600), "training did not finish"
    return job


def test_short_training_learns_the_shapes(det, ctx, shapes):
    report = validate_dataset(shapes)
    before = evaluate(det, det.get_model("yolov8s-untrained"), report, imgsz=128)
    job = _train(det, ctx, shapes, epochs=4, seed=3)
    assert job.status == "done", (job.error, job.logs[-20:])
    result = job.result
    # a real learning check: the untrained network finds nothing; 4 epochs from the shipped backbone do
    assert before["map50"] < 0.05
    assert result.best_map50 > 0.4 and result.best_map50 > before["map50"] + 0.35, result
    after = evaluate(det, det.get_model(f"run-{result.run_id}"), report, imgsz=128)
    assert after["map50"] == pytest.approx(result.best_map50, abs=0.05)

    run = ctx.runs.get(result.run_id)
    assert run.status == "done" and run.kind == "detection-train"
    assert run.record["seed"] == 3 and run.record["dataset_hash"] == report.dataset_hash
    assert run.config["epochs"] == 4 and run.config["names"] == ["circle", "square", "triangle"]
    rows = run.metrics()
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["box_loss"]) and 0 <= r["map50"] <= 1 for r in rows)
    assert rows[-1]["cls_loss"] < rows[0]["cls_loss"]
    assert {a["name"] for a in run.artifacts} == {"best.pt", "last.pt"}
    assert any(m.id == f"run-{result.run_id}" for m in det.trained_models())
    assert det.job_runs[job.id] == result.run_id


def test_cancel_keeps_last_checkpoint(det, ctx, shapes):
    import time

    opts = TrainOptions(base="yolov8s-person", imgsz=128, batch=16, epochs=50, warmup_epochs=1)
    job = det.start_training(shapes, opts)
    deadline = time.time() + 120
    while job.progress <= 0 and time.time() < deadline:  # wait for the first batch
        time.sleep(0.2)
    ctx.jobs.cancel(job.id)
    assert job.wait(timeout=300)
    assert job.status == "cancelled", (job.error, job.logs[-10:])
    assert job.result.status == "cancelled" and job.result.epochs_done == 1
    assert job.result.last_weights is not None and job.result.last_weights.stat().st_size > 1_000_000
    assert (job.result.last_weights.parent / "resume.pt").is_file()  # full checkpoint kept: the run can resume
    assert [r for _, r in det.resumable_runs()] == [job.result.run_id]
    assert ctx.runs.get(job.result.run_id).status == "cancelled"


def test_invalid_dataset_is_refused_before_a_job_starts(det, ctx, shapes, tmp_path):
    import shutil

    root = tmp_path / "bad"
    shutil.copytree(shapes, root)
    (root / "labels" / "val" / "00004.txt").write_text("3 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DatasetError, match=r"labels/val/00004.txt line 1: class id 3 is out of range"):
        det.start_training(root, TrainOptions(epochs=1))
    assert ctx.jobs.list() == []
    with pytest.raises(DetectionError, match="epochs"):
        TrainOptions(epochs=0)


def test_suggestions_on_cpu(det, ctx):
    s = suggest_settings(ctx, 64, det.get_model("yolov8s-person"))
    assert s["imgsz"] == 320 and s["batch"] == 8 and s["epochs"] <= 20 and "No GPU" in s["reason"]


@pytest.mark.slow
def test_longer_training_gets_high_map(det, ctx, tmp_path):
    root = tmp_path / "shapes160"
    make_synthetic_dataset(root, n_train=96, n_val=24, imgsz=160, seed=5)
    job = _train(det, ctx, root, epochs=8, seed=0)
    assert job.status == "done" and job.result.best_map50 > 0.85, job.result


@pytest.mark.parametrize(("capacity_gb", "imgsz", "batch"), [(12, 640, 16), (24, 640, 32), (4, 480, 8)])
def test_suggestions_follow_the_vram_budget(det, capacity_gb, imgsz, batch):
    from types import SimpleNamespace

    budget = int(capacity_gb * 2**30)
    fake = SimpleNamespace(
        residency=SimpleNamespace(device="cuda", capacity_bytes=lambda: budget), settings=det.ctx.settings
    )
    s = suggest_settings(fake, 500, det.get_model("yolov8s-person"))
    assert (s["imgsz"], s["batch"], s["epochs"]) == (imgsz, batch, 60), s
    assert f"{capacity_gb:.1f} GB" in s["reason"]
