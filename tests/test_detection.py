"""Detection with the shipped weights through the residency manager: images, filters, video, trust policy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from backends.vision.detection import TRUST_WARNING, DetectionError, DetectOptions

ASSETS = Path(__import__("importlib").util.find_spec("ultralytics").origin).parent / "assets"
BUS = ASSETS / "bus.jpg"


@pytest.fixture
def det(ctx):
    return ctx.backends.detection


def test_catalog_models_are_listed(det):
    kinds = {m.id: m.kind for m in det.models()}
    assert kinds["yolov8s-person"] == "shipped"
    assert {"yolov8n-untrained", "yolov8s-untrained", "yolo11n-untrained"} <= {
        k for k, v in kinds.items() if v == "untrained"
    }
    assert "yolov8s-coco" not in kinds  # Hub weights are listed only once downloaded


def test_shipped_weights_find_the_people_in_bus_jpg(det, ctx):
    result = det.detect("yolov8s-person", BUS)
    people = [b for b in result.boxes if b.name == "Normal" and b.confidence > 0.4]
    # bus.jpg (810x1080) shows four standing people; each box is a tall, person-shaped box in the lower half
    assert len(people) >= 3, result.rows()
    for b in people:
        assert b.y2 - b.y1 > 1.5 * (b.x2 - b.x1) and b.y2 - b.y1 > 300 and b.y1 > 200
    assert (result.width, result.height) == (810, 1080)
    assert result.image.shape == (1080, 810, 3) and result.image.dtype == np.uint8
    assert ctx.residency.is_registered("detection:yolov8s-person")


def test_rgb_array_input_matches_file_input(det):
    from PIL import Image

    rgb = np.asarray(Image.open(BUS).convert("RGB"))
    a = det.detect("yolov8s-person", BUS)
    b = det.detect("yolov8s-person", rgb)
    assert len(a.boxes) == len(b.boxes)
    assert np.allclose([[x.x1, x.y1, x.x2, x.y2] for x in a.boxes], [[x.x1, x.y1, x.x2, x.y2] for x in b.boxes], atol=1)


def test_confidence_and_class_filters(det):
    low = det.detect("yolov8s-person", BUS, DetectOptions(conf=0.1))
    high = det.detect("yolov8s-person", BUS, DetectOptions(conf=0.6))
    assert len(high.boxes) < len(low.boxes)
    assert all(b.confidence >= 0.6 for b in high.boxes)
    only_fall = det.detect("yolov8s-person", BUS, DetectOptions(conf=0.1, classes=(1,)))
    assert all(b.class_id == 1 for b in only_fall.boxes)
    with pytest.raises(DetectionError, match="beyond this model's 2 classes"):
        det.detect("yolov8s-person", BUS, DetectOptions(classes=(5,)))


@pytest.mark.parametrize(
    ("kwargs", "msg"),
    [({"conf": 1.5}, "confidence"), ({"iou": 0}, "IoU"), ({"imgsz": 100}, "multiple of 32"), ({"max_det": 0}, "max")],
)
def test_bad_options_are_refused(kwargs, msg):
    with pytest.raises(DetectionError, match=msg):
        DetectOptions(**kwargs)


def test_corrupt_and_missing_images_give_clear_messages(det, tmp_path):
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(BUS.read_bytes()[:300])
    with pytest.raises(DetectionError, match=r"photo\.jpg is not a readable image"):
        det.detect("yolov8s-person", bad)
    with pytest.raises(DetectionError, match="No image given"):
        det.detect("yolov8s-person", None)
    with pytest.raises(DetectionError, match="Unknown detection model"):
        det.detect("no-such-model", BUS)


def test_untrusted_pickles_are_refused_and_trusted_ones_load(det, ctx, tmp_path):
    copy = tmp_path / "someone_elses.pt"
    shutil.copyfile(det.get_model("yolov8s-person").path, copy)
    with pytest.raises(DetectionError, match="outside the folders this studio allows"):
        det.add_trusted_weights(copy)  # not in a folder the settings trust: refused before anything unpickles it
    assert "pickles" in TRUST_WARNING
    with pytest.raises(DetectionError, match="Unknown detection model"):
        det.detect(str(copy), BUS)  # a path is never loaded just because it was named
    trusted = ctx.settings.models_dir / "mine" / "people.pt"
    trusted.parent.mkdir(parents=True)
    shutil.copyfile(copy, trusted)
    assert trusted.resolve() in det.trusted_files()
    entry = det.add_trusted_weights(trusted)
    assert entry.kind == "trusted" and entry.id.startswith("file-")
    assert len(det.detect(entry.id, BUS).boxes) >= 3
    pointer = ctx.settings.models_dir / "lfs.pt"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1\n")
    with pytest.raises(Exception, match="git-LFS pointer"):
        det.add_trusted_weights(pointer)
    link = ctx.settings.models_dir / "link.pt"
    link.symlink_to(copy)  # a link out of the trusted folder does not make its target trusted
    with pytest.raises(DetectionError, match="outside"):
        det.add_trusted_weights(link)


def test_untrained_model_runs(det):
    result = det.detect("yolov8n-untrained", BUS, DetectOptions(imgsz=320))
    assert result.image.shape == (1080, 810, 3)  # output is garbage by design, but the path works


def test_json_export(det):
    result = det.detect("yolov8s-person", BUS)
    path = det.save_json(result, "bus")
    data = json.loads(path.read_text())
    assert path.parent == det.ctx.settings.outputs_dir / "vision"
    assert data["model"] == "yolov8s-person" and len(data["boxes"]) == len(result.boxes)
    assert {"class_id", "name", "confidence", "x1", "y1", "x2", "y2"} == set(data["boxes"][0])


def _make_video(path: Path, n: int = 6) -> Path:
    import cv2

    frame = cv2.resize(cv2.imread(str(BUS)), (270, 360))
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, (270, 360))
    for i in range(n):
        w.write(np.roll(frame, 4 * i, axis=1))
    w.release()
    return path


def test_video_with_stride_streams_progress_and_writes_annotated_video(det, tmp_path):
    import cv2

    video = _make_video(tmp_path / "walk.avi")
    updates = list(det.detect_video("yolov8s-person", video, DetectOptions(imgsz=320), stride=2, chunk=4))
    assert len(updates) >= 2 and updates[0].output is None
    last = updates[-1]
    assert last.frames_read == 6 and last.frames_detected == 3 and last.boxes >= 3
    assert last.output.suffix == ".webm" and last.output.parent == det.ctx.settings.outputs_dir / "vision"
    cap = cv2.VideoCapture(str(last.output))
    frames = 0
    while cap.read()[0]:
        frames += 1
    assert frames == 6
    data = json.loads(last.json_path.read_text())
    assert [f["frame"] for f in data["frames"]] == [0, 2, 4]


def test_unreadable_video_is_refused(det, tmp_path):
    bad = tmp_path / "clip.mp4"
    bad.write_bytes(b"\0" * 1000)
    with pytest.raises(DetectionError, match=r"clip\.mp4 is not a readable video"):
        list(det.detect_video("yolov8s-person", bad))


def test_ultralytics_does_not_break_pil_errors_for_other_tabs(settings, tmp_path):
    """Ultralytics patches PIL.Image.open to fetch a HEIF plugin; offline that turned every unreadable image anywhere
    in the studio into ModuleNotFoundError. After prepare_ultralytics PIL raises its own error again."""
    from PIL import Image, UnidentifiedImageError

    from backends.vision.detection import prepare_ultralytics

    prepare_ultralytics(settings)
    from ultralytics import YOLO  # noqa: F401  (the full import must not re-apply the patch)

    fake = tmp_path / "photo.png"
    fake.write_bytes(b"PK\x03\x04" + bytes(200))
    with pytest.raises(UnidentifiedImageError):
        Image.open(fake)


def test_ultralytics_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    """last.pt / best.pt: per-epoch `write_bytes` and the final strip_optimizer both go through temp + rename."""
    import ultralytics.engine.trainer as trainer_module

    from backends.vision.checkpoints import AtomicPath, atomic_checkpoints, install_atomic_strip

    trainer = type("T", (), {"last": tmp_path / "last.pt", "best": tmp_path / "best.pt"})()
    atomic_checkpoints(trainer)
    assert isinstance(trainer.last, AtomicPath)
    trainer.last.write_bytes(b"epoch-1")
    seen = []

    def fake_strip(f, s="", updates=None):
        seen.append(Path(s).name)
        Path(s).write_bytes(b"stripped")
        return {}

    monkeypatch.setattr(trainer_module, "strip_optimizer", fake_strip)
    install_atomic_strip()
    trainer_module.strip_optimizer(trainer.last)
    assert seen[0].startswith(".last.pt.") and seen[0].endswith(".tmp")  # written beside, then renamed over
    assert (tmp_path / "last.pt").read_bytes() == b"stripped" and sorted(p.name for p in tmp_path.iterdir()) == [
        "last.pt"
    ]
