"""Regression tests for the residency defects of issue 11 (simulated card, CPU only); each failed before its fix."""

from __future__ import annotations

import contextvars
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from studio.residency import ResidencyError
from studio.residency.accel import configure_allocator
from tests.test_residency_support import MiB, NetLoader, sim_manager, tiers

X = torch.ones(2, 256)


class SlowLoader(NetLoader):
    def __init__(self, key: str, mib: float, delay: float, started: threading.Event | None = None) -> None:
        super().__init__(key, mib)
        self.delay, self.started = delay, started

    def load(self, device: str):
        if self.started is not None:
            self.started.set()
        time.sleep(self.delay)
        return super().load(device)


def test_unregister_never_releases_a_model_whose_load_ends_in_a_lease():
    manager, _, _ = sim_manager(100)
    started = threading.Event()
    loader = SlowLoader("m:a", 10, 0.3, started)
    manager.register(loader)
    leased, release = threading.Event(), threading.Event()

    def user() -> None:
        with manager.use("m:a", working_bytes=0):
            leased.set()
            release.wait(5)

    t = threading.Thread(target=user)
    t.start()
    started.wait(5)  # the load is under way: the record is moving, its lease comes when it ends
    with pytest.raises(ResidencyError, match="in use"):
        manager.unregister("m:a")
    assert leased.is_set() and loader.releases == 0 and manager.is_registered("m:a")
    release.set()
    t.join(5)
    manager.unregister("m:a")
    assert loader.releases == 1


def test_another_models_load_is_not_recorded_as_this_models_working_peak():
    manager, _, accel = sim_manager(100)
    allocated = threading.Event()

    class Converting(NetLoader):  # its load uses 40 MB of device memory for a moment (a conversion buffer)
        def load(self, device: str):
            scratch = accel.working_memory(40 * MiB)
            del scratch
            allocated.set()
            time.sleep(0.3)
            return super().load(device)

    manager.register(NetLoader("m:a", 5))
    manager.register(Converting("m:b", 10))
    with manager.use("m:a", working_bytes=0):
        pass
    with manager.use("m:a", working_bytes=0):  # alone when granted; m:b's load runs meanwhile, granted after
        t = threading.Thread(target=lambda: manager.run("m:b", lambda m: None, working_bytes=0))
        t.start()
        allocated.wait(5)
    t.join(5)
    assert manager._records["m:a"].working_need(None) < 5 * MiB  # not m:b's 40 MB


def test_a_trainer_starting_during_a_lease_is_not_that_leases_working_peak():
    """Seen on the H200 stress run: a training run resumed while a chat lease ran alone, its gigabytes were taken
    as the chat's working memory, and the 8B model was then judged too big for the card and sent to the CPU."""
    manager, _, accel = sim_manager(100)
    manager.register(NetLoader("m:a", 5))
    with manager.use("m:a", working_bytes=0):
        pass
    model = torch.nn.Linear(512, 1024)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with (
        manager.use("m:a", working_bytes=0),  # alone when granted
        manager.training("train:t", modules=[model], optimizers=[opt], label="Fine-tune") as lease,
        lease.step(),
    ):
        scratch = accel.working_memory(30 * MiB)  # the trainer's activations
        del scratch
    assert manager._records["m:a"].working_need(None) < 5 * MiB  # not the trainer's 30 MB


def test_offload_keeps_the_ram_cap():
    manager, _, _ = sim_manager(100, ram_cap_bytes=50 * MiB)
    for key in ("m:a", "m:b"):
        manager.register(NetLoader(key, 40))
        with manager.use(key, working_bytes=0):
            pass
    manager.offload()
    snap = manager.snapshot()
    assert snap.ram_used_bytes <= 50 * MiB and sorted(tiers(manager).values()) == ["disk", "ram"]


def test_greedydual_inflation_rises_with_evictions():
    manager, _, _ = sim_manager(100)
    for key in ("m:a", "m:b", "m:c"):
        manager.register(NetLoader(key, 40))
    for key in ("m:a", "m:b", "m:c", "m:a"):
        with manager.use(key, working_bytes=0):
            pass
    assert manager._policy.inflation > 0  # L ages: models unused since fall behind those used after
    assert manager._records["m:a"].base == manager._policy.inflation


