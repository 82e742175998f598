"""The Vision tab builds, imports no torch, and its main events work end to end through a real Gradio server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

BUS = Path(__import__("importlib").util.find_spec("ultralytics").origin).parent / "assets" / "bus.jpg"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def client(ctx):
    import gradio as gr
    from gradio_client import Client, handle_file

    from tabs.vision import TAB

    with gr.Blocks() as demo, gr.Tab(TAB.title):
        TAB.build(ctx)
    demo.queue()
    demo.launch(prevent_thread_lock=True, quiet=True, allowed_paths=[str(ctx.settings.outputs_dir.resolve())])
    try:
        yield Client(demo.local_url, verbose=False), handle_file
    finally:
        demo.close()


def test_detect_validate_and_errors_through_the_ui(client, ctx, tmp_path):
    from gradio_client.exceptions import AppError

    from backends.vision.synth import make_synthetic_dataset

    c, handle_file = client
    img, summary, table, json_file = c.predict(
        "yolov8s-person", handle_file(str(BUS)), 0.25, 0.7, [], 640, api_name="/vision_detect"
    )
    from PIL import Image

    assert Image.open(img).size == (810, 1080)  # the annotated image came back
    assert summary.startswith(f"**Found {len(table['data'])} Normal**") and len(table["data"]) >= 3
    assert "classes of this model: Normal, Fall" in summary and "people" in summary  # not COCO: said with the result
    assert {row[0] for row in table["data"]} == {"Normal"}
    assert len(json.loads(Path(json_file).read_text())["boxes"]) == len(table["data"])

    ds = ctx.settings.data_dir / "ingest" / "ds"  # a server folder must be under the settings' data roots
    make_synthetic_dataset(ds, n_train=4, n_val=2, imgsz=64)
    report = c.predict(None, str(ds), "yolov8s-person", api_name="/vision_validate")  # (the count: session state)
    assert "— valid" in report and "train: 4 images" in report
    (ds / "labels" / "val" / "00000.txt").write_text("5 0.5 0.5 0.1 0.1\n")
    report = c.predict(None, str(ds), "yolov8s-person", api_name="/vision_validate")
    assert "NOT valid" in report and "class id 5 is out of range" in report

    with pytest.raises(AppError, match="not a readable image"):
        bad = tmp_path / "bad.jpg"
        bad.write_bytes(BUS.read_bytes()[:5000])  # header intact, pixels cut off
        c.predict("yolov8s-person", handle_file(str(bad)), 0.25, 0.7, [], 640, api_name="/vision_detect")
    with pytest.raises(AppError, match="class id 5"):
        c.predict(None, str(ds), "yolov8s-person", 1, 64, 2, 1, 0, "default", False, 0, api_name="/vision_train")
    with pytest.raises(AppError, match=r"not allowed|outside the folders"):
        c.predict(None, str(tmp_path), "yolov8s-person", api_name="/vision_validate")  # other server folders: refused


def test_labels_stay_inside_the_image_and_the_sample_dataset_is_valid(ctx):
    import numpy as np

    from backends.vision import Box
    from backends.vision.draw import draw_boxes

    img = draw_boxes(np.zeros((100, 200, 3), np.uint8), [Box(0, "Normal", 0.9, 150, 0, 199, 60)])
    top_right = img[:10, 120:200].reshape(-1, 3)
    assert (top_right == (255, 56, 56)).all(axis=1).any()  # the label box is drawn, inside the frame
    det = ctx.backends.detection
    root = det.make_sample_dataset(n_train=6, n_val=2)
    report = det.check_dataset(root)
    assert "— valid" in report.markdown() and det.make_sample_dataset() == root  # made once, reused
    assert det.check_dataset_folder(root) == root.resolve()  # the Train button accepts the sample's folder
