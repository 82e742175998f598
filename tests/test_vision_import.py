"""Dataset import from labelling tools: small hand-written exports in the layouts Label Studio, CVAT and Roboflow
write (COCO JSON, Pascal VOC XML, Label Studio's YOLO export), good ones and broken ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from backends.vision.dataset_import import (
    DatasetImportError,
    ImportOptions,
    assign_splits,
    detect_format,
    import_dataset,
    parse_mapping,
)
from backends.vision.importers import Sample


def _img(path: Path, w: int = 64, h: int = 48) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (120, 80, 40)).save(path)
    return path


def _labels(dest: Path) -> dict[str, list[str]]:
    return {p.stem: p.read_text().split("\n")[:-1] for p in sorted(dest.glob("labels/*/*.txt"))}


def _coco(images, anns, cats) -> dict:
    return {"images": images, "annotations": anns, "categories": cats, "info": {"description": "hand-written"}}


def label_studio_coco(root: Path) -> Path:
    """Label Studio 'COCO' export: result.json beside images/, categories from 0, file_name 'images/<x>'."""
    for i in range(6):
        _img(root / "images" / f"a1b2c3d{i}-photo{i}.png")
    images = [{"id": i, "file_name": f"images/a1b2c3d{i}-photo{i}.png", "width": 64, "height": 48} for i in range(6)]
    anns = [{"id": i, "image_id": i, "category_id": i % 2, "bbox": [8, 6, 32, 24], "area": 768, "iscrowd": 0,
             "ignore": 0, "segmentation": []} for i in range(6)]  # fmt: skip
    anns.append({"id": 99, "image_id": 0, "category_id": 1, "bbox": [40, 30, 30, 20], "iscrowd": 0})  # past the edge
    cats = [{"id": 0, "name": "cat"}, {"id": 1, "name": "dog"}]
    (root / "result.json").write_text(json.dumps(_coco(images, anns, cats), indent=2))
    return root


def test_label_studio_coco_export_becomes_a_valid_yolo_dataset(tmp_path):
    src = label_studio_coco(tmp_path / "ls")
    assert detect_format(src) == "coco"
    report = import_dataset(src, tmp_path / "out")
    assert report.ok, report.markdown()
    assert report.names == ["cat", "dog"] and report.boxes == 7
    assert report.images["train"] + report.images["val"] == 6 and report.images["val"] >= 1
    assert report.dataset.ok and report.dataset.names == ["cat", "dog"]
    labels = _labels(tmp_path / "out")
    assert labels["a1b2c3d0-photo0"][0] == "0 0.375000 0.375000 0.500000 0.500000"  # (8+16)/64, (6+12)/48, 32/64
    x = labels["a1b2c3d0-photo0"][1].split()  # clipped to the image: x 40-64, y 30-48
    assert x[0] == "1" and [float(v) for v in x[1:]] == pytest.approx([52 / 64, 39 / 48, 24 / 64, 18 / 48], abs=1e-6)
    assert any("outside the 64x48 image; clipped" in w for w in report.warnings)
    assert "| cat | cat | 3 |" in report.markdown()


def test_cvat_coco_export_ids_from_one_and_crowd_regions(tmp_path):
    """CVAT 'COCO 1.0': annotations/instances_default.json, images/ at the top, category ids from 1."""
    root = tmp_path / "cvat"
    for name in ("frame_000000.jpg", "frame_000001.jpg", "frame_000002.jpg"):
        _img(root / "images" / name)
    images = [{"id": i + 1, "file_name": f"frame_00000{i}.jpg", "width": 64, "height": 48} for i in range(3)]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 2, "bbox": [0.5, 1.5, 10.25, 12.0], "iscrowd": 0, "attributes": {}},
        {"id": 2, "image_id": 2, "category_id": 1, "bbox": [4, 4, 20, 20], "iscrowd": 1},
        {"id": 3, "image_id": 3, "category_id": 1, "bbox": [4, 4, 20, 20], "iscrowd": 0},
    ]
    cats = [{"id": 1, "name": "car", "supercategory": ""}, {"id": 2, "name": "person", "supercategory": ""}]
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_default.json").write_text(json.dumps(_coco(images, anns, cats)))
    report = import_dataset(root, tmp_path / "out")
    assert report.ok, report.markdown()
    assert report.names == ["car", "person"] and report.boxes == 2
    assert report.skipped == {"crowd region (iscrowd=1)": 1}
    assert _labels(tmp_path / "out")["frame_000000"] == ["1 0.087891 0.156250 0.160156 0.250000"]
    assert _labels(tmp_path / "out")["frame_000001"] == []  # only a crowd region: a background image


def roboflow_coco(root: Path) -> Path:
    """Roboflow 'COCO': train/ and valid/ folders, each with _annotations.coco.json beside the images, and an
    umbrella category 0 that no box uses."""
    cats = [{"id": 0, "name": "fruits", "supercategory": "none"}, {"id": 1, "name": "apple", "supercategory": "fruits"},
            {"id": 2, "name": "pear", "supercategory": "fruits"}]  # fmt: skip
    for split, n in (("train", 4), ("valid", 2)):
        images, anns = [], []
        for i in range(n):
            name = f"IMG_{i}_jpg.rf.{split}{i}.jpg"
            _img(root / split / name)
            images.append({"id": i, "file_name": name, "width": 64, "height": 48})
            anns.append({"id": i, "image_id": i, "category_id": 1 + i % 2, "bbox": [10, 10, 20, 20], "iscrowd": 0})
        (root / split / "_annotations.coco.json").write_text(json.dumps(_coco(images, anns, cats)))
    return root


def test_roboflow_coco_keeps_its_split_and_drops_the_umbrella_class(tmp_path):
    src = roboflow_coco(tmp_path / "rf")
    (src / "train" / "extra.json").write_text(json.dumps({"name": "not coco"}))  # other JSON in an export
    (src / "copy.coco.json").write_text((src / "valid" / "_annotations.coco.json").read_text())
    report = import_dataset(src, tmp_path / "out")
    assert any("train/extra.json: not a COCO file" in w for w in report.warnings)
    assert sum("is annotated in both" in w for w in report.warnings) == 2  # the copy lists the 2 valid images
    assert report.ok, report.markdown()
    assert report.names == ["apple", "pear"]  # 'fruits' (id 0) is only a supercategory
    assert report.split_by == "export" and report.images == {"train": 4, "val": 2}
    assert any("supercategory" in why for why in report.skipped)
    hashed = import_dataset(tmp_path / "rf", tmp_path / "out2", ImportOptions(keep_splits=False, val_fraction=0.5))
    assert hashed.split_by == "hash" and sum(hashed.images.values()) == 6


def test_class_mapping_renames_merges_and_drops(tmp_path):
    src = roboflow_coco(tmp_path / "rf")
    opts = ImportOptions(rename=parse_mapping("apple = fruit\npear -> fruit  # merged\n"))
    report = import_dataset(src, tmp_path / "merged", opts)
    assert report.ok and report.names == ["fruit"] and report.boxes == 6
    assert {ln.split()[0] for lines in _labels(tmp_path / "merged").values() for ln in lines} == {"0"}
    dropped = import_dataset(src, tmp_path / "dropped", ImportOptions(rename=(("pear", ""),)))
    assert dropped.names == ["apple"] and dropped.boxes == 3 and "| pear | (dropped) | 3 |" in dropped.markdown()
    bad = import_dataset(src, tmp_path / "bad", ImportOptions(rename=(("banana", "x"),)))
    assert not bad.ok and "names 'banana', which the export does not have; its classes: apple, pear" in bad.errors[0]
    assert not (tmp_path / "bad").exists()  # nothing written
    with pytest.raises(DatasetImportError, match="line 2"):
        parse_mapping("a = b\njust a name\n")
    with pytest.raises(DatasetImportError, match="twice"):
        ImportOptions(rename=(("a", "b"), ("a", "c")))


def voc_export(root: Path, image_dir: str = "JPEGImages") -> Path:
    """CVAT 'PASCAL VOC 1.1' (Annotations/, JPEGImages/, ImageSets/Main/) or Label Studio's VOC (images/)."""
    for i in range(4):
        _img(root / image_dir / f"img{i}.jpg")
        objects = "".join(
            f"""
  <object>
    <name>{name}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>
    <bndbox><xmin>{x1}</xmin><ymin>5</ymin><xmax>{x1 + 19}</xmax><ymax>24</ymax></bndbox>
  </object>"""
            for name, x1 in (("bird", 1), ("boat", 31))[: 1 + i % 2]
        )
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"img{i}.xml").write_text(
            f"<annotation>\n  <folder></folder><filename>img{i}.jpg</filename>\n"
            f"  <size><width>64</width><height>48</height><depth>3</depth></size>{objects}\n</annotation>\n"
        )
    return root


