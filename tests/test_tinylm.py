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


def _text(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_an_uploaded_text_trains_samples_and_scores_from_the_kept_copy(ctx, tmp_path):
    """A user's own file (nanoGPT's input.txt in real use): kept under its hash, trained on, sampled from with its
    own characters, and re-read for the extrapolation curve after the upload is gone."""
    backend = ctx.backends.tinylm
    verse = "".join(f"ZEPHYR {i}:\r\nqx-wind over the kjell, {i * 7 % 13} times.\r\n\r\n" for i in range(600))
    upload = _text(tmp_path, "mine.txt", verse.encode("utf-16"))  # UTF-16 with a BOM, CRLF line ends
    text_id, summary = backend.add_text(upload)
    assert summary.startswith("mine.txt: ") and "\r" not in (backend.corpora_dir / f"{text_id}.txt").read_text()
    assert backend.add_text(_text(tmp_path, "same.txt", verse.encode("utf-8")))[0] == text_id  # one copy per text
    upload.unlink()
    spec = DataSpec(corpus="text", text_id=text_id)
    opts = TrainOptions(steps=60, batch_size=8, lr=5e-3, eval_every=30, eval_batches=2, data=spec)
    job = backend.start_training(SMALL, opts)
    assert job.wait(timeout=240) and job.status == "done", (job.error, job.logs[-5:])
    assert "text " + text_id[:8] in job.name
    run_id = job.result.run_id
    assert job.result.best_val_loss < math.log(len(set(verse.replace("\r", "")))) - 0.5, job.result.history
    assert backend.sample(run_id, "ZEPHYR", max_new_tokens=20, seed=1).startswith("ZEPHYR")
    with pytest.raises(ValueError, match="not in the training vocabulary"):
        backend.sample(run_id, "MACBETH", max_new_tokens=5)  # M, A, C... are not in this text
    assert [p.factor for p in backend.extrapolation(run_id, max_tokens=2048)] == [1, 2, 4]


def test_bad_text_files_are_refused_with_what_to_do(ctx, tmp_path):
    backend = ctx.backends.tinylm
    kept = set(backend.corpora_dir.glob("*")) if backend.corpora_dir.exists() else set()
    with pytest.raises(ValueError, match=r"a\.bin:1: holds null bytes"):
        backend.add_text(_text(tmp_path, "a.bin", b"ab\x00cd" * 5000))
    with pytest.raises(ValueError, match="looks binary"):  # NULs that decode (UTF-16 with a BOM)
        backend.add_text(_text(tmp_path, "b.txt", ("ab\x00cd" * 5000).encode("utf-16")))
    with pytest.raises(ValueError, match="needs at least 10,000"):
        backend.add_text(_text(tmp_path, "short.txt", b"to be or not to be\n" * 10))
    with pytest.raises(ValueError, match=r"latin\.txt"):
        backend.add_text(_text(tmp_path, "latin.txt", "caf\xe9 ".encode("latin-1") * 5000))  # not UTF-8
    with pytest.raises(ValueError, match="Upload a text file first"):
        DataSpec(corpus="text")
    with pytest.raises(ValueError, match="Upload a text file first"):
        DataSpec(corpus="text", text_id="../../etc/passwd")  # an id, never a path
    with pytest.raises(FileNotFoundError, match="upload it again"):
        backend.start_training(SMALL, TrainOptions(data=DataSpec(corpus="text", text_id="0123456789abcdef")))
    assert (set(backend.corpora_dir.glob("*")) if backend.corpora_dir.exists() else set()) == kept  # nothing kept
