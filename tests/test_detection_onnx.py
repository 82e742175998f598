"""ONNX export: same boxes as PyTorch; the latency table measures both engines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from backends.vision.detection import DetectionError, model_device
from backends.vision.export import letterboxed_input
from backends.vision.latency import compare_outputs, summarize

BUS = Path(__import__("importlib").util.find_spec("ultralytics").origin).parent / "assets" / "bus.jpg"


@pytest.fixture
def det(ctx):
    return ctx.backends.detection


def test_onnx_gives_the_same_boxes_as_pytorch(det):
    from ultralytics import YOLO

    onnx_path = det.export_onnx("yolov8s-person", 640)
    assert onnx_path.is_file() and onnx_path.stat().st_size > 10 * 2**20
    assert onnx_path.is_relative_to(det.ctx.settings.cache_dir)  # never written beside the shipped weights
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
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
    assert len(a) == len(b) and np.abs(np.sort(a, axis=0) - np.sort(b, axis=0)).max() < 2.0  # pixels, on 810x1080
    assert np.allclose(sorted(torch_res.boxes.conf.tolist()), sorted(onnx_res.boxes.conf.tolist()), atol=0.01)
    assert det.export_onnx("yolov8s-person", 640) == onnx_path  # cached by content hash


def _torch_raw(model, x):
    import torch

    net = model.model
    with torch.inference_mode():
        out = net(torch.from_numpy(x).to(next(net.parameters()).device))
    return (out[0] if isinstance(out, tuple | list) else out).float().cpu().numpy()


def test_latency_table_checks_every_engine_against_pytorch(det, monkeypatch):
    import backends.vision.export as export

    monkeypatch.setattr(export, "openvino_available", lambda: False)  # its rows: the slow test below
    rows, notes = det.latency("yolov8s-person", imgsz=160, runs=2, batches=(1, 2))
    assert [(r.engine, r.precision, r.batch) for r in rows] == [
        ("PyTorch", "fp32", 1), ("PyTorch", "fp32", 2), ("ONNX Runtime", "fp32", 1), ("ONNX Runtime", "fp32", 2)
    ]  # fmt: skip
    for r in rows:
        assert r.runs == 2 and 0 < r.p50_ms <= r.p95_ms
        # fps is rounded to 0.1 from the unrounded p50, p50 to 0.01: both roundings bound the difference
        slack = 0.05 + 0.005 * r.fps / r.p50_ms + 1e-9
        assert r.fps == pytest.approx(r.batch * 1000 / r.p50_ms, abs=slack)
    onnx = [r for r in rows if r.engine == "ONNX Runtime"]
    assert all(r.match and r.score_diff < 1e-3 and r.box_diff_px < 0.5 for r in onnx), onnx  # same outputs
    assert rows[0].score_diff is None  # PyTorch fp32 is the reference
    assert any("TensorRT" in n for n in notes) and any("fp16" in n for n in notes)  # said plainly, not hidden


@pytest.mark.slow
@pytest.mark.skipif(not __import__("backends.vision.export").vision.export.openvino_available(), reason="no openvino")
def test_openvino_rows_match_pytorch(det):
    rows, _ = det.latency("yolov8s-person", imgsz=320, runs=2, batches=(1, 2))
    ov = [r for r in rows if r.engine == "OpenVINO"]
    assert [(r.precision, r.batch) for r in ov][:2] == [("fp32", 1), ("fp32", 2)]
    assert all(r.match for r in ov) and ov[0].score_diff < 1e-3, ov
    zipped = det.export("yolov8s-person", "openvino", 320, for_download=True)
    assert zipped.suffix == ".zip" and zipped.parent == det.ctx.settings.outputs_dir / "vision"


def test_unavailable_engines_are_refused_with_the_reason(det, monkeypatch):
    import backends.vision.export as export

    monkeypatch.setattr(export, "tensorrt_available", lambda: False)
    with pytest.raises(DetectionError, match="TensorRT engine export is not available: TensorRT is not installed"):
        det.export("yolov8s-person", "engine")
    monkeypatch.setattr(export, "openvino_available", lambda: False)
    with pytest.raises(DetectionError, match="OpenVINO export is not available"):
        det.export("yolov8s-person", "openvino")
    with pytest.raises(DetectionError, match="unknown export format"):
        det.export("yolov8s-person", "tflite")


def test_untrained_model_cannot_be_exported(det):
    with pytest.raises(DetectionError, match="train it first"):
        det.export_onnx("yolov8n-untrained")


def test_summary_percentiles_and_output_comparison():
    row = summarize("x", "cpu", [float(v) for v in range(1, 101)], batch=8)
    assert (row.p50_ms, row.p95_ms, row.runs, row.fps) == (50.5, 95.0, 100, round(8000 / 50.5, 1))
    ref = np.zeros((1, 6, 10), np.float32)
    ref[0, 4, 3], ref[0, 0, 3] = 0.9, 100.0
    other = ref.copy()
    other[0, 0, 3] += 1.5
    assert compare_outputs(ref, other) == (0.0, 1.5)
    assert compare_outputs(ref, np.zeros((2, 6, 10))) == (float("inf"), float("inf"))
