"""Tiny LM lab: the model really learns, checkpoints survive a stop, bad input is refused clearly."""

from __future__ import annotations

import math

import pytest

from backends.tinylm import CharTokenizer, DataSpec, TinyGPT, TinyLMConfig, TrainOptions, load_corpus

SMALL = {"n_layer": 2, "n_head": 2, "n_embd": 48, "block_size": 32}


def test_config_is_validated():
    with pytest.raises(ValueError, match="divisible by n_head"):
        TinyLMConfig(vocab_size=10, n_embd=10, n_head=3)
    with pytest.raises(ValueError, match="learning rate"):
        TrainOptions(lr=5)
    with pytest.raises(ValueError, match="Unknown position encoding 'sinus'"):
        TinyLMConfig(vocab_size=10, pos="sinus")
    with pytest.raises(ValueError, match="even head size"):
        TinyLMConfig(vocab_size=10, n_embd=18, n_head=6, pos="rope")
    with pytest.raises(ValueError, match="Unknown tokenizer"):
        DataSpec(tokenizer="words")
    with pytest.raises(ValueError, match="Unknown corpus"):
        DataSpec(corpus="../etc")


def test_parameter_count_formula_matches_the_model():
    for pos in ("learned", "rope"):
        for bias in (True, False):
            cfg = TinyLMConfig(vocab_size=65, n_layer=2, n_head=4, n_embd=64, block_size=32, pos=pos, bias=bias)
            assert cfg.n_params() == sum(p.numel() for p in TinyGPT(cfg).parameters())


def test_unknown_work_and_characters_are_refused():
    with pytest.raises(ValueError, match="Unknown or no works"):
        load_corpus(["hamlet_2"])
    with pytest.raises(ValueError, match="not in the training vocabulary"):
        CharTokenizer.from_text("abc").encode("abz")


def test_training_learns_and_sampling_uses_the_checkpoint(ctx):
    backend = ctx.backends.tinylm
    opts = TrainOptions(works=("macbeth",), steps=150, batch_size=12, lr=5e-3, eval_every=50, eval_batches=4)
    job = backend.start_training(SMALL, opts)
    assert job.wait(timeout=240), "training did not finish"
    assert job.status == "done", (job.error, job.logs[-5:])
    result = job.result
    vocab = len(CharTokenizer.from_text(load_corpus(["macbeth"])).chars)
    # chance level is ln(vocab) ~ 4.2; a model that learned letter statistics is far below it
    assert result.best_val_loss < math.log(vocab) - 0.9, result.history
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]
    assert backend.trained_models()[0] == result.run_id
    text = backend.sample(result.run_id, "MACBETH.\n", max_new_tokens=40, seed=1)
    assert text.startswith("MACBETH.\n") and len(text) == len("MACBETH.\n") + 40
    ctx.residency.unregister(f"tinylm:{result.run_id}")  # the next sample loads from the safetensors checkpoint
    assert backend.sample(result.run_id, "MACBETH.\n", max_new_tokens=40, seed=1) == text
    metrics = ctx.runs.get(result.run_id).metrics()
    assert metrics[-1]["val_loss"] == pytest.approx(result.history[-1]["val_loss"])
    # what the live plots draw: train loss, perplexity = exp(val loss), tokens/s and the learning rate
    assert metrics[-1]["val_ppl"] == pytest.approx(math.exp(metrics[-1]["val_loss"]))
    assert all(m["tokens_per_s"] > 0 and 0 < m["lr"] <= 5e-3 for m in metrics)
    assert len([m for m in metrics if "train_loss" in m]) > len(result.history)  # train loss between evaluations


def test_cancel_keeps_a_checkpoint(ctx):
    backend = ctx.backends.tinylm
    opts = TrainOptions(works=("sonnets",), steps=100_000, batch_size=4, eval_every=5, eval_batches=1)
    job = backend.start_training(SMALL, opts)
    for _ in range(600):
        if job.logs and "step" in job.logs[-1]:
            break
        job.wait(timeout=0.1)
    ctx.jobs.cancel(job.id)
    assert job.wait(timeout=60)
    assert job.status == "cancelled" or job.result.stopped == "cancelled"
    run_id = backend.trained_models()[0]
    assert backend.sample(run_id, "O", max_new_tokens=5, seed=0).startswith("O")