@pytest.mark.parametrize("image_dir", ["JPEGImages", "images"])
def test_pascal_voc_export(tmp_path, image_dir):
    src = voc_export(tmp_path / "voc", image_dir)
    assert detect_format(src) == "voc"
    report = import_dataset(src, tmp_path / "out")
    assert report.ok, report.markdown()
    assert report.names == ["bird", "boat"] and report.boxes == 6
    assert _labels(tmp_path / "out")["img0"] == ["0 0.156250 0.291667 0.312500 0.416667"]  # 1-based: x 0-20, y 4-24


def test_voc_image_sets_give_the_split(tmp_path):
    src = voc_export(tmp_path / "voc")
    (src / "ImageSets" / "Main").mkdir(parents=True)
    (src / "ImageSets" / "Main" / "train.txt").write_text("img0\nimg1\nimg2\n")
    (src / "ImageSets" / "Main" / "val.txt").write_text("img3\n")
    report = import_dataset(src, tmp_path / "out")
    assert report.split_by == "export" and report.images == {"train": 3, "val": 1}
    assert (tmp_path / "out" / "labels" / "val" / "img3.txt").is_file()


def label_studio_yolo(root: Path) -> Path:
    """Label Studio 'YOLO' export: classes.txt, notes.json, images/ and labels/ without a split."""
    for i in range(5):
        _img(root / "images" / f"f{i}.jpg")
        (root / "labels").mkdir(parents=True, exist_ok=True)
        (root / "labels" / f"f{i}.txt").write_text(f"{i % 2} 0.5 0.5 0.25 0.5\n" if i < 4 else "")
    (root / "classes.txt").write_text("helmet\nvest\n")
    (root / "notes.json").write_text(json.dumps({"categories": [{"id": 0, "name": "helmet"}, {"id": 1, "name": "vest"}],
                                                 "info": {"year": 2026}}))  # fmt: skip
    return root


