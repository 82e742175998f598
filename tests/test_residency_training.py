"""Preemptible training leases on the simulated card (CPU only): a trainer gives way to an interactive request at a
step boundary, comes back by itself, and its loss curve is exactly the one of an uninterrupted run."""

from __future__ import annotations

import threading
import time

import torch
from torch import nn

from studio.jobs import JobRunner
from studio.residency import ResidencyManager
from tests.test_residency_support import MiB, NetLoader, sim_manager, tiers

X = torch.ones(2, 256)


def _wait_until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def train(manager: ResidencyManager, steps: int = 12, hook=None, working_bytes=None, accel=None) -> list[float]:
    """A small regression net with dropout and random batches: every step draws from the global CPU RNG."""
    torch.manual_seed(1234)
    model = nn.Sequential(nn.Linear(64, 256), nn.Dropout(0.3), nn.ReLU(), nn.Linear(256, 1))  # 66 KB fp32
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    with manager.training("train:test", modules=[model], optimizers=[opt], working_bytes=working_bytes,
                          label="Fine-tune") as lease:  # fmt: skip
        for step in range(steps):
            if hook is not None:
                hook(step, lease)
            with lease.step():
                x = torch.randn(16, 64)
                loss = ((model(x) - x[:, :1]) ** 2).mean()
                scratch = accel.working_memory(3 * MiB) if accel is not None else None  # activations
                opt.zero_grad(set_to_none=False)
                loss.backward()
                opt.step()
                del scratch
            lease.report(step=step, loss=loss.item())
            losses.append(loss.item())
    return losses, lease, model, opt


def test_cpu_only_machine_lease_is_a_no_op():
    manager = ResidencyManager("cpu")
    losses, lease, _, _ = train(manager, steps=3)
    assert len(losses) == 3 and lease.pauses == 0 and lease.paused_s == 0.0 and lease.steps == 3
    assert manager.snapshot().trainings == []


def test_interactive_request_pauses_training_and_results_do_not_change():
    reference, *_ = train(sim_manager(30)[0])

    manager, _, accel = sim_manager(30, wait_timeout_s=10)
    manager.register(NetLoader("llm:big", 27))
    results: dict = {}

    def chat() -> None:
        with manager.use("llm:big", working_bytes=0) as model:
            torch.randn(1000)  # the request draws from the same global RNG the trainer uses
            results["out"] = model(X)
            results["paused_for"] = manager.snapshot().trainings[0].status

    def hook(step: int, lease) -> None:
        if step in (4, 8):  # an interactive request arrives; the trainer meets it at its next step boundary
            t = threading.Thread(target=chat)
            t.start()
            _wait_until(lambda: manager.snapshot().waiting)
            waiting = manager.snapshot().waiting[0]
            assert waiting.key == "llm:big" and "held by Fine-tune (training" in waiting.reason
            results.setdefault("threads", []).append(t)

    losses, lease, model, opt = train(manager, hook=hook, accel=accel)
    for t in results["threads"]:
        t.join(10)
    assert losses == reference  # exactly: weights, optimizer state and RNG all came back
    assert lease.pauses == 2 and lease.paused_s > 0
    assert results["paused_for"].startswith("paused for Chat")
    assert all(p is q for p, q in zip(opt.param_groups[0]["params"], model.parameters(), strict=True))
    assert tiers(manager)["llm:big"] in ("ram", "disk")  # it gave the card back to the trainer
    kinds = [e.kind for e in manager.snapshot().events]
    assert kinds.count("train_pause") == 2 and kinds.count("train_resume") == 2
    assert manager.snapshot().metrics.counters["training_pauses"] == 2


def test_working_memory_is_measured_in_the_first_steps():
    manager, _, accel = sim_manager(100)
    seen = {}

    def hook(step: int, lease) -> None:
        seen[step] = lease.working

    train(manager, steps=4, hook=hook, accel=accel)
    assert seen[0] == 32 * MiB  # a guess before any step ran
    assert 3 * MiB <= seen[3] < 6 * MiB  # the measured peak of a step: its 3 MiB of "activations" and the batch


