"""The Vision model lists follow what exists now: a page reload or a finished training lists the new model, and the
model a user picked stays picked (fakes for the backend and the job; no server)."""

from __future__ import annotations

from types import SimpleNamespace

from tabs import vision_train
from tabs.vision import model_list_update


class FakeDet:
    def __init__(self) -> None:
        self.entries = [SimpleNamespace(title="YOLOv8s people", id="yolov8s-person", task="detect"),
                        SimpleNamespace(title="demo seg", id="yolov8n-seg-untrained", task="segment")]  # fmt: skip

    def models(self, task: str | None = "detect") -> list:
        return [m for m in self.entries if task is None or m.task == task]


def test_the_list_takes_new_models_and_keeps_the_pick():
    det = FakeDet()
    det.entries.append(SimpleNamespace(title="pets (trained)", id="run-pets", task="detect"))
    update = model_list_update(det, "run-pets")
    assert [c[1] for c in update["choices"]] == ["yolov8s-person", "run-pets"] and update["value"] == "run-pets"
    assert model_list_update(det, "deleted-run", default="yolov8s-person")["value"] == "yolov8s-person"
    assert model_list_update(det, None, "segment")["value"] == "yolov8n-seg-untrained"
    empty = model_list_update(FakeDet(), None, "classify")
    assert empty["choices"] == [] and empty["value"] is None


def test_poll_refreshes_the_model_list_once_when_the_run_ends(monkeypatch):
    det = FakeDet()
    job = SimpleNamespace(id="j1", is_finished=False, status="running", progress=0.5, message="", error=None,
                          logs=["epoch 1"], elapsed=lambda: 3.0)  # fmt: skip
    ctx = SimpleNamespace(jobs=SimpleNamespace(get=lambda jid: job if jid == "j1" else None))
    monkeypatch.setattr(vision_train, "_plots", lambda ctx, det, jid: ("loss", "map"))

    out = vision_train.poll(ctx, det, "j1", None, "yolov8s-person")
    assert "choices" not in out[4] and out[5] is None  # still running: the list is left alone (gr.skip)
    det.entries.append(SimpleNamespace(title="pets (trained)", id="run-pets", task="detect"))
    job.is_finished, job.status = True, "done"
    out = vision_train.poll(ctx, det, "j1", None, "yolov8s-person")
    assert "run-pets" in [c[1] for c in out[4]["choices"]] and out[4]["value"] == "yolov8s-person" and out[5] == "j1"
    again = vision_train.poll(ctx, det, "j1", "j1", "yolov8s-person")
    assert "choices" not in again[4]  # refreshed once, not every 2 s (a user's pick is not fought over)
    assert vision_train.poll(ctx, det, None, "j1", "x")[5] == "j1"