def test_label_studio_yolo_export(tmp_path):
    src = label_studio_yolo(tmp_path / "lsy")
    assert detect_format(src) == "yolo"
    report = import_dataset(src, tmp_path / "out")
    assert report.ok, report.markdown()
    assert report.names == ["helmet", "vest"] and report.boxes == 4
    assert _labels(tmp_path / "out")["f4"] == []  # a background image stays one
    (src / "classes.txt").unlink()  # notes.json alone names the classes too
    assert import_dataset(src, tmp_path / "out2").names == ["helmet", "vest"]


def test_the_hash_split_is_stable_and_never_leaves_a_split_empty(tmp_path):
    samples = [Sample(tmp_path / f"img{i}.jpg", "x") for i in range(40)]
    assign_splits(samples, tmp_path, ImportOptions())
    first = {s.image.name: s.split for s in samples}
    more = samples + [Sample(tmp_path / f"new{i}.jpg", "x") for i in range(10)]
    assign_splits(more, tmp_path, ImportOptions())
    assert all(first[s.image.name] == s.split for s in more[:40])  # adding images moves none of the old ones
    assert 3 <= sum(v == "val" for v in first.values()) <= 14
    two = [Sample(tmp_path / "a.jpg", "x"), Sample(tmp_path / "b.jpg", "x")]
    assign_splits(two, tmp_path, ImportOptions(val_fraction=0.05))
    assert sorted(s.split for s in two) == ["train", "val"]


# ---- broken exports (BAD_INPUTS.md: a clear message naming the file and line, nothing written) -----------
def test_broken_coco_files_name_file_and_line(tmp_path):
    src = label_studio_coco(tmp_path / "ls")
    text = (src / "result.json").read_text()
    (src / "result.json").write_text(text.replace('"width": 64,', '"width": 64', 1))  # a missing comma
    report = import_dataset(src, tmp_path / "out")
    assert (
        not report.ok
        and report.errors[0].startswith("result.json line 7 column")
        and "not valid JSON" in report.errors[0]
    )
    data = json.loads(text)
    data["annotations"][2]["category_id"] = 7
    data["annotations"][3]["bbox"] = [100, 100, 10, 10]
    data["annotations"][4]["image_id"] = 42
    data["annotations"][5]["bbox"] = [10, 10, -5, 4]
    (src / "result.json").write_text(json.dumps(data, indent=2))
    errors = "\n".join(import_dataset(src, tmp_path / "out").errors)
    assert (
        "result.json line 71: category_id 7 is not in 'categories'" in errors
    )  # the line where that annotation starts
    assert "box (100, 100, 110, 110) lies outside the 64x48 image" in errors
    assert "image_id 42 is not in 'images'" in errors and "box has no area" in errors
    assert not (tmp_path / "out").exists()


