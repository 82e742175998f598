"""The Vision tab's new sections through a real Gradio server: import a Label Studio export (twice at once, and a
double click), segment and classify, export + the latency table, resume with nothing to resume."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests import test_detection_tab
from tests.test_vision_import import label_studio_coco, roboflow_coco

client = test_detection_tab.client  # the same fixture: the Vision tab on a real Gradio server
BUS = Path(__import__("importlib").util.find_spec("ultralytics").origin).parent / "assets" / "bus.jpg"


def test_import_then_validate_through_the_ui(client, ctx, tmp_path):
    from gradio_client.exceptions import AppError

    c, _ = client
    ingest = ctx.settings.data_dir / "ingest"
    label_studio_coco(ingest / "ls-export")
    roboflow_coco(ingest / "rf-export")
    md, folder, upload = c.predict(None, str(ingest / "ls-export"), "auto", "pets", 0.2, "dog = puppy", True,
                                   api_name="/vision_import")  # fmt: skip
    assert "as COCO JSON: done" in md and "| dog | puppy | 4 |" in md  # (the image count is session state)
    assert Path(folder) == ingest / "pets" and (ingest / "pets" / "data.yaml").is_file()
    assert upload is None  # the export's upload is cleared: Validate and Train now read the new dataset
    report = c.predict(None, folder, "yolov8s-person", api_name="/vision_validate")
    assert "— valid" in report and "0=cat, 1=puppy" in report

    results: dict[str, str] = {}  # two sessions import different exports at once; each gets its own dataset

    def one(name: str, src: str) -> None:
        from gradio_client import Client

        results[name] = Client(c.src, verbose=False).predict(None, src, "auto", name, 0.2, "", True,
                                                             api_name="/vision_import")[0]  # fmt: skip

    threads = [threading.Thread(target=one, args=(n, str(ingest / s))) for n, s in (("a", "ls-export"),
                                                                                   ("b", "rf-export"))]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert "done" in results["a"] and "done" in results["b"] and "apple" in results["b"]
    with pytest.raises(AppError, match="already exists; choose another name"):  # the double click's second import
        c.predict(None, str(ingest / "ls-export"), "auto", "pets", 0.2, "", True, api_name="/vision_import")
    with pytest.raises(AppError, match="class mapping line 1"):
        c.predict(None, str(ingest / "ls-export"), "auto", "x", 0.2, "no separator", True, api_name="/vision_import")
    with pytest.raises(AppError, match="Name the new dataset"):
        c.predict(None, str(ingest / "ls-export"), "auto", " ", 0.2, "", True, api_name="/vision_import")
    with pytest.raises(AppError, match=r"outside the folders|not allowed"):
        c.predict(None, str(tmp_path), "auto", "y", 0.2, "", True, api_name="/vision_import")
    with pytest.raises(AppError, match="Pick a stopped run"):
        c.predict(None, api_name="/vision_resume")


@pytest.mark.slow  # ~20 s here: three model builds and an ONNX export (the backend paths have fast tests)
def test_segment_classify_and_export_through_the_ui(client, monkeypatch):
    from gradio_client.exceptions import AppError

    import backends.vision.export as export

    c, handle_file = client
    _, text, table, _ = c.predict("yolov8n-seg-untrained", handle_file(str(BUS)), 0.0, 320, 5,
                                    api_name="/vision_segment")  # fmt: skip
    assert "masks" in text and "Untrained demo model" in text and len(table["data"]) > 0
    _, text, table, js = c.predict("yolov8n-cls-untrained", handle_file(str(BUS)), 0.25, 224, 3,
                                     api_name="/vision_classify")  # fmt: skip
    assert text.startswith("**Top classes:**") and len(table["data"]) == 3 and Path(js).is_file()
    with pytest.raises(AppError, match="not in the list of choices"):  # (the backend checks too)
        c.predict("yolov8s-person", handle_file(str(BUS)), 0.25, 224, 3, api_name="/vision_classify")

    monkeypatch.setattr(export, "openvino_available", lambda: False)  # keeps this test short; OpenVINO: slow tests
    path, table, notes = c.predict("yolov8s-person", "onnx", 320, 5, ["1"], True, api_name="/vision_export")
    assert path.endswith(".onnx") and [r[0] for r in table["data"]] == ["PyTorch", "ONNX Runtime"]
    assert table["data"][1][-1] == "yes" and "TensorRT" in notes
    with pytest.raises(AppError, match="Tick at least one batch size"):
        c.predict("yolov8s-person", "onnx", 320, 5, [], True, api_name="/vision_export")
    with pytest.raises(AppError, match="train it first"):
        c.predict("yolov8n-untrained", "onnx", 320, 5, ["1"], True, api_name="/vision_export")


@pytest.mark.slow
def test_import_train_with_early_stopping_export_and_compare(client, ctx, monkeypatch):
    """The issue's 'done when': a Label Studio export imported in the browser, trained with early stopping, the
    trained model exported and its latency compared (OpenVINO left out to keep it short)."""
    import backends.vision.export as export

    c, _ = client
    ingest = ctx.settings.data_dir / "ingest"
    label_studio_coco(ingest / "ls-export")
    _, folder, _ = c.predict(None, str(ingest / "ls-export"), "auto", "pets", 0.3, "", True, api_name="/vision_import")
    status = c.predict(None, folder, "yolov8n-untrained", 3, 64, 4, 1, 0, "light", True, 0, api_name="/vision_train")
    assert status.startswith(("Queued **YOLO detect training", "Started **YOLO detect training")), status
    (job,) = ctx.jobs.list()
    assert job.wait(timeout=600) and job.status == "done", (job.error, job.logs[-5:])
    run = ctx.runs.get(job.result.run_id)
    assert run.config["patience"] == 1 and run.config["augment"] == "light" and run.config["dataset"] == folder
    assert 1 <= job.result.epochs_done <= 3  # patience 1: may stop before epoch 3
    monkeypatch.setattr(export, "openvino_available", lambda: False)
    rows, _ = ctx.backends.detection.latency(f"run-{run.id}", imgsz=64, runs=2, batches=(1,))
    assert [r.engine for r in rows] == ["PyTorch", "ONNX Runtime"] and rows[1].match
