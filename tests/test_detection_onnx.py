"""ONNX export: same boxes as PyTorch; the latency table measures both engines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from backends.vision.detection import DetectionError, model_device
from backends.vision.export import compare_boxes, letterboxed_input, onnx_session, summarize

BUS = Path(__import__("importlib").util.find_spec("ultralytics").origin).parent / "assets" / "bus.jpg"


@pytest.fixture
def det(ctx):
    return ctx.backends.detection


def test_onnx_gives_the_same_boxes_as_pytorch(det):
    from ultralytics import YOLO

    onnx_path = det.export_onnx("yolov8s-person", 640)
    assert onnx_path.is_file() and onnx_path.stat().st_size > 10 * 2**20
    assert onnx_path.is_relative_to(det.ctx.settings.cache_dir)  # never written beside the shipped weights
    session = onnx_session(onnx_path)
    assert session.get_inputs()[0].shape == [1, 3, 640, 640]

    # 1) raw network outputs on the identical letterboxed input: (1, 4 + classes, 8400) candidate boxes
    x = letterboxed_input(640)
    key = det.key_for("yolov8s-person")
    raw_torch = det.ctx.residency.run(key, lambda m: _torch_raw(m, x))
    raw_onnx = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert raw_torch.shape == raw_onnx.shape == (1, 6, 8400)
    confident = raw_torch[0, 4:].max(axis=0) > 0.25
    assert confident.sum() >= 10
    assert np.abs(raw_torch[0, :4, confident] - raw_onnx[0, :4, confident]).max() < 0.5  # pixels at 640
    assert np.abs(raw_torch[0, 4:] - raw_onnx[0, 4:]).max() < 0.01  # class scores

    # 2) end to end on bus.jpg with the same square 640x640 input (the exported graph has a static shape)
    torch_res = det.ctx.residency.run(
        key, lambda m: m.predict(str(BUS), conf=0.3, rect=False, device=model_device(m), verbose=False)[0]
    )
    onnx_res = YOLO(str(onnx_path), task="detect").predict(str(BUS), conf=0.3, device="cpu", verbose=False)[0]
    a, b = torch_res.boxes.xyxy.cpu().numpy(), onnx_res.boxes.xyxy.numpy()
    assert len(a) >= 3
    assert compare_boxes(a, b) < 2.0  # pixels, on a 810x1080 image
    assert np.allclose(sorted(torch_res.boxes.conf.tolist()), sorted(onnx_res.boxes.conf.tolist()), atol=0.01)
    assert det.export_onnx("yolov8s-person", 640) == onnx_path  # cached by content hash


def _torch_raw(model, x):
    import torch

    net = model.model
    with torch.inference_mode():
        out = net(torch.from_numpy(x).to(next(net.parameters()).device))
    return (out[0] if isinstance(out, tuple | list) else out).float().cpu().numpy()


def test_latency_table_has_both_engines(det):
    rows = det.latency("yolov8s-person", imgsz=320, runs=3)
    assert [r.engine for r in rows] == ["PyTorch fp32", "ONNX Runtime fp32"]
    for r in rows:
        assert r.runs == 3 and 0 < r.p50_ms <= r.p95_ms and r.fps == pytest.approx(1000 / r.p50_ms, abs=0.06)


def test_untrained_model_cannot_be_exported(det):
    with pytest.raises(DetectionError, match="train it first"):
        det.export_onnx("yolov8n-untrained")


def test_summary_percentiles():
    row = summarize("x", "cpu", [float(v) for v in range(1, 101)])
    assert (row.p50_ms, row.p95_ms, row.runs) == (50.5, 95.0, 100)
    assert compare_boxes(np.zeros((2, 4)), np.zeros((3, 4))) == float("inf")
