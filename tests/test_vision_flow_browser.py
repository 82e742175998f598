"""Issue 22's done-when flow in a real browser, as a user does it (slow: a launched studio, a short YOLO training,
an ONNX + OpenVINO export and the latency table).

Headless Debian chromium driven by Playwright against `python -m studio.app`: upload a Label Studio "COCO" export
(.zip: result.json beside images/, hashed file names, categories from 0) of synthetic shapes pictures with exact
boxes, import it in Vision → Train, train an untrained YOLOv8n on it with early-stopping patience set, pick the
trained run in the model list, export it in Vision → Export and read the latency table (PyTorch vs ONNX Runtime,
outputs matching), with TensorRT said to be unavailable here.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from backends.vision.synth import SYNTH_SHAPES, make_synthetic_dataset
from tests._studio_server import running_studio
from tests.test_e2e_browser import _new_page, _open, _upload, _visible, browser  # noqa: F401 (skips without chromium)

pytestmark = pytest.mark.slow  # ~2 min on the loaded 2-core machine
WAIT_MS = 400_000
SIZE = 96  # training image size: the synthetic pictures' own


def label_studio_zip(tmp: Path) -> Path:
    """A Label Studio 'COCO' export of 24 synthetic pictures, zipped as the tool downloads it."""
    src = tmp / "synth"
    make_synthetic_dataset(src, n_train=20, n_val=4, imgsz=SIZE, seed=3, suffix=".jpg")
    export = tmp / "project-7-at-2026-12-01-10-00-1f2e3d4c"
    (export / "images").mkdir(parents=True)
    images, anns = [], []
    for i, img in enumerate(sorted(src.glob("images/*/*.jpg"))):
        name = f"{i:04x}c0de-{img.parent.name}-{img.name}"  # Label Studio prefixes its upload hash
        shutil.copyfile(img, export / "images" / name)
        images.append({"id": i, "file_name": f"images/{name}", "width": SIZE, "height": SIZE})
        for line in (src / "labels" / img.parent.name / f"{img.stem}.txt").read_text().splitlines():
            k, cx, cy, w, h = (float(v) for v in line.split())
            box = [(cx - w / 2) * SIZE, (cy - h / 2) * SIZE, w * SIZE, h * SIZE]
            anns.append({"id": len(anns), "image_id": i, "category_id": int(k), "bbox": box, "area": box[2] * box[3],
                         "iscrowd": 0, "ignore": 0, "segmentation": []})  # fmt: skip
    cats = [{"id": i, "name": n} for i, n in enumerate(SYNTH_SHAPES)]
    info = {"year": 2026, "version": "1.0", "description": "", "contributor": "Label Studio", "url": ""}
    result = {"images": images, "categories": cats, "annotations": anns, "info": info}
    (export / "result.json").write_text(json.dumps(result, indent=2))
    return Path(shutil.make_archive(str(export), "zip", export))


def _subtab(vision, title: str):
    vision.get_by_role("tab", name=title, exact=True).click()
    panel = vision.get_by_role("tabpanel").locator("visible=true").first
    panel.wait_for()
    return panel


def _choose(page, box, option: re.Pattern) -> None:
    box.click()
    page.get_by_role("option", name=option).first.click()


def test_import_train_export_and_compare_latency_in_the_browser(tmp_path, browser):  # noqa: F811
    export_zip = label_studio_zip(tmp_path)
    with running_studio(tmp_path / "studio") as studio:
        page = _new_page(browser, studio.url)
        page.set_default_timeout(30_000)
        vision = _open(page, "Vision")

        train = _subtab(vision, "Train")  # 1. import the labelling tool's export
        _upload(train, export_zip)
        train.get_by_text("Import from a labelling tool (Label Studio, CVAT, Roboflow)").click()  # the accordion
        train.get_by_label("New dataset name").fill("shapes-ls")
        train.get_by_role("button", name="Import", exact=True).click()
        report = _visible(train.get_by_text(re.compile(r"Import.* of .*COCO.*: done")))
        report.wait_for(timeout=120_000)
        _visible(train.get_by_text(re.compile(r"images: train \d+, val \d+"))).wait_for()
        folder = train.get_by_label(re.compile("or a folder on the studio's computer"))
        assert folder.input_value().endswith("shapes-ls"), folder.input_value()

        _choose(page, train.get_by_label("Start from (its task: detect, segment, classify)"),  # 2. train
                re.compile(r"\[detect\] YOLOv8n from yaml"))  # fmt: skip
        train.get_by_label("Epochs", exact=True).fill("3")
        train.get_by_label("Image size", exact=True).fill(str(SIZE))
        train.get_by_label("Batch (0 = auto)").fill("8")
        train.get_by_label("Early stopping patience (epochs)").fill("2")
        train.get_by_label("Augmentation", exact=True).click()
        page.get_by_role("option", name="light", exact=True).click()
        train.get_by_role("button", name="Train", exact=True).click()
        _visible(train.get_by_text(re.compile(r"Queued|Started|running"))).wait_for(timeout=60_000)
        done = _visible(train.get_by_text(re.compile(r"done: \d+ epochs")))
        done.wait_for(timeout=WAIT_MS)
        args = [yaml.safe_load(p.read_text()) for p in (studio.data_dir / "runs").glob("*/ultralytics/args.yaml")]
        assert len(args) == 1 and args[0]["patience"] == 2 and args[0]["imgsz"] == SIZE, args  # what Ultralytics got
        assert "shapes-ls" in args[0]["data"] or Path(args[0]["data"]).is_file()

        # 3. the trained run is in the model list: the poll that said "done" refreshed it (no Refresh press)
        _choose(page, vision.get_by_label("Model", exact=True), re.compile(r"^trained: "))

        exp = _subtab(vision, "Export")  # 4. export and compare latencies
        _visible(exp.get_by_text(re.compile(r"Not available here: .*TensorRT"))).wait_for()
        _choose(page, exp.get_by_label("Image size", exact=True), re.compile("^320$"))
        exp.get_by_label("8", exact=True).uncheck()
        exp.get_by_role("button", name="Export and compare latency").click()
        _visible(exp.get_by_text("ONNX Runtime", exact=True)).wait_for(timeout=WAIT_MS)  # a cell of the table
        table = exp.inner_text()  # the section's text, the latency table's cells included
        assert re.search(r"PyTorch\s+fp32\s+1\s+cpu", table), table
        onnx = r"ONNX Runtime\s+fp32\s+1\s+cpu(\s+[\d.]+){3}\s+\S+ / [\d.]+ px\s+yes"  # timed, outputs match
        assert re.search(onnx, table), table
        _visible(exp.get_by_text(re.compile(r"\.onnx"))).wait_for()  # the exported file, offered for download
        assert page.errors == [], page.errors

        page.reload()  # 5. a reloaded page lists the training too (the page was built before it existed)
        vision = _open(page, "Vision")
        _choose(page, vision.get_by_label("Model", exact=True), re.compile(r"^trained: "))
        assert page.errors == [], page.errors
        page.close()
