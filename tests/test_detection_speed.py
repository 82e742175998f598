"""detect()'s fast path: the decode overlaps the lease, the image is drawn once when read, class names need no lease."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from backends.vision.detection import DetectionError, DetectOptions

ASSETS = Path(__import__("importlib").util.find_spec("ultralytics").origin).parent / "assets"
BUS = ASSETS / "bus.jpg"
SMALL = DetectOptions(imgsz=320)


@pytest.fixture
def det(ctx):
    return ctx.backends.detection


def test_the_decode_runs_while_the_lease_is_taken(det, ctx, monkeypatch):
    """The decode waits here until the lease has begun (its card reading): run one after the other, it never would."""
    import backends.vision.detection as detection

    assert det.overlap_decode is None and not ctx.residency.device.startswith("cuda")  # auto: off on a CPU
    det.overlap_decode = True  # what a GPU does
    det.detect("yolov8s-person", BUS, SMALL)  # loaded: the lease below is the resident fast path
    began, seen = threading.Event(), {}
    real_read, real_decode = ctx.residency._probe.read, detection.decode_file

    def read():
        began.set()
        return real_read()

    def decode(path):
        seen["during the lease"] = began.wait(10)
        seen["thread"] = threading.current_thread().name
        return real_decode(path)

    monkeypatch.setattr(ctx.residency._probe, "read", read)
    monkeypatch.setattr(detection, "decode_file", decode)
    res = det.detect("yolov8s-person", BUS, SMALL)
    assert seen["during the lease"] and seen["thread"].startswith("vision-decode")
    assert len([b for b in res.boxes if b.confidence > 0.4]) >= 2  # people found at 320 px as at 640


@pytest.mark.parametrize("overlap", [True, False])
def test_a_non_image_is_refused_before_any_model_moves(det, ctx, tmp_path, overlap):
    det.overlap_decode = overlap
    fake = tmp_path / "photo.png"
    fake.write_bytes(b"PK\x03\x04" + bytes(2000))  # a zip renamed .png
    with pytest.raises(DetectionError, match=r"photo\.png is not a readable image"):
        det.detect("yolov8n-untrained", fake)
    assert not ctx.residency.is_registered("detection:yolov8n-untrained")  # nothing was registered, let alone loaded


def test_with_the_model_on_the_card_the_header_check_runs_on_the_decoder_thread(det, ctx, tmp_path, monkeypatch):
    import backends.vision.detection as detection

    det.overlap_decode = True
    det.detect("yolov8s-person", BUS, SMALL)
    checked, real_check = [], detection.check_file
    monkeypatch.setattr(
        detection, "check_file", lambda p: (checked.append(threading.current_thread().name), real_check(p))[1]
    )
    monkeypatch.setattr(ctx.residency, "is_resident", lambda key: True)  # the simulated CPU tier has no card
    det.detect("yolov8s-person", BUS, SMALL)
    assert len(checked) == 1 and checked[0].startswith("vision-decode")
    fake = tmp_path / "photo.png"
    fake.write_bytes(b"PK\x03\x04" + bytes(2000))
    with pytest.raises(DetectionError, match=r"photo\.png is not a readable image"):
        det.detect("yolov8s-person", fake, SMALL)
    assert len(det.detect("yolov8s-person", BUS, SMALL).boxes) >= 2


def test_a_corrupt_middle_fails_inside_the_lease_with_the_file_name(det, tmp_path):
    det.overlap_decode = True
    data = bytearray(BUS.read_bytes())
    data[2000:-2] = bytes(len(data) - 2002)  # header and end marker intact, the scan data zeroed
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(bytes(data))
    try:
        res = det.detect("yolov8s-person", bad, SMALL)
    except DetectionError as e:  # PIL's strict decoder refused it
        assert "broken.jpg" in str(e)
    else:  # OpenCV decoded a grey picture: a valid result, of the right size
        assert res.image.shape == (1080, 810, 3)
    assert len(det.detect("yolov8s-person", BUS, SMALL).boxes) >= 2  # and the next call works


def test_the_image_is_drawn_once_when_first_read(det):
    original = det.detect("yolov8s-person", BUS, SMALL)  # drawn from a fresh decode: the reference
    expected = original.image.copy()
    res = det.detect("yolov8s-person", BUS, SMALL)
    assert res.draw is not None  # boxes are there, nothing drawn yet
    assert [b.name for b in res.boxes] == [b.name for b in original.boxes]
    images = []
    threads = [threading.Thread(target=lambda: images.append(res.image)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(im is images[0] for im in images) and res.draw is None
    assert np.array_equal(images[0], expected)  # four readers, one drawing: the boxes were not drawn twice
    plain = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(BUS).convert("RGB"), dtype=int)
    assert (np.abs(images[0].astype(int) - plain).sum(axis=2) > 60).mean() > 0.005  # boxes and labels are on it


def test_class_names_need_no_lease_once_loaded(det, ctx, monkeypatch):
    assert det.class_names("yolov8s-person") == {0: "Normal", 1: "Fall"}  # loads it

    def no_lease(*a, **k):
        raise AssertionError("class_names took a lease")

    monkeypatch.setattr(ctx.residency, "run", no_lease)
    names = det.class_names("yolov8s-person")
    assert names == {0: "Normal", 1: "Fall"}
    names[0] = "changed"
    assert det.class_names("yolov8s-person")[0] == "Normal"  # a copy each time


def test_the_benchmark_times_every_path_and_writes_its_targets(tmp_path):
    """The end-to-end part of `python -m studio.bench.detection` (the one GPU run has no second chance)."""
    import json

    from studio.bench.detection import main

    args = ["--e2e-only", "--e2e-imgsz", "32", "--e2e-runs", "2", "--warmup", "0", "--overlap", "on"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("detection-e2e-*.json")
    res = json.loads(path.read_text())
    e = res["end_to_end"]
    assert "error" not in e and e["imgsz"] == 32 and len(e["paths"]) == 4 and e["decode_overlaps_lease"]
    assert all(p["p50_ms"] > 0 for p in e["paths"].values())
    assert set(e["parts_p50_ms"]) == {"header check", "decode", "lease", "predict in lease", "boxes", "drawing"}
    assert [t["name"] for t in res["targets"]] == ["detect() / Ultralytics predict, end to end (p50)"]
    assert "decode, then lease (before)" in path.with_suffix(".md").read_text()