def test_job_shows_the_pause():
    manager, _, accel = sim_manager(30, wait_timeout_s=10)
    manager.register(NetLoader("llm:big", 27))
    runner = JobRunner()
    seen = {}

    def hook(step: int, lease) -> None:
        if step == 3:
            threading.Thread(target=lambda: manager.run("llm:big", lambda m: time.sleep(0.3), working_bytes=0)).start()
            _wait_until(lambda: manager.snapshot().waiting)
        if step == 5:
            seen["after"] = job.summary()["paused"]

    def fn(job):
        return train(manager, steps=6, hook=hook, accel=accel)[1].pauses

    job = runner.submit("Fine-tune", fn)

    def watch() -> None:
        _wait_until(lambda: job.paused_for is not None or job.is_finished)
        seen["during"] = job.summary()["paused"], job.message

    watcher = threading.Thread(target=watch)
    watcher.start()
    assert job.wait(20) and job.result == 1, job.error
    watcher.join(5)
    assert seen["during"][0].startswith("paused for Chat, ") and seen["during"][1] == "paused for Chat"
    assert seen["after"].startswith("paused 1x")


def test_training_a_registered_model_parks_its_weights_with_the_training_state():
    """SD LoRA trains the UNet the manager holds: on a pause the weights go with the optimizer state, the record says
    "parked by training", and everything comes back identical."""

    def run(manager, hook=None) -> list[float]:
        manager.register(NetLoader("m:t", 4))
        losses = []
        with manager.use("m:t", working_bytes=0) as net:
            net.requires_grad_(True)
            opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
            torch.manual_seed(7)
            with manager.training("m:t", modules=[net], optimizers=[opt], working_bytes=MiB, label="LoRA") as lease:
                for step in range(8):
                    if hook is not None:
                        hook(step, lease)
                    with lease.step():
                        loss = net(torch.randn(4, 256)).pow(2).mean()
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                    losses.append(loss.item())
        return losses, lease

    reference, _ = run(sim_manager(60)[0])
    manager, _, _ = sim_manager(60, wait_timeout_s=10)
    manager.register(NetLoader("llm:big", 50))
    seen = {}

    def chat() -> None:
        with manager.use("llm:big", working_bytes=0) as model:
            seen["states"] = {m.key: m.state for m in manager.snapshot().models}
            model(X)

    def hook(step: int, lease) -> None:
        if step == 3:
            threading.Thread(target=chat).start()
            _wait_until(lambda: manager.snapshot().waiting)

    losses, lease = run(manager, hook)
    assert losses == reference and lease.pauses == 1
    assert seen["states"]["m:t"] == "parked by training" and seen["states"]["llm:big"] == "in use"
    assert tiers(manager)["m:t"] == "gpu"


def test_ultralytics_callbacks_drive_one_preemptible_lease():
    """YOLO training: on_pretrain_routine_end opens the lease on trainer.model/ema/optimizer, on_train_batch_end is
    the step boundary; an interactive request gets the card between two batches and training goes on identically."""
    from types import SimpleNamespace

    from backends.vision.train import _LeaseCallbacks

    def run(manager, interrupt=None) -> list[float]:
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(32, 64), nn.Dropout(0.2), nn.ReLU(), nn.Linear(64, 1))
        ema = SimpleNamespace(ema=nn.Linear(32, 1))
        trainer = SimpleNamespace(model=model, ema=ema, optimizer=torch.optim.SGD(model.parameters(), lr=0.05,
                                  momentum=0.9), epoch=0, tloss=None)  # fmt: skip
        callbacks, losses = _LeaseCallbacks(manager, "train:yolo:test"), []
        callbacks.start(trainer)
        for batch in range(8):
            if interrupt is not None and batch == 4:
                interrupt()
            x = torch.randn(8, 32)
            loss = (model(x) - 1).pow(2).mean()
            trainer.optimizer.zero_grad()
            loss.backward()
            trainer.optimizer.step()
            trainer.tloss = loss.detach()
            losses.append(loss.item())
            callbacks.batch_end(trainer)
        callbacks.close(trainer)
        callbacks.close(trainer)  # on_train_end and the finally block both close it
        return losses, callbacks.lease

    reference, _ = run(sim_manager(30)[0])
    manager, _, _ = sim_manager(30, wait_timeout_s=10)
    manager.register(NetLoader("llm:big", 29.995))  # leaves less free than the trainer holds

    def interrupt() -> None:
        threading.Thread(target=lambda: manager.run("llm:big", lambda m: torch.randn(100), working_bytes=0)).start()
        _wait_until(lambda: manager.snapshot().waiting)

    losses, lease = run(manager, interrupt)
    assert losses == reference and lease.pauses == 1 and lease.metrics["loss"] == losses[-1]
    assert manager.snapshot().trainings == []
