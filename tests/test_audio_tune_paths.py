"""The fine-tuning paths the quick CPU runs skip by default, on the CPU: LoRA (peft) with bf16 autocast and 8-bit
AdamW (bitsandbytes), full tuning with fp16 autocast and a gradient scaler, the LoRA merge before export.

The model is an untrained demo Whisper (tiny.en's tokenizer and feature extractor cut to a 3-s context, 2 layers
of width 64, random weights built from a config): these tests check the code paths (what trains, in which dtype, with which optimizer),
not quality; quality is tests/test_whisper_tune.py's domain-word test on the real tiny.en.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from backends.audio.pcm import write_wav
from backends.audio.tune import TuneConfig, collate, prefix_ids, prepare
from backends.audio.tune_data import Example
from backends.audio.tune_loop import _autocast, _optimizer, _train_step
from tests._whisper_support import tiny_en_hf  # noqa: F401 (session fixture)


@pytest.fixture(scope="module")
def demo_ctx(tmp_path_factory, tiny_en_hf):  # noqa: F811
    """A context whose 'whisper-tiny.en' transformers copy is the small untrained demo Whisper."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from studio.app import build_context
    from studio.settings import Settings

    root = tmp_path_factory.mktemp("tune-paths")
    ctx = build_context(Settings(data_dir=root / "data", models_dir=root / "models", open_browser=False))
    folder = ctx.settings.cache_dir / "whisper-hf" / "whisper-tiny.en"
    shutil.copytree(tiny_en_hf, folder)
    cfg = WhisperConfig.from_pretrained(folder)
    for k, v in dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
                     max_source_positions=150).items():  # fmt: skip
        setattr(cfg, k, v)
    for name in ("preprocessor_config.json", "processor_config.json"):  # a 3-s context: bf16 is slow on this CPU
        data = json.loads((folder / name).read_text())
        for d in (data, data.get("feature_extractor") or {}):
            if "chunk_length" in d:
                d.update(chunk_length=3, n_samples=48000, nb_max_frames=300)
        (folder / name).write_text(json.dumps(data))
    torch.manual_seed(0)
    WhisperForConditionalGeneration(cfg).save_pretrained(folder)
    clips = root / "clips"
    clips.mkdir()
    rng = np.random.default_rng(0)
    examples = []
    for i in range(2):
        path = write_wav(clips / f"c{i}.wav", (0.1 * rng.standard_normal(16000 * 2)).astype(np.float32))
        examples.append(Example(path, f"Zorvex number {i}", f"c{i}.txt"))
    yield ctx, examples
    ctx.jobs.shutdown(timeout=10)


def _setup(ctx, examples, **kw):
    cfg = TuneConfig("unused", base_model="whisper-tiny.en", **kw)
    model, processor, lora = ctx.backends.whisper_tuner._model(cfg, "cpu")
    items = prepare(examples[:1], processor, prefix_ids(model, processor, "en"))  # batch of one: bf16 is slow here
    return cfg, model, lora, collate(items, "cpu")


def _linear_dtypes(model) -> list:
    """Output dtypes of the decoder's first fc1 during a forward (what autocast really ran in)."""
    seen = []
    layer = next(m for n, m in model.named_modules() if n.endswith("decoder.layers.0.fc1"))
    handle = layer.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    return seen, handle


def test_lora_with_bf16_autocast_and_8bit_adamw(demo_ctx):
    import bitsandbytes as bnb
    import torch

    ctx, examples = demo_ctx
    cfg, model, lora, batch = _setup(ctx, examples, method="lora", lora_rank=64, precision="bf16",
                                     optimizer="adamw8bit", learning_rate=5e-3)  # fmt: skip
    assert lora and model.peft_config["default"].r == 64
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)  # only the adapters train
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad and "fc1" in n}
    optimizer = _optimizer(cfg, model, "cpu")
    dtype, scaler = _autocast(cfg, "cpu")
    assert isinstance(optimizer, bnb.optim.AdamW8bit) and dtype is torch.bfloat16 and scaler is None
    seen, handle = _linear_dtypes(model)
    model.train()
    losses = [_train_step(model, optimizer, scaler, batch, dtype, "cpu") for _ in range(3)]
    handle.remove()
    assert set(seen) == {torch.bfloat16}  # the linears ran in bf16 under autocast
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    states = list(optimizer.state.values())  # bitsandbytes keeps tensors under 4096 elements in 32 bits
    assert any(st["state1"].dtype == torch.uint8 and "qmap1" in st for st in states)  # 8-bit moments
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)  # base untouched
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # adapters moved
    # the export merges the adapters into the weights: the merged model computes the same logits
    model.eval()
    feats, labels = batch
    with torch.no_grad():
        before = model(input_features=feats, labels=labels).logits
        merged = model.merge_and_unload()
        after = merged(input_features=feats, labels=labels).logits
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert torch.allclose(before, after, atol=1e-4)


def test_full_tuning_with_fp16_autocast_and_a_gradient_scaler(demo_ctx):
    import torch

    ctx, examples = demo_ctx
    cfg, model, lora, batch = _setup(ctx, examples, method="full", precision="fp16", optimizer="adamw",
                                     learning_rate=1e-3)  # fmt: skip
    assert not lora and all(p.requires_grad for p in model.parameters())
    optimizer = _optimizer(cfg, model, "cpu")
    dtype, scaler = _autocast(cfg, "cpu")
    assert dtype is torch.float16 and scaler is not None and isinstance(optimizer, torch.optim.AdamW)
    seen, handle = _linear_dtypes(model)
    w0 = model.model.decoder.layers[0].fc1.weight.detach().clone()
    model.train()
    losses = [_train_step(model, optimizer, scaler, batch, dtype, "cpu") for _ in range(2)]
    handle.remove()
    assert set(seen) == {torch.float16} and all(np.isfinite(losses)), (seen, losses)
    assert model.model.decoder.layers[0].fc1.weight.dtype is torch.float32  # master weights stay fp32
    assert not torch.equal(w0, model.model.decoder.layers[0].fc1.weight)  # the scaler let the steps through
    assert scaler.get_scale() > 0
    assert _autocast(TuneConfig("x"), "cpu") == (None, None)  # "auto" on the CPU is plain fp32
