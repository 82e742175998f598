"""Dataset validation, safe unzip and the synthetic generator (no model needed: fast)."""

from __future__ import annotations

import io
import shutil
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from backends.vision.data import (
    DatasetError,
    ZipLimits,
    label_path_for,
    safe_extract_zip,
    validate_dataset,
    write_training_yaml,
)
from backends.vision.synth import make_synthetic_dataset


@pytest.fixture(scope="module")
def good_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ds") / "shapes"
    make_synthetic_dataset(root, n_train=8, n_val=4, imgsz=64, seed=1)
    return root


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ds"
    shutil.copytree(src, dst)
    return dst


def _errors(root: Path) -> str:
    report = validate_dataset(root, compute_hash=False)
    assert not report.ok, "expected the dataset to be refused"
    return "\n".join(report.errors)


def test_synthetic_dataset_is_valid_and_labels_match_shapes(good_dataset):
    report = validate_dataset(good_dataset)
    assert report.ok, report.errors
    assert report.names == ["circle", "square", "triangle"]
    assert report.splits["train"].images == 8 and report.splits["val"].images == 4
    assert report.splits["train"].instances >= 8  # at least one shape per image
    assert len(report.dataset_hash) == 64
    # the centre of every labelled box is painted in a shape colour (each channel 30 or 230): the labels are true
    for img in sorted((good_dataset / "images" / "train").glob("*.png")):
        pixels = np.asarray(Image.open(img).convert("RGB"))
        for line in label_path_for(img).read_text().split("\n"):
            if line:
                cls, cx, cy, w, h = map(float, line.split())
                assert 0 <= cls < 3 and 0 < w <= 1 and 0 < h <= 1
                centre = pixels[int(cy * 64), int(cx * 64)]
                assert set(centre.tolist()) <= {30, 230}, (img.name, line, centre)
    assert "valid" in report.markdown()


def test_generator_is_deterministic(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", n_train=2, n_val=1, imgsz=64, seed=7).parent
    b = make_synthetic_dataset(tmp_path / "b", n_train=2, n_val=1, imgsz=64, seed=7).parent
    assert validate_dataset(a).dataset_hash == validate_dataset(b).dataset_hash


def test_missing_label_file_names_the_image(good_dataset, tmp_path):
    root = _copy(good_dataset, tmp_path)
    (root / "labels" / "train" / "00003.txt").unlink()
    msg = _errors(root)
    assert "images/train/00003.png" in msg and "labels/train/00003.txt" in msg


def test_empty_label_file_is_a_background_image(good_dataset, tmp_path):
    root = _copy(good_dataset, tmp_path)
    (root / "labels" / "train" / "00003.txt").write_text("")
    report = validate_dataset(root, compute_hash=False)
    assert report.ok and report.splits["train"].background == 1


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("7 0.5 0.5 0.2 0.2", "class id 7 is out of range: data.yaml names 3 classes (ids 0-2)"),
        ("-1 0.5 0.5 0.2 0.2", "class id -1 is out of range"),
        ("1 0.5 0.5 0.2", "expected 5 values"),
        ("1 0.5 abc 0.2 0.2", "'abc' is not a number"),
        ("1 0.5 0.5 1.7 0.2", "normalised to 0-1"),
        ("1 0.5 0.5 0 0.2", "width and height must be > 0"),
        ("1.5 0.5 0.5 0.2 0.2", "out of range"),
    ],
)
def test_bad_label_lines_name_file_and_line(good_dataset, tmp_path, line, expected):
    root = _copy(good_dataset, tmp_path)
    label = root / "labels" / "val" / "00001.txt"
    label.write_text("0 0.5 0.5 0.1 0.1\n" + line + "\n")
    msg = _errors(root)
    assert "labels/val/00001.txt line 2" in msg and expected in msg


def test_empty_split_and_missing_split(good_dataset, tmp_path):
    root = _copy(good_dataset, tmp_path)
    for f in (root / "images" / "val").iterdir():
        f.unlink()
    assert "val split is empty" in _errors(root)
    data = yaml.safe_load((root / "data.yaml").read_text())
    del data["val"]
    (root / "data.yaml").write_text(yaml.safe_dump(data))
    assert "missing 'val:'" in _errors(root)


@pytest.mark.parametrize("kind", ["truncated", "zip-renamed-png", "empty"])
def test_corrupt_images_are_named(good_dataset, tmp_path, kind):
    root = _copy(good_dataset, tmp_path)
    img = root / "images" / "train" / "00002.png"
    if kind == "truncated":
        img.write_bytes(img.read_bytes()[:200])
    elif kind == "zip-renamed-png":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("a.txt", "hello")
        img.write_bytes(buf.getvalue())
    else:
        img.write_bytes(b"")
    msg = _errors(root)
    assert "images/train/00002.png: not a readable image" in msg


