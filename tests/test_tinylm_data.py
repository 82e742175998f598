"""Tiny LM data and jobs: corpora, BPE through `tokenizers`, training on code with BPE, and the training lease."""

from __future__ import annotations

import threading
import time

import pytest

from backends.tinylm import BPETokenizer, DataSpec, TrainOptions
from backends.tinylm.backend import TinyLMBackend
from backends.tinylm.data import python_source, tiny_shakespeare, tokenizer_from_json
from studio.catalog import Catalog
from studio.jobs import JobRunner
from studio.runs import RunStore
from studio.services import Services
from tests.test_residency_support import NetLoader, sim_manager

TINY = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32}


def test_tiny_shakespeare_is_rebuilt_in_its_layout():
    text = tiny_shakespeare()
    assert 1_100_000 < len(text) <= 1_115_394
    assert text.startswith("FIRST CITIZEN:\nBefore we proceed any further, hear me speak.\n\nALL:\nSpeak, speak.")
    assert "ROMEO:\n" in text and "PROSPERO:\n" in text and "KING RICHARD:\n" in text
    assert text.count("[") < 5 and "ACT I" not in text and "SCENE" not in text  # no directions or headings
    assert len(set(text)) < 80


def test_python_corpus_is_stdlib_source_within_the_budget():
    text = python_source(200_000)
    assert len(text) <= 200_000 and text.startswith("# ---- ") and "\ndef " in text and "import " in text
    assert text.isascii() and "\r" not in text
    compile(text.split("# ---- ")[1].split("\n", 1)[1], "first-module", "exec")  # real, parseable Python


def test_bpe_round_trips_any_text_and_its_json():
    corpus = python_source(120_000)
    tok = BPETokenizer.train(corpus, 400)
    assert tok.vocab_size == 400
    samples = [corpus[5000:9000], "def f(x):\n\treturn x  # ok\n", "Ünïcode, 中文 and \x00 bytes \r\n", "  lead"]
    for s in samples:
        assert tok.decode(tok.encode(s)) == s
    assert len(tok.encode(corpus[:4000])) < 0.7 * 4000  # 144 merges learned: fewer tokens than characters
    again = tokenizer_from_json(tok.to_json())
    assert again.encode(samples[0]) == tok.encode(samples[0])


def _services(tmp_path, manager) -> Services:
    from studio.settings import Settings

    settings = Settings(data_dir=tmp_path / "data", models_dir=tmp_path / "models", open_browser=False)
    return Services(settings, manager, Catalog(settings.models_dir), JobRunner(), RunStore(settings.runs_dir))


def test_code_with_bpe_and_rotary_positions_trains(ctx):
    backend = ctx.backends.tinylm
    data = DataSpec(corpus="python", tokenizer="bpe", bpe_vocab=300, max_chars=40_000)
    opts = TrainOptions(steps=20, batch_size=8, lr=3e-3, eval_every=10, eval_batches=2, data=data)
    job = backend.start_training(TINY | {"pos": "rope"}, opts)
    assert job.wait(timeout=240) and job.status == "done", (job.error, job.logs[-3:])
    run_id = job.result.run_id
    run = ctx.runs.get(run_id)
    assert run.config["data"]["corpus"] == "python" and run.config["model"]["pos"] == "rope"
    assert job.result.history[-1]["val_loss"] < job.result.history[0]["val_loss"] + 0.5
    cached, uncached = backend.cache_speed(run_id, "def ", max_new_tokens=12)
    assert cached.text == uncached.text and cached.text.startswith("def ")  # same seed, same logits, same text
    assert cached.cached and not uncached.cached and cached.tokens_per_s > 0
    points = backend.extrapolation(run_id, max_tokens=512)
    assert [p.factor for p in points] == [1, 2, 4] and all(p.loss is not None for p in points)
    assert [p["factor"] for p in backend.saved_extrapolation(run_id)] == [1, 2, 4]
    assert dict(backend.runs())[next(iter(dict(backend.runs())))] == run_id


def _losses(tmp_path, monkeypatch, interrupt: bool) -> tuple[list[float], int]:
    from backends.tinylm import backend as backend_module

    load = backend_module._TinyLMLoader.load  # the simulated card asks for "cuda"; its memory is host memory
    monkeypatch.setattr(backend_module._TinyLMLoader, "load", lambda self, device: load(self, "cpu"))
    manager, _, _ = sim_manager(30, wait_timeout_s=10)
    services = _services(tmp_path, manager)
    manager.register(NetLoader("llm:big", 29.5))  # does not fit beside the trainer (~1 MiB): it must pause
    leases, threads = [], []
    real = manager.training

    def training(key, **kw):
        lease = real(key, **kw)
        report = lease.report

        def on_report(**info):
            report(**info)
            if interrupt and info["step"] in (3, 7):
                t = threading.Thread(target=lambda: manager.run("llm:big", lambda m: time.sleep(0.05), working_bytes=0))
                t.start()
                threads.append(t)
                deadline = time.monotonic() + 10
                while not manager.snapshot().waiting and time.monotonic() < deadline:
                    time.sleep(0.005)

        lease.report = on_report
        leases.append(lease)
        return lease

    manager.training = training
    backend = TinyLMBackend(services)
    opts = TrainOptions(works=("sonnets",), steps=10, batch_size=4, eval_every=4, eval_batches=1)
    job = backend.start_training(TINY | {"dropout": 0.1, "pos": "alibi"}, opts)  # dropout: the RNG must come back
    assert job.wait(timeout=120) and job.status == "done", (job.error, job.logs[-3:])
    for t in threads:
        t.join(10)
    services.jobs.shutdown(timeout=5)
    rows = services.runs.get(job.result.run_id).metrics()
    return [r["train_loss"] for r in rows], leases[0].pauses


def test_training_runs_through_the_preemptible_lease_and_a_pause_changes_nothing(tmp_path, monkeypatch):
    reference, no_pauses = _losses(tmp_path / "a", monkeypatch, interrupt=False)
    losses, pauses = _losses(tmp_path / "b", monkeypatch, interrupt=True)
    assert no_pauses == 0 and pauses == 2
    assert losses == pytest.approx(reference, abs=0) and len(losses) == 10  # identical, not merely close
