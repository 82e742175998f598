"""Segmentation and classification (untrained demo models from yaml), their datasets, the training settings
(augmentation presets, auto batch, freeze) and resume. The seg and cls training loops take 2-4 s each in a warm
run (tiny synthetic sets); resume and the no-download check are slow-marked."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backends.vision import DetectOptions, TrainOptions
from backends.vision.detection import DetectionError
from backends.vision.options import AUGMENT_PRESETS, HELP, augment_kwargs, auto_batch
from backends.vision.synth import make_synthetic_cls_dataset, make_synthetic_dataset
from backends.vision.task_data import validate_cls_dataset

BUS = Path(__import__("importlib").util.find_spec("ultralytics").origin).parent / "assets" / "bus.jpg"


@pytest.fixture
def det(ctx):
    return ctx.backends.detection


def test_each_task_lists_its_own_models(det):
    seg, cls = det.models("segment"), det.models("classify")
    assert {m.id for m in seg} == {"yolov8n-seg-untrained", "yolo11n-seg-untrained"}
    assert {m.id for m in cls} == {"yolov8n-cls-untrained", "yolo11n-cls-untrained"}
    assert all(m.untrained and "untrained demo model" in m.title for m in seg + cls)
    assert not {m.id for m in seg + cls} & {m.id for m in det.models()}  # the detection list stays detection


def test_segmentation_draws_masks(det):
    import torch

    torch.manual_seed(0)  # the demo model's random weights
    res = det.detect("yolov8n-seg-untrained", BUS, DetectOptions(conf=0.0, imgsz=320, max_det=3))
    assert res.task == "segment" and res.masks == len(res.boxes) == 3  # random weights, so take the top 3 anyway
    original = np.asarray(Image.open(BUS).convert("RGB"))
    assert res.image.shape == original.shape
    assert (np.abs(res.image.astype(int) - original).sum(axis=2) > 30).mean() > 0.001  # masks and boxes drawn
    assert res.to_json()["task"] == "segment"


def test_classification_shows_the_top_classes(det):
    res = det.detect("yolov8n-cls-untrained", BUS, DetectOptions(imgsz=224), top_k=5)
    probs = [p for _, p in res.top]
    assert res.task == "classify" and len(res.top) == 5 and not res.boxes
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    assert res.rows()[0] == [res.top[0][0], round(res.top[0][1], 4)]
    assert [t["name"] for t in res.to_json()["top"]] == [n for n, _ in res.top]


def test_a_model_of_another_task_is_refused(det, ctx, tmp_path):
    import shutil

    trusted = ctx.settings.models_dir / "people.pt"
    trusted.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(det.get_model("yolov8s-person").path, trusted)
    entry = det.add_trusted_weights(trusted, task="segment")
    with pytest.raises(DetectionError, match="is a 'detect' model; this section needs a 'segment' one"):
        det.detect(entry.id, BUS)
    with pytest.raises(DetectionError, match="unknown task"):
        det.add_trusted_weights(trusted, task="pose")


def test_classification_dataset_validation(tmp_path):
    root = make_synthetic_cls_dataset(tmp_path / "cls", n_train=2, n_val=1, imgsz=32)
    report = validate_cls_dataset(root)
    assert report.ok and report.names == ["circle", "square", "triangle"], report.errors
    assert report.splits["train"].images == 6 and report.splits["val"].images == 3
    (root / "val" / "hexagon").mkdir()
    Image.new("RGB", (32, 32)).save(root / "val" / "hexagon" / "x.png")
    Image.new("RGB", (32, 32)).save(root / "train" / "loose.png")
    (root / "train" / "circle" / "0000.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
    errors = "\n".join(validate_cls_dataset(root).errors)
    assert "val/hexagon: class 'hexagon' is not in train/" in errors
    assert "train/loose.png: images must sit in a folder per class" in errors
    assert "train/circle/0000.png: not a readable image" in errors
    (tmp_path / "empty").mkdir()
    assert "needs train/<class>/ and val/<class>/" in validate_cls_dataset(tmp_path / "empty").errors[0]


def test_segmentation_needs_outlines(det, tmp_path):
    boxes = tmp_path / "ingest-boxes"
    make_synthetic_dataset(boxes, n_train=2, n_val=1, imgsz=64)
    assert "polygon labels" in det.check_dataset(boxes, "segment").errors[0]
    outlines = tmp_path / "outlines"
    make_synthetic_dataset(outlines, n_train=2, n_val=1, imgsz=64, polygons=True)
    report = det.check_dataset(outlines, "segment")
    assert report.ok and report.splits["train"].polygons == report.splits["train"].instances > 0


def test_augmentation_presets_map_to_ultralytics_hyperparameters():
    assert list(AUGMENT_PRESETS) == ["none", "light", "default", "heavy"]
    off = augment_kwargs("none", "detect")
    assert off["mosaic"] == off["fliplr"] == off["hsv_s"] == off["scale"] == 0.0 and "erasing" not in off
    default = augment_kwargs("default", "detect")
    from ultralytics.cfg import DEFAULT_CFG_DICT  # the "default" preset is Ultralytics' own defaults

    assert all(DEFAULT_CFG_DICT[k] == v for k, v in default.items()), default
    heavy = augment_kwargs("heavy", "segment")
    assert heavy["mixup"] > 0 and heavy["degrees"] > 0 and heavy["copy_paste"] > 0
    assert augment_kwargs("none", "classify")["auto_augment"] == ""  # no RandAugment
    assert all(DEFAULT_CFG_DICT.get(k, "missing") != "missing" for k in augment_kwargs("heavy", "classify"))
    assert TrainOptions(augment=False).augment == "none" and TrainOptions(augment=True).augment == "default"
    for field, msg in (("augment", "augmentation 'wild'"), ("freeze", "frozen layers"), ("batch", "batch")):
        with pytest.raises(DetectionError, match=msg):
            TrainOptions(**{field: {"augment": "wild", "freeze": 99, "batch": -1}[field]})
    assert {"augment", "amp", "patience", "imgsz", "batch", "freeze", "resume"} <= set(HELP)


def test_auto_batch_follows_the_budget(det):
    v8s = det.get_model("yolov8s-person")
    assert auto_batch(12 * 2**30, v8s, 640, amp=False) == 16
    assert auto_batch(12 * 2**30, v8s, 640, amp=True) == 32  # fp16 activations
    assert auto_batch(12 * 2**30, v8s, 320, amp=False) == 64  # capped
    assert auto_batch(2 * 2**30, v8s, 640, amp=False) == 2  # never below 2


def test_resume_refuses_what_it_cannot_continue(det, ctx):
    with pytest.raises(DetectionError, match="Unknown run"):
        det.resume_training("no-such-run")
    run = ctx.runs.create("detection-train", {"base": "yolov8s-person"})
    run.finish("cancelled")
    with pytest.raises(DetectionError, match="left no resumable checkpoint"):
        det.resume_training(run.id)
    assert det.resumable_runs() == []


def _losses(rows: list[dict], key: str) -> list[float]:
    return [r[key] for r in rows if math.isfinite(r.get(key, math.nan))]


def test_segmentation_training_loop(det, ctx, tmp_path):
    root = tmp_path / "seg"
    make_synthetic_dataset(root, n_train=16, n_val=4, imgsz=64, polygons=True, seed=2)
    opts = TrainOptions(base="yolov8n-seg-untrained", epochs=3, imgsz=64, batch=8, nominal_batch=8, augment="none",
                        warmup_epochs=0, close_mosaic=0, seed=1)  # fmt: skip
    job = det.start_training(root, opts)
    assert job.wait(timeout=600) and job.status == "done", (job.error, job.logs[-10:])
    rows = ctx.runs.get(job.result.run_id).metrics()
    assert [r["step"] for r in rows] == [1, 2, 3] and len(_losses(rows, "seg_loss")) == 3
    assert all(0 <= r["mask_map50"] <= 1 for r in rows)
    assert len(set(_losses(rows, "seg_loss"))) == 3  # the optimizer stepped every epoch
    trained = det.get_model(f"run-{job.result.run_id}")
    assert trained.task == "segment" and trained in det.models("segment")
    res = det.detect(trained.id, root / "images" / "val" / "00000.png", DetectOptions(conf=0.0, imgsz=64, max_det=2))
    assert res.masks == len(res.boxes) and {b.name for b in res.boxes} <= {"circle", "square", "triangle"}


def test_classification_training_loop(det, ctx, tmp_path):
    root = make_synthetic_cls_dataset(tmp_path / "cls", n_train=6, n_val=2, imgsz=32)
    opts = TrainOptions(base="yolov8n-cls-untrained", epochs=6, imgsz=32, batch=8, nominal_batch=8, augment="none",
                        warmup_epochs=0, close_mosaic=0, seed=1)  # fmt: skip
    job = det.start_training(root, opts)
    assert job.wait(timeout=600) and job.status == "done", (job.error, job.logs[-10:])
    rows = ctx.runs.get(job.result.run_id).metrics()
    losses = _losses(rows, "loss")
    assert len(losses) == 6 and min(losses[1:]) < 0.9 * losses[0], losses  # it learns the training images
    assert all(0 <= r["top1"] <= 1 and 0 <= r["top5"] <= 1 for r in rows) and job.result.best_top1 is not None
    res = det.detect(f"run-{job.result.run_id}", root / "val" / "circle" / "0000.png", DetectOptions(imgsz=32))
    assert sorted(n for n, _ in res.top) == ["circle", "square", "triangle"]


@pytest.mark.slow
def test_a_stopped_training_resumes_where_it_stopped(det, ctx, tmp_path):
    import time

    root = tmp_path / "shapes"
    make_synthetic_dataset(root, n_train=32, n_val=8, imgsz=64, seed=0)
    opts = TrainOptions(base="yolov8n-untrained", epochs=3, imgsz=64, batch=8, nominal_batch=8, warmup_epochs=0,
                        close_mosaic=0, augment="light")  # fmt: skip
    job = det.start_training(root, opts)
    while job.progress <= 0 and job.status in ("queued", "running"):
        time.sleep(0.1)
    ctx.jobs.cancel(job.id)
    assert job.wait(timeout=300) and job.status == "cancelled", (job.error, job.logs[-5:])
    run_id = job.result.run_id
    assert (ctx.runs.get(run_id).dir / "ultralytics" / "weights" / "resume.pt").is_file()
    assert [r for _, r in det.resumable_runs()] == [run_id]
    again = det.resume_training(run_id)
    assert det.resume_training(run_id) is again  # a double click queues one continuation and follows it
    assert again.wait(timeout=600) and again.status == "done", (again.error, again.logs[-10:])
    resumed = ctx.runs.get(again.result.run_id)
    assert resumed.config["resumed_from"].endswith("resume.pt")
    assert [r["step"] for r in resumed.metrics()] == [2, 3]  # epoch 1 was done before the stop
    assert det.resumable_runs() == []  # resumed to the end: no longer offered


@pytest.mark.slow
def test_nothing_is_downloaded(det, ctx, tmp_path, monkeypatch):
    """Predict, segment, classify, train and export with every Ultralytics download entry point and socket
    connections turned into failures: nothing (fonts, AMP weights, assets) is fetched."""
    import socket

    import ultralytics.engine.trainer as trainer_module
    import ultralytics.utils.downloads as downloads

    calls = []

    def refuse(*a, **k):
        calls.append(a[:1])
        raise AssertionError(f"download attempted: {a[:1]}")

    for name in ("safe_download", "download"):  # what attempt_download_asset & co call for a missing file
        monkeypatch.setattr(downloads, name, refuse)
    monkeypatch.setattr(socket.socket, "connect", lambda self, addr: refuse(addr))
    det.detect("yolov8s-person", BUS)
    det.detect("yolov8n-seg-untrained", BUS, DetectOptions(conf=0.0, imgsz=320, max_det=2))
    det.detect("yolov8n-cls-untrained", BUS, DetectOptions(imgsz=224))
    root = tmp_path / "shapes"
    make_synthetic_dataset(root, n_train=8, n_val=4, imgsz=64)
    job = det.start_training(root, TrainOptions(base="yolov8n-untrained", epochs=1, imgsz=64, batch=8, amp=True))
    assert job.wait(timeout=300) and job.status == "done", (job.error, job.logs[-5:])
    assert trainer_module.check_amp.__name__ == "offline_check_amp"  # Ultralytics' own would fetch yolo26n.pt
    assert det.export("yolov8s-person", "onnx", 160).is_file()
    assert calls == []