def test_a_request_on_a_thread_that_stepped_another_request_waits_instead_of_refusing():
    """Gradio runs generator steps of different sessions on the same worker threads (anyio.to_thread.run_sync, each
    call in a copy of the event loop's context): lease ownership is per request (token), not per thread."""
    manager, _, _ = sim_manager(100, wait_timeout_s=5)
    manager.register(NetLoader("m:a", 60))
    manager.register(NetLoader("m:b", 60))

    def chat():
        with manager.use("m:a", working_bytes=0):
            yield "a"

    worker, closer = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    gen = chat()
    assert (
        worker.submit(contextvars.copy_context().run, next, gen).result(5) == "a"
    )  # session 1 holds m:a, its generator is suspended

    def session_two() -> str:
        with manager.use("m:b", working_bytes=0):
            return "b"

    second = worker.submit(
        contextvars.copy_context().run, session_two
    )  # same worker thread, another session: it must wait, not be refused
    time.sleep(0.3)
    closer.submit(gen.close).result(5)  # Stop from the event loop's thread ends session 1's lease
    assert second.result(5) == "b"
    worker.shutdown()
    closer.shutdown()


def test_a_failed_upload_keeps_the_pool_and_the_retry_does_not_pin_twice():
    manager, _, accel = sim_manager(100)
    manager.register(NetLoader("m:a", 30))
    buffers = []
    host_buffer = accel.host_buffer
    accel.host_buffer = lambda n: buffers.append(n) or host_buffer(n)
    accel.cached_bytes = 80 * MiB  # reserved-but-unused blocks: the first allocation fails until the cache is emptied
    with manager.use("m:a", working_bytes=0) as model:
        assert accel.on_device(model.fc.weight)
    assert len(buffers) == 1 and manager.snapshot().ram_used_bytes <= 31 * MiB


def test_oom_while_others_hold_memory_waits_for_them_instead_of_failing():
    """The leased model uses more working memory than it declared: placing another one runs out of memory even
    after emptying the cache; it waits for that lease to end and is placed then."""
    manager, _, accel = sim_manager(100, wait_timeout_s=40)
    manager.register(NetLoader("m:a", 40))
    manager.register(NetLoader("m:b", 40))
    inside = threading.Event()

    def busy() -> None:
        with manager.use("m:a", working_bytes=0):
            scratch = accel.working_memory(30 * MiB)  # undeclared activations
            inside.set()
            deadline = time.monotonic() + 30  # ends as soon as the other request ran out of memory and waits
            while time.monotonic() < deadline and not any(e.kind == "oom_wait" for e in manager.snapshot().events):
                time.sleep(0.02)
            del scratch

    t = threading.Thread(target=busy)
    t.start()
    inside.wait(5)
    with manager.use("m:b", working_bytes=0) as b:
        assert accel.on_device(b.fc.weight)
    t.join(5)
    kinds = [e.kind for e in manager.snapshot().events]
    assert "oom_wait" in kinds and manager.snapshot().metrics.counters["oom_failures"] == 0


def test_oom_with_no_other_lease_fails_with_bytes():
    manager, _, accel = sim_manager(100)
    manager.register(NetLoader("m:a", 40))

    def no_room(nbytes: int):  # memory the budget cannot see: the plan fits, the card does not
        raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {nbytes / MiB:.2f} MiB.")

    accel.alloc = no_room
    with pytest.raises(ResidencyError, match=r"Out of GPU memory placing m:a: it needs 40.00 MB .*no other lease"):
        manager.run("m:a", lambda m: None, working_bytes=0)
    assert manager.snapshot().metrics.counters["oom_failures"] == 1


def test_snapshots_never_see_half_a_move():
    manager, _, _ = sim_manager(100)
    for key in ("m:a", "m:b", "m:c"):
        manager.register(NetLoader(key, 10))
    stop, errors = threading.Event(), []

    def reader() -> None:
        while not stop.is_set():
            try:
                manager.snapshot()
            except Exception as e:  # an AttributeError on a pool cleared mid-read
                errors.append(e)
            time.sleep(0.001)

    r = threading.Thread(target=reader)
    r.start()
    for _ in range(2):
        for key in ("m:a", "m:b", "m:c"):
            with manager.use(key, working_bytes=0):
                pass
        manager.offload(to="disk")
    stop.set()
    r.join(5)
    assert not errors


