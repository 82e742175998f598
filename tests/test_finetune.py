"""Fine-tune backend on CPU with a tiny random Llama (SmolLM2's tokenizer and chat template): masks, a whole run to
an adapter the Chat backend attaches, cancel, export with an Ollama Modelfile, bad input refused before any work."""

from __future__ import annotations

import json
import time

import pytest

from backends.finetune import DataError, DataOptions, FinetuneConfig, LoraOptions, TrainOptions
from backends.finetune.task import write_task
from tests import _llm_support

llm_ctx, llm, smol_folder = _llm_support.llm_ctx, _llm_support.llm, _llm_support.smol_folder  # session fixtures


@pytest.fixture(scope="module")
def tiny(llm_ctx, smol_folder):
    _llm_support.make_tiny_llama(llm_ctx.settings.models_dir / "tiny-ft", smol_folder)
    return write_task(llm_ctx.settings.data_dir / "uploads" / "shakespeare.jsonl", count=24, seed=0)


def config(data, **train) -> FinetuneConfig:
    opts = dict(max_steps=4, batch_size=2, grad_accum=1, learning_rate=5e-3, warmup_steps=1, save_every=2)
    opts.update(train)
    return FinetuneConfig(model="tiny-ft", data=DataOptions(str(data), max_length=96, dev_fraction=0.2),
                          lora=LoraOptions(rank=4, alpha=8), train=TrainOptions(**opts), output_name="tiny-adapter",
                          eval_max_new_tokens=6)  # fmt: skip


