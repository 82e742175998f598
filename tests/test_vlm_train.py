"""VLM QLoRA on the CPU: dataset checks with file:line errors, a few steps that change the answer, adapter switch."""

from __future__ import annotations

import json

import pytest

from backends.vlm import ImageOptions, VLMDataError, VLMError, VLMTrainConfig
from backends.vlm.data import load_examples, split_dev
from tests import _vlm_support
from tests._vlm_support import colour_dataset, png_header_only, solid

tiny_llava_folder, vlm_ctx, vlm = _vlm_support.tiny_llava_folder, _vlm_support.vlm_ctx, _vlm_support.vlm
llm_ctx, llm, smol_folder = _vlm_support.llm_ctx, _vlm_support.llm, _vlm_support.smol_folder
OPTS = ImageOptions()


class _Job:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def set_progress(self, fraction: float, message: str = "") -> None: ...

    def log(self, msg: str) -> None:
        self.lines.append(msg)

    def should_stop(self) -> bool:
        return False


def test_dataset_problems_are_all_reported_with_file_and_line(tmp_path):
    solid(tmp_path / "ok.png", "red")
    (tmp_path / "bad.png").write_bytes(b"PK\x03\x04 not an image")
    png_header_only(tmp_path / "bomb.png", 20000, 20000)
    conv = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]
    lines = [
        json.dumps({"images": ["ok.png"], "conversations": conv}),  # 1: fine
        "{not json",  # 2
        json.dumps({"images": ["missing.png"], "conversations": conv}),  # 3
        json.dumps({"images": ["bad.png"], "conversations": conv}),  # 4
        json.dumps({"images": ["bomb.png"], "conversations": conv}),  # 5
        json.dumps({"images": ["ok.png"]}),  # 6: no conversation
        json.dumps({"images": ["../outside.png"], "conversations": conv}),  # 7
        json.dumps({"images": ["ok.png"], "conversations": [{"role": "user", "content": "only a question"}]}),  # 8
        json.dumps({"images": ["ok.png"], "conversations": conv}),  # 9: duplicate of 1
        json.dumps({"images": ["ok.png"] * 5, "conversations": conv}),  # 10: too many
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(lines))
    with pytest.raises(VLMDataError) as e:
        load_examples(tmp_path / "d.jsonl", OPTS, max_images=4)
    text = str(e.value)
    for n, what in [(2, "not valid JSON"), (3, "'missing.png' not found"), (4, "not a readable image"),
                    (5, "too large to open safely"), (6, "conversations"), (7, "outside"),
                    (8, "assistant turn"), (9, "duplicate of d.jsonl:1"), (10, "at most 4")]:  # fmt: skip
        assert f"d.jsonl:{n}: " in text and what in text, (n, what, text)
    assert "d.jsonl:1:" not in text


def test_llava_style_lines_are_accepted_and_split_is_seeded(tmp_path):
    solid(tmp_path / "a.png", "red")
    rows = [{"image": "a.png", "conversations": [{"from": "human", "value": f"<image>\nQ{i}"},
             {"from": "gpt", "value": f"A{i}"}]} for i in range(10)]  # fmt: skip
    (tmp_path / "l.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ex = load_examples(tmp_path / "l.jsonl", OPTS)
    assert ex[0].messages[0] == {"role": "user", "content": "Q0"} and len(ex[0].images) == 1
    train, dev = split_dev(ex, 0.2, seed=3)
    assert len(dev) == 2 and len(train) == 8 and split_dev(ex, 0.2, seed=3)[1] == dev


def test_config_is_validated():
    with pytest.raises(VLMError, match="output name"):
        VLMTrainConfig(dataset="x.jsonl", output_name="../evil")
    with pytest.raises(VLMError, match="steps"):
        VLMTrainConfig(dataset="x.jsonl", steps=0)


def test_qlora_steps_change_the_answer_and_the_adapter_is_selectable(vlm, tmp_path):
    data = colour_dataset(tmp_path / "ds")
    ask = [{"role": "user", "content": "Which colour is this?", "images": [str(tmp_path / "ds" / "0.png")]}]
    base = vlm.complete(ask, max_new_tokens=4)
    cfg = VLMTrainConfig(dataset=data, output_name="colours", steps=8, learning_rate=1e-2, projector_lr=1e-3,
                         dev_fraction=0.34, answer_tokens=4)  # fmt: skip
    result = vlm.train(cfg, _Job())
    assert result.status == "done" and result.steps_done == 8 and result.adapter is not None
    assert result.dev_loss_after < result.dev_loss_before
    assert len(result.answers) == 2 and all(a["before"] != a["after"] for a in result.answers)
    assert vlm.complete(ask, max_new_tokens=4) == base  # training left the shared model as it was
    assert (result.adapter / "projector.safetensors").is_file() and "colours" in vlm.available_adapters()
    vlm.switch_adapter("colours")
    tuned = vlm.complete(ask, max_new_tokens=4)
    assert tuned != base
    vlm.switch_adapter(None)
    assert vlm.complete(ask, max_new_tokens=4) == base
    run = vlm.ctx.runs.get(result.run_id)
    assert run.status == "done" and len(run.metrics()) == 8


@pytest.mark.slow
def test_benchmark_quick_mode_writes_targets(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "studio.bench.vlm", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "vlm-cpu.json").read_text())
    names = [t["name"] for t in result["targets"]]
    assert len(names) == 5 and result["swaps"]["identical_after_swaps"] is True
    assert result["inference"]["greedy_tokens_equal_prefix"] == 16


def test_every_step_runs_inside_the_training_lease_of_the_shared_model(vlm, tmp_path, monkeypatch):
    """Every optimisation step runs inside `lease.step()`; the lease names the chat's registered model (so the
    manager parks its weights with the training state) and gets that very model and the optimizer."""
    import contextlib

    calls: dict = {"steps": 0}

    class Lease:
        paused_s, pauses = 0.0, 0

        @contextlib.contextmanager
        def step(self):
            calls["steps"] += 1
            yield

        def report(self, **kw):
            calls["last"] = kw

    @contextlib.contextmanager
    def training(key, *, modules, optimizers, label="", working_bytes=None):
        calls.update(key=key, modules=modules, optimizers=optimizers, label=label)
        yield Lease()

    monkeypatch.setattr(vlm.ctx.residency, "training", training, raising=False)
    data = colour_dataset(tmp_path / "ds", n_per=1)
    cfg = VLMTrainConfig(dataset=data, output_name="leased", steps=3, dev_fraction=0.34, answer_tokens=2)
    result = vlm.train(cfg, _Job())
    assert result.steps_done == 3 and calls["steps"] == 3 and calls["last"]["step"] == 3
    assert calls["label"] == "VLM QLoRA" and len(calls["optimizers"]) == 1
    with vlm.ctx.residency.use(calls["key"]) as shared:
        assert calls["modules"][0] is shared