def test_yaml_problems(good_dataset, tmp_path):
    root = _copy(good_dataset, tmp_path)
    (root / "data.yaml").unlink()
    assert "no data.yaml" in _errors(root)
    (root / "data.yaml").write_text("train: images/train\nval: images/val\nnames: [a, b]\nnc: 3\n")
    assert "nc is 3 but 'names' lists 2" in _errors(root)
    (root / "data.yaml").write_text("train: ../../etc\nval: images/val\nnames: [a]\n")
    assert "points outside the dataset folder" in _errors(root)
    (root / "data.yaml").write_text("train: [images/train\n")
    assert "not valid YAML" in _errors(root)


def test_training_yaml_drops_download_scripts(good_dataset, tmp_path):
    root = _copy(good_dataset, tmp_path)
    data = yaml.safe_load((root / "data.yaml").read_text())
    data["download"] = "import os; os.system('touch /tmp/pwned')"  # Ultralytics would exec() this
    (root / "data.yaml").write_text(yaml.safe_dump(data))
    report = validate_dataset(root)
    out = yaml.safe_load(write_training_yaml(report, tmp_path / "clean.yaml").read_text())
    assert set(out) == {"path", "train", "val", "names"}
    assert Path(out["train"]).is_absolute() and out["names"] == {0: "circle", 1: "square", 2: "triangle"}


def test_write_training_yaml_refuses_invalid(good_dataset, tmp_path):
    root = _copy(good_dataset, tmp_path)
    (root / "labels" / "train" / "00000.txt").write_text("9 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DatasetError, match="class id 9"):
        write_training_yaml(validate_dataset(root), tmp_path / "x.yaml")


# ---- zips ------------------------------------------------------------------------------------------------
def _zip(path: Path, entries: dict[str, bytes], *, symlink: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return path


@pytest.mark.parametrize("name", ["../evil.txt", "/abs/evil.txt", "a/../../evil.txt", "C:/evil.txt"])
def test_zip_traversal_is_refused_before_writing(tmp_path, name):
    z = _zip(tmp_path / "bad.zip", {"ok.txt": b"x", name: b"evil"})
    with pytest.raises(DatasetError, match="path traversal"):
        safe_extract_zip(z, tmp_path / "out")
    assert not (tmp_path / "out" / "ok.txt").exists()
    assert not (tmp_path / "evil.txt").exists()


def test_zip_symlink_and_bomb_are_refused(tmp_path):
    with pytest.raises(DatasetError, match="symbolic link"):
        safe_extract_zip(_zip(tmp_path / "l.zip", {}, symlink="link"), tmp_path / "o1")
    bomb = _zip(tmp_path / "b.zip", {"zeros.bin": b"\0" * (20 * 2**20)})
    with pytest.raises(DatasetError, match="zip bomb"):
        safe_extract_zip(bomb, tmp_path / "o2")
    with pytest.raises(DatasetError, match="limit"):
        safe_extract_zip(_zip(tmp_path / "s.zip", {"a.bin": b"1" * 5000}), tmp_path / "o3", ZipLimits(1000))
    (tmp_path / "notzip.zip").write_bytes(b"PNG not a zip")
    with pytest.raises(DatasetError, match="not a readable zip"):
        safe_extract_zip(tmp_path / "notzip.zip", tmp_path / "o4")


def test_zip_roundtrip_validates(good_dataset, tmp_path):
    z = tmp_path / "ds.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in good_dataset.rglob("*"):
            if f.is_file():
                zf.write(f, "shapes/" + f.relative_to(good_dataset).as_posix())  # one top folder, as zips often have
    out = safe_extract_zip(z, tmp_path / "out")
    report = validate_dataset(out)
    assert report.ok, report.errors
    assert report.yaml_path == out / "shapes" / "data.yaml"


def test_decompression_bomb_image_is_refused(good_dataset, tmp_path):
    root = _copy(good_dataset, tmp_path)
    big = root / "images" / "train" / "00001.png"
    Image.new("1", (20000, 10000)).save(big)  # 200 MP, tiny file
    assert "decompression-bomb guard" in _errors(root)


def test_hash_ignores_ultralytics_cache_files(good_dataset, tmp_path):
    root = _copy(good_dataset, tmp_path)
    before = validate_dataset(root).dataset_hash
    (root / "labels" / "train.cache").write_bytes(b"written by training")
    assert validate_dataset(root).dataset_hash == before
    (root / "labels" / "train" / "00000.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    assert validate_dataset(root).dataset_hash != before