def test_non_utf8_annotation_files(tmp_path):
    src = label_studio_coco(tmp_path / "ls")
    (src / "result.json").write_text((src / "result.json").read_text(), encoding="utf-16")
    assert import_dataset(src, tmp_path / "out").errors[0] == "result.json: not UTF-8 text"
    yolo = label_studio_yolo(tmp_path / "lsy")
    (yolo / "labels" / "f0.txt").write_bytes("0 0,5 0,5 0,2 0,2 # é\n".encode("latin-1"))
    assert "labels/f0.txt: not UTF-8 text" in import_dataset(yolo, tmp_path / "out2").errors


def test_missing_and_traversing_image_names_are_refused(tmp_path):
    src = label_studio_coco(tmp_path / "ls")
    secret = _img(tmp_path / "secret.png")
    data = json.loads((src / "result.json").read_text())
    data["images"][0]["file_name"] = "../" + secret.name  # outside the export: never looked up as a path
    (src / "images" / "a1b2c3d1-photo1.png").unlink()
    (src / "result.json").write_text(json.dumps(data))
    errors = "\n".join(import_dataset(src, tmp_path / "out").errors)
    assert "images[0] file '../secret.png' is not in the export" in errors
    assert "images[1] file 'images/a1b2c3d1-photo1.png' is not in the export; add the image" in errors


def test_broken_voc_files(tmp_path):
    src = voc_export(tmp_path / "voc")
    bomb = '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "xxxxxxxxxx"><!ENTITY y "&x;&x;&x;&x;">]><annotation>&y;</annotation>'
    (src / "Annotations" / "img0.xml").write_text(bomb)
    (src / "Annotations" / "img1.xml").write_text("<annotation><filename>img1.jpg</filename><object>")
    xml = (src / "Annotations" / "img2.xml").read_text().replace("<xmax>20</xmax>", "<xmax>abc</xmax>")
    (src / "Annotations" / "img2.xml").write_text(xml)
    xml = (src / "Annotations" / "img3.xml").read_text().replace("<xmin>31</xmin>", "<xmin>60</xmin>")
    (src / "Annotations" / "img3.xml").write_text(xml.replace("<xmax>50</xmax>", "<xmax>40</xmax>"))
    errors = "\n".join(import_dataset(src, tmp_path / "out").errors)
    assert "Annotations/img0.xml: not valid XML: XML entity declarations are not allowed" in errors
    assert "Annotations/img1.xml: not valid XML" in errors
    assert (
        "Annotations/img2.xml line 4: <bndbox> needs numeric xmin, ymin, xmax, ymax; got ['1', '5', 'abc', '24']"
        in errors
    )
    assert "Annotations/img3.xml line 8: box has no area" in errors


def test_broken_yolo_export(tmp_path):
    src = label_studio_yolo(tmp_path / "lsy")
    (src / "labels" / "f1.txt").write_text("1 0.5 0.5 0.2 0.2\n2 0.5 0.5 0.2 0.2\n")
    (src / "labels" / "f2.txt").write_text("0 0.5 0.5 1.5 0.2\n")
    (src / "labels" / "f3.txt").unlink()
    errors = "\n".join(import_dataset(src, tmp_path / "out").errors)
    assert "labels/f1.txt line 2: class id 2 is out of range: classes.txt names 2 classes" in errors
    assert "labels/f2.txt line 1: coordinates must be in 0-1" in errors
    assert "images/f3.jpg: no label file labels/f3.txt" in errors


def test_unknown_layout_and_existing_destination(tmp_path):
    (tmp_path / "empty").mkdir()
    _img(tmp_path / "empty" / "x.png")
    with pytest.raises(DatasetImportError, match="could not tell the export's format"):
        import_dataset(tmp_path / "empty", tmp_path / "out")
    src = label_studio_yolo(tmp_path / "lsy")
    assert import_dataset(src, tmp_path / "out").ok
    with pytest.raises(DatasetImportError, match="already exists; choose another name"):
        import_dataset(src, tmp_path / "out")
    with pytest.raises(DatasetImportError, match="validation share"):
        ImportOptions(val_fraction=0.9)
