"""Fine-tune core on CPU: chunked loss == full loss, offloaded checkpointing == plain gradients, tiled MLP, and the
generic step loop (resume == uninterrupted, NaN stop, disk-full save)."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from backends.finetune.loss import chunked_cross_entropy, lm_loss
from backends.finetune.memory import checkpoint_layers, tile_mlp
from backends.finetune.trainer import LoopConfig, LoopHooks, ShuffledBatches, StepLoop


def tiny_lora_model(seed: int = 0, dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, max_position_embeddings=256, tie_word_embeddings=False)  # fmt: skip
    base = LlamaForCausalLM(cfg)
    base.requires_grad_(False)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj", "down_proj"],
                      init_lora_weights=False)  # fmt: skip
    return get_peft_model(base, lora)


def batch(seed: int, b: int = 2, t: int = 24) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (b, t), generator=g)
    labels = ids.clone()
    labels[:, : t // 3] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_chunked_cross_entropy_equals_full_logits():
    torch.manual_seed(0)
    hidden = torch.randn(2, 30, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False)
    labels = torch.randint(0, 50, (2, 30))
    labels[0, :10] = -100
    loss, n = chunked_cross_entropy(hidden, head, labels, chunk=7)
    full = torch.nn.functional.cross_entropy(head(hidden)[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1))
    assert n == int((labels[:, 1:] != -100).sum())
    assert torch.allclose(loss, full, atol=1e-6)
    g1 = torch.autograd.grad(loss, hidden)[0]
    g2 = torch.autograd.grad(full, hidden)[0]
    assert torch.allclose(g1, g2, atol=1e-6)


@pytest.mark.parametrize(("offload", "tile"), [(True, 0), (False, 0), (True, 8)])
def test_checkpointed_layers_give_the_same_gradients(offload, tile):
    """Recomputation replays the dropout masks (dropout 0.1); the tiled MLP (which draws its masks per tile, so
    runs without dropout) gives the same numbers."""
    b = batch(1)
    dropout = 0.0 if tile else 0.1
    ref = tiny_lora_model(dropout=dropout)
    ref.train()
    torch.manual_seed(5)
    loss_ref, _ = lm_loss(ref, b, chunked=False)
    loss_ref.backward()
    model = tiny_lora_model(dropout=dropout)
    model.train()
    checkpoint_layers(model, offload=offload)
    if tile:
        assert tile_mlp(model, tile=tile) == 2  # 24 tokens -> 3 tiles, each checkpointed
    torch.manual_seed(5)
    loss, _ = lm_loss(model, b, chunked=True, chunk=5)
    loss.backward()
    assert torch.allclose(loss, loss_ref, atol=1e-5)
    g_ref, g = grads(ref), grads(model)
    assert g.keys() == g_ref.keys() and len(g) == 12
    for name in g:
        assert torch.allclose(g[name], g_ref[name], atol=1e-5), name


def _loop(tmp: Path, steps: int, *, data_seed: int = 0, hooks: LoopHooks | None = None, lr: float = 1e-2):
    from transformers import get_scheduler

    model = tiny_lora_model(dropout=0.1)
    items = [batch(data_seed * 1000 + i, b=1) for i in range(6)]

    def collate(xs):
        return {k: torch.cat([x[k] for x in xs]) for k in xs[0]}

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    sched = get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=8)
    cfg = LoopConfig(max_steps=steps, grad_accum=2, save_every=2)
    return StepLoop(model, lambda m, b: lm_loss(m, b), opt, sched, ShuffledBatches(items, 2, collate, seed=3), cfg,
                    tmp, hooks)  # fmt: skip


def test_resume_gives_the_same_loss_curve(tmp_path):
    torch.manual_seed(11)
    full = _loop(tmp_path / "a", 8).run()
    assert full.status == "done" and full.steps_done == 8
    torch.manual_seed(11)
    first = _loop(tmp_path / "b", 8, hooks=LoopHooks(should_stop=lambda: calls.append(1) or len(calls) > 5))
    calls: list[int] = []
    part = first.run()
    assert part.status == "cancelled" and part.steps_done == 5 and part.last_checkpoint_step == 5
    torch.manual_seed(999)  # a fresh process: the RNG comes from the checkpoint, not from here
    second = _loop(tmp_path / "b", 8)
    assert second.resume(tmp_path / "b" / "checkpoint") == 5
    rest = second.run()
    curve = [r.loss for r in part.history] + [r.loss for r in rest.history]
    assert curve == [r.loss for r in full.history]
    assert full.history[-1].loss < full.history[0].loss


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    loop = _loop(tmp_path, 8)
    real = loop.loss_fn
    loop.loss_fn = lambda m, b: (real(m, b)[0] * float("nan"), 1) if loop.step >= 3 else real(m, b)
    result = loop.run()
    assert result.status == "stopped" and result.steps_done == 3 and result.last_checkpoint_step == 2
    assert "non-finite" in result.message and "step 2 kept" in result.message
    meta = json.loads((tmp_path / "checkpoint" / "meta.json").read_text())
    assert meta["step"] == 2
    for p in loop.params.values():
        assert torch.isfinite(p).all()


def test_disk_full_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    loop = _loop(tmp_path, 8)
    import backends.finetune.trainer as trainer

    real_save = trainer.save_safetensors

    def save(tensors, path, metadata=None):
        if loop.step >= 4:
            real_save(tensors, path)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(tensors, path)

    monkeypatch.setattr(trainer, "save_safetensors", save)
    result = loop.run()
    assert result.status == "failed" and result.last_checkpoint_step == 2
    assert "No space left" in result.message and "step 2 is intact" in result.message
    assert json.loads((tmp_path / "checkpoint" / "meta.json").read_text())["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no half-written temp folder left
    fresh = _loop(tmp_path, 8)
    assert fresh.resume(tmp_path / "checkpoint") == 2


def test_out_of_memory_in_a_step_keeps_the_checkpoint(tmp_path):
    loop = _loop(tmp_path, 8)
    real = loop.loss_fn

    def loss(m, b):
        if loop.step >= 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(m, b)

    loop.loss_fn = loss
    result = loop.run()
    assert result.status == "failed" and result.last_checkpoint_step == 2 and result.steps_done == 3
    assert "out of GPU memory at step 4" in result.message and "Lower the max length" in result.message
