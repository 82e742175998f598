"""Slow fine-tune tests on CPU: the real SmolLM2-135M-Instruct learns the Shakespeare task (dev loss falls, answers
change), and the same run launched through `accelerate launch` with two CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest

from backends.finetune import DataOptions, FinetuneConfig, LoraOptions, TrainOptions
from backends.finetune.task import write_task
from tests import _llm_support
from tests._studio_server import REPO

llm_ctx, llm, smol_folder = _llm_support.llm_ctx, _llm_support.llm, _llm_support.smol_folder  # session fixtures
pytestmark = pytest.mark.slow


def test_smollm2_learns_the_shakespeare_task(llm_ctx):
    data = write_task(llm_ctx.settings.data_dir / "uploads" / "shakespeare-60.jsonl", count=60, seed=3)
    cfg = FinetuneConfig(
        model="smollm2-135m",
        data=DataOptions(str(data), max_length=80, dev_fraction=0.2),
        lora=LoraOptions(rank=8, alpha=16),
        train=TrainOptions(max_steps=12, batch_size=2, grad_accum=1, learning_rate=2e-3, warmup_steps=2, save_every=6),
        output_name="shakespeare-smol", eval_max_new_tokens=8,
    )  # fmt: skip
    job = llm_ctx.backends.finetune.submit(cfg)
    assert job.wait(1500), job.logs[-10:]
    assert job.status == "done", (job.error, job.logs[-20:])
    s = llm_ctx.runs.get(job.result.run_id).record["summary"]
    before, after = s["dev_before"]["loss"], s["dev_after"]["loss"]
    assert after < 0.8 * before, (before, after)  # the dev set (never trained on) got easier
    samples = s["samples"]
    assert sum(x["base"] != x["adapter"] for x in samples) >= len(samples) // 2, samples
    assert s["score_after"]["rouge_l"] >= s["score_before"]["rouge_l"], (s["score_before"], s["score_after"])


def test_accelerate_launch_with_two_cpu_processes(llm_ctx, smol_folder, tmp_path):
    folder = _llm_support.make_tiny_llama(tmp_path / "tiny", smol_folder)
    data = write_task(tmp_path / "task.jsonl", count=32, seed=0)
    cfg = FinetuneConfig(model="tiny", data=DataOptions(str(data), max_length=64, dev_fraction=0.0),
                         lora=LoraOptions(rank=4, alpha=8),
                         train=TrainOptions(max_steps=4, batch_size=2, grad_accum=1, learning_rate=5e-3, save_every=2))  # fmt: skip
    (tmp_path / "run.json").write_text(json.dumps(asdict(cfg)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}  # torchrun + gloo on the CPU
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "backends.finetune.launch",
           "--config", str(tmp_path / "run.json"), "--model-folder", str(folder), "--out", str(tmp_path / "out")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "out" / "history.json").read_text())
    assert out["world_size"] == 2 and out["status"] == "done"
    assert [r["step"] for r in out["history"]] == [1, 2, 3, 4]
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "checkpoint" / "meta.json").is_file()