def test_assistant_turns_only_carry_labels(smol_folder):
    from backends.finetune.format import IGNORE, tokenize
    from backends.llm import load_tokenizer

    tok = load_tokenizer(smol_folder)
    conv = [{"role": "user", "content": "Name a play."}, {"role": "assistant", "content": "Hamlet"},
            {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Macbeth"}]  # fmt: skip
    ex = tokenize(tok, conv)
    assert len(ex.input_ids) == len(ex.labels)
    trained = tok.decode([t for t in ex.labels if t != IGNORE])
    assert trained == "Hamlet<|im_end|>\nMacbeth<|im_end|>\n"
    everything = tokenize(tok, conv, loss_on="all")
    assert list(everything.labels) == list(everything.input_ids)


def test_a_run_writes_an_adapter_the_chat_tab_attaches(llm_ctx, tiny, monkeypatch):
    leases = []
    real_training = llm_ctx.residency.training

    def training(key, **kw):
        leases.append(real_training(key, **kw))
        return leases[-1]

    monkeypatch.setattr(llm_ctx.residency, "training", training)
    ft = llm_ctx.backends.finetune
    job = ft.submit(config(tiny))
    assert job.wait(300), job
    assert len(leases) == 1 and leases[0].steps == 4 and leases[0].label == "Fine-tune"  # every step on the lease
    result = job.result
    assert job.status == "done", (job.error, job.logs[-20:])
    assert result.status == "done" and result.steps_done == 4
    adapter = result.adapter
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert adapter in llm_ctx.backends.llm.available_adapters() and adapter in ft.adapters()
    run = llm_ctx.runs.get(result.run_id)
    assert run.status == "done" and run.record["dataset_hash"] and run.record["seed"] == 0
    assert [m["step"] for m in run.metrics()] == [1, 2, 3, 4]
    assert all(m["loss"] > 0 and m["lr"] >= 0 for m in run.metrics())
    assert list((run.dir / "tensorboard").glob("events.out.tfevents.*"))
    summary = run.record["summary"]
    assert summary["dev_before"]["loss"] > 0 and summary["dev_after"]["loss"] > 0
    assert len(run.record["summary"]["samples"]) >= 1 and "score_after" in summary
    live = ft.live(job.id)
    assert len(live["history"]) == 4 and live["estimate"].total > 0 and "fp32" in live["precision"]
    chat = llm_ctx.backends.llm
    chat.configure(model_id="tiny-ft")
    assert chat.attach_adapter(adapter) == "tiny-adapter"
    assert chat.complete([{"role": "user", "content": "Hi"}], max_new_tokens=3) is not None
    chat.detach_adapter()


def test_cancel_keeps_the_last_checkpoint(llm_ctx, tiny):
    ft = llm_ctx.backends.finetune
    job = ft.submit(config(tiny, max_steps=500, save_every=1))
    from backends.finetune import FinetuneError

    with pytest.raises(FinetuneError, match="already"):  # a double click queues nothing more
        ft.submit(config(tiny, max_steps=500, save_every=1))
    deadline = time.monotonic() + 240
    while len(ft.live(job.id).get("history", [])) < 2 and time.monotonic() < deadline and not job.is_finished:
        time.sleep(0.2)
    llm_ctx.jobs.cancel(job.id)
    assert job.wait(240)
    assert job.status == "cancelled" and job.result.status == "cancelled", job.logs[-10:]
    run = llm_ctx.runs.get(job.result.run_id)
    meta = json.loads((run.dir / "checkpoint" / "meta.json").read_text())
    assert meta["step"] == job.result.steps_done >= 2
    assert (job.result.adapter / "adapter_model.safetensors").is_file() and run.status == "cancelled"


def test_export_merges_in_16_bit_with_a_matching_modelfile(llm_ctx, tiny):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ft = llm_ctx.backends.finetune
    run_id = next(r.id for r in llm_ctx.runs.list() if r.kind == "finetune" and r.status == "done")
    merged = ft.export(run_id, dtype="bf16")
    modelfile = (merged / "Modelfile").read_text()
    assert modelfile.startswith("FROM .") and "<|im_start|>assistant" in modelfile and 'stop "<|im_end|>"' in modelfile
    assert "SYSTEM" in modelfile  # SmolLM2's default system prompt, as the template inserts it
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model.dtype == torch.bfloat16
    run = llm_ctx.runs.get(run_id)
    base = AutoModelForCausalLM.from_pretrained(ft.base_folder("tiny-ft"), dtype=torch.bfloat16)
    peft = PeftModel.from_pretrained(base, str(run.dir / "tiny-adapter"))
    ids = torch.tensor([[1, 5, 9, 200, 31]])
    with torch.no_grad():
        merged_logits, peft_logits = model(ids).logits.float(), peft(ids).logits.float()
        with peft.disable_adapter():
            base_logits = peft(ids).logits.float()
    gap = (merged_logits - peft_logits).abs()
    assert gap.mean() < 0.05 and gap.max() < 0.5  # bf16 rounding of the merged weights only
    assert (peft_logits - base_logits).abs().mean() > 0  # the adapter changed the model


def test_modelfile_template_reproduces_the_chat_template(smol_folder):
    from backends.finetune.export import CHATML, check_template, default_system, prompt_part
    from backends.llm import load_tokenizer

    tok = load_tokenizer(smol_folder)
    assert check_template(tok) == "chatml"
    system = default_system(tok)
    assert "SmolLM" in system
    msgs = [{"role": "user", "content": "Who wrote Hamlet?"}]
    assert prompt_part(CHATML, system, "Who wrote Hamlet?") == tok.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True
    )


def test_bad_data_is_refused_before_any_job(llm_ctx, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "completion": "y"}\n{"prompt": "x"\n')
    before = len(llm_ctx.jobs.list())
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        llm_ctx.backends.finetune.submit(config(bad))
    assert len(llm_ctx.jobs.list()) == before


def test_fit_estimate_for_llama_8b(tmp_path):
    from backends.finetune.estimate import describe, estimate_fit

    (tmp_path / "config.json").write_text(json.dumps({
        "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False}))  # fmt: skip
    e2k = estimate_fit(tmp_path, LoraOptions(), TrainOptions(), 2048, cuda=True, available=int(12.0 * 2**30))
    assert 7.0e9 < e2k.total < 8.2e9 and e2k.fits  # measured on the H200: 7.44 GB
    e32k = estimate_fit(tmp_path, LoraOptions(), TrainOptions(), 32768, cuda=True, available=int(12.0 * 2**30))
    assert 11.0e9 < e32k.total < 12.5e9  # measured: 11.66 GB
    full = estimate_fit(tmp_path, LoraOptions(), TrainOptions(chunked_loss=False), 4096, cuda=True,
                        available=10 * 2**30)  # fmt: skip
    assert full.logits > 4e9 and not full.fits
    assert "does not fit" in describe(full)