def test_allocator_is_configured_against_fragmentation(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert configure_allocator() == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    assert configure_allocator() == "max_split_size_mb:128"  # the user's own setting is kept


def test_a_model_swapped_to_ram_lets_its_backend_drop_the_device_buffers_kept_beside_it():
    """Chat keeps a static KV cache and CUDA graph beside its idle model (not counted by the manager): the loader's
    on_evict runs before the swap down, so that memory leaves the card with the model, and only then."""

    class Loader(NetLoader):
        def __init__(self, key: str, mib: float) -> None:
            super().__init__(key, mib)
            self.evicted = []

        def on_evict(self, obj) -> None:
            self.evicted.append(obj)

    manager, _, _ = sim_manager(100)
    chat = Loader("chat", 60)
    manager.register(chat)
    manager.register(NetLoader("image", 60))
    first = manager.run("chat", lambda m: m, working_bytes=0)
    manager.run("chat", lambda m: m, working_bytes=0)
    assert chat.evicted == []  # staying on the card: the buffers stay too (prompt reuse)
    manager.run("image", lambda m: m, working_bytes=0)
    assert tiers(manager)["chat"] == "ram" and chat.evicted == [first]
    manager.close()


def test_a_lease_on_a_resident_model_reuses_a_reading_of_the_last_moment(monkeypatch):
    """detect() on a video or the next image: the NVML read (~0.8 ms on the H200) is skipped when the card was read
    under RECENT_READ_S ago and the model is already on the card; a stale reading or a model to place reads afresh."""
    import studio.residency.leasing as leasing

    manager, probe, _ = sim_manager(100)
    manager.register(NetLoader("yolo", 10))
    manager.register(NetLoader("other", 10))
    manager.run("yolo", lambda m: m, working_bytes=0)  # placed: reads the card
    before = probe.reads
    for _ in range(5):
        manager.run("yolo", lambda m: m, working_bytes=0)
    assert probe.reads == before  # back to back on a resident model: the last reading serves
    manager.run("other", lambda m: m, working_bytes=0)
    assert probe.reads > before  # a model to place reads the card
    monkeypatch.setattr(leasing, "RECENT_READ_S", 0.0)
    before = probe.reads
    manager.run("yolo", lambda m: m, working_bytes=0)
    assert probe.reads == before + 1  # too old: read again
    manager.close()


def test_a_cpu_fallback_is_read_again_and_a_transient_reading_does_not_send_a_model_to_the_cpu(caplog):
    """One reading counts 90 MiB of "other programs" (memory the studio had just freed, as NVML can report for a
    moment): the 60 MiB model looks larger than the whole budget. The second reading is normal: it goes on the GPU."""
    import logging

    from tests.test_residency_support import on_device

    manager, probe, accel = sim_manager(100)
    manager.register(NetLoader("m:a", 60))
    read = probe.read
    calls = {"n": 0}

    def transient_read():
        calls["n"] += 1
        if calls["n"] == 1:
            probe.set_process(4242, "freed a moment ago", 90 * MiB)
        else:
            probe.remove_process(4242)
        return read()

    probe.read = transient_read
    manager._reading = None  # no recent reading to reuse
    with caplog.at_level(logging.WARNING, logger="studio.residency"), manager.use("m:a", working_bytes=0) as m:
        assert on_device(accel, m)
    assert "running it on the CPU" not in caplog.text and calls["n"] >= 2
    assert manager.snapshot().metrics.counters.get("cpu_fallbacks", 0) == 0


def test_a_model_that_stays_larger_than_the_budget_still_runs_on_the_cpu_after_the_second_reading():
    from tests.test_residency_support import on_device

    manager, probe, accel = sim_manager(100)
    manager.register(NetLoader("m:a", 60))
    probe.set_process(4242, "a game", 90 * MiB)
    t0 = time.monotonic()
    with manager.use("m:a", working_bytes=0) as m:
        assert not on_device(accel, m)
    assert time.monotonic() - t0 >= 0.2  # the verdict was read twice, FALLBACK_CONFIRM_S apart
