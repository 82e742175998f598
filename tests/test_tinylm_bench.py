"""studio.bench.tinylm: the report and targets of a GPU result (as the H200 run will produce) and the quick run."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from studio.bench import tinylm as bench
from studio.bench import tinylm_report as report


def _result(device: str, val: float, alibi4: float) -> dict:
    points = lambda p1, p4, learned=False: [  # noqa: E731
        {"factor": 1, "context": 128, "loss": math.log(p1), "perplexity": p1, "tokens": 16384},
        {"factor": 2, "context": 256, "loss": None if learned else 1.0, "perplexity": None if learned else 5.0,
         "tokens": 0 if learned else 16384},
        {"factor": 4, "context": 512, "loss": None if learned else math.log(p4), "perplexity": None if learned else p4,
         "tokens": 0 if learned else 16384},
    ]  # fmt: skip
    extra = [{"pos": "learned", "train_s": 8.0, "steps": 2000, "context": 128, "points": points(5.2, 0, True)},
             {"pos": "rope", "train_s": 8.0, "steps": 2000, "context": 128, "points": points(5.0, 40.0)},
             {"pos": "alibi", "train_s": 8.0, "steps": 2000, "context": 128, "points": points(5.1, alibi4)}]  # fmt: skip
    return {
        "device": device, "vocab": 72, "total_s": 171.0,
        "plain": {"recipe": "plain fp32", "step_s": 0.05, "steps": 20, "tokens_per_s": 330_000.0, "last_loss": 4.0},
        "ours": {"recipe": "bf16", "val_loss": val, "best_val_seen": val - 0.01, "params": 10_745_088,
                 "compile_s": 35.0, "history": [], "steps": 7000, "train_s": 88.3, "tokens_per_s": 1_300_000.0},
        "sampling": {"cached": 900.0, "uncached": 300.0, "speedup": 3.0, "tokens": 256, "sample": "ROMEO:\nAy."},
        "extrapolation": extra,
        "machine": {"host": "h200", "cores": 16, "cpu": "x", "gpu": "NVIDIA H200", "os": "linux", "versions": {}},
        "date": "2026-12-01 14:00 UTC", "command": "python -m studio.bench.tinylm",
    }  # fmt: skip


def test_gpu_targets_and_report():
    args = SimpleNamespace(preset="nanogpt")
    r = _result("cuda", 1.455, 5.0)
    r["targets"] = report.targets(r, args)
    by_name = {t["name"]: t for t in r["targets"]}
    assert by_name["nanogpt preset val loss after <= 90 s of training"]["met"] is True
    assert by_name["whole GPU run, compile included"]["goal"] == "<= 180.0"
    assert by_name["training tokens/s, ours / plain fp32 loop"]["value"] == pytest.approx(1_300_000 / 330_000)
    alibi = next(t for t in r["targets"] if t["name"].startswith("ALiBi degrades least"))
    assert alibi["met"] and alibi["value"] == pytest.approx(5.0 / 5.1)
    text = report.markdown(r)
    assert "| learned | 2000 steps, 8 s, context 128 | 5.200 | n/a | n/a |" in text
    assert "**1.4550**" in text and "| target |" in text
    json.dumps(r)  # what write_results stores
    worse = _result("cuda", 1.52, 60.0)
    worse["targets"] = report.targets(worse, args)
    assert [t["met"] for t in worse["targets"]].count(False) == 2  # the loss and ALiBi's curve


def test_cpu_target_is_against_chance_and_skipped_encodings_are_reported():
    r = _result("cpu", 2.1, 5.0)
    r["extrapolation"][2] = {"pos": "alibi", "skipped": "only 0 s of the run's budget left"}
    r["targets"] = report.targets(r, SimpleNamespace(preset="small"))
    assert r["targets"][0]["goal"] == f"<= {round(math.log(72), 3)}" and r["targets"][0]["met"]
    assert not any(t["name"].startswith("ALiBi") for t in r["targets"])
    assert "| alibi | only 0 s of the run's budget left | - | - | - |" in report.markdown(r)


@pytest.mark.slow
def test_quick_run_writes_results(tmp_path):
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "tinylm_quick-cpu.json").read_text())
    assert {t["name"] for t in data["targets"]} and [r["pos"] for r in data["extrapolation"]] == ["learned", "rope",
                                                                                                  "alibi"]  # fmt: skip
