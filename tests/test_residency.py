"""Residency manager policy on a simulated 100 MiB card (CPU only): tiers, leases, waiting, OOM, pressure, caps."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch

from studio.residency import ResidencyError, ResidencyManager
from studio.settings import Settings
from tests.test_residency_support import MiB, NetLoader, on_device, sim_manager, tiers

X = torch.ones(2, 256)


def test_cpu_only_machine_keeps_everything_on_the_cpu():
    manager = ResidencyManager("cpu")
    loader = NetLoader("m:a", 1)
    manager.register(loader)
    assert manager.device == "cpu" and manager.is_registered("m:a")
    with manager.use("m:a") as model:
        assert next(model.parameters()).device.type == "cpu"
        model(X)
    with manager.use("m:a"):
        pass
    snap = manager.snapshot()
    assert snap.card is None and snap.capacity_bytes == 0
    assert snap.models[0].tier == "ram" and snap.models[0].device == "cpu"
    assert snap.metrics.counters["misses"] == 1 and snap.metrics.counters["hits"] == 1
    assert loader.devices == ["cpu"]
    manager.offload("m:a")
    assert tiers(manager) == {"m:a": "disk"} and loader.releases == 1


def test_from_settings_applies_caps_on_cpu(settings: Settings):
    s = settings.model_copy(update={"vram_cap_gb": 6.0, "ram_cap_gb": 2.0, "reserve_gb": 0.5, "keep_alive_s": 30.0})
    manager = ResidencyManager.from_settings(s)
    try:
        assert manager.vram_cap_bytes == 6 * 2**30 and manager.ram_cap_bytes == 2 * 2**30
        assert manager.reserve_bytes == 2**29 and manager.keep_alive_s == 30.0
        assert manager.device == ("cuda" if torch.cuda.is_available() else "cpu")
    finally:
        manager.close()


def test_loads_onto_the_card_and_outputs_survive_swaps():
    manager, _, accel = sim_manager(100)
    for key in ("m:a", "m:b", "m:c"):
        manager.register(NetLoader(key, 40))
    with manager.use("m:a", working_bytes=0) as a:
        assert on_device(accel, a) and accel.on_device(a.anchors)
        expected, param_id = a(X).clone(), id(a.fc.weight)
    for key in ("m:b", "m:c"):  # 40 + 40 fit; the third pushes the least valuable one to RAM
        with manager.use(key, working_bytes=0):
            pass
    assert sorted(tiers(manager).values()) == ["gpu", "gpu", "ram"]
    with manager.use("m:a", working_bytes=0) as a:
        assert on_device(accel, a) and id(a.fc.weight) == param_id
        assert torch.equal(a(X), expected)
    snap = manager.snapshot()
    assert accel.allocated() == sum(m.bytes for m in snap.models if m.tier == "gpu")
    assert snap.metrics.counters["evictions"] >= 2 and any(s.kind == "ram->gpu" for s in snap.metrics.switches)


def test_gds_evicts_cheapest_to_reload_per_byte_where_lru_evicts_oldest():
    for policy, expected_victim in (("gds", "m:cheap"), ("lru", "m:costly")):
        manager, _, _ = sim_manager(100, policy=policy)
        manager.register(NetLoader("m:costly", 40))
        manager.register(NetLoader("m:cheap", 40))
        manager.register(NetLoader("m:new", 40))
        for key in ("m:costly", "m:cheap"):
            with manager.use(key, working_bytes=0):
                pass
        with manager._cond:  # measured reload costs: m:costly takes 10x longer per byte to come back
            manager._records["m:costly"].swap_in_s = 1.0
            manager._records["m:cheap"].swap_in_s = 0.1
        with manager.use("m:new", working_bytes=0):
            pass
        assert tiers(manager)[expected_victim] == "ram", policy


def test_leased_model_is_never_evicted_and_request_times_out():
    manager, _, _ = sim_manager(100, wait_timeout_s=0.4)
    manager.register(NetLoader("m:a", 60))
    manager.register(NetLoader("m:b", 60))
    with manager.use("m:a", working_bytes=0):
        errors = []

        def other():
            try:
                with manager.use("m:b", working_bytes=0):
                    pass
            except ResidencyError as e:
                errors.append(str(e))

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert tiers(manager)["m:a"] == "gpu"
        assert errors and "Timed out" in errors[0] and "m:a" in errors[0]
    assert manager.snapshot().metrics.counters["timeouts"] == 1


def test_waiting_request_shows_in_snapshot_and_runs_when_the_lease_ends():
    manager, _, accel = sim_manager(100)
    manager.register(NetLoader("m:a", 60))
    manager.register(NetLoader("m:b", 60))
    got, started = [], threading.Event()

    def other():
        started.set()
        with manager.use("m:b", working_bytes=0) as b:
            got.append(on_device(accel, b))

    with manager.use("m:a", working_bytes=0):
        t = threading.Thread(target=other)
        t.start()
        started.wait()
        deadline = time.time() + 3
        while not manager.snapshot().waiting and time.time() < deadline:
            time.sleep(0.01)
        waiting = manager.snapshot().waiting
        assert [w.key for w in waiting] == ["m:b"] and waiting[0].need_bytes > 0 and "m:a" in waiting[0].reason
    t.join(5)
    assert got == [True]
    assert tiers(manager) == {"m:a": "ram", "m:b": "gpu"} and manager.snapshot().waiting == []


def test_queue_past_its_bound_answers_busy():
    manager, _, _ = sim_manager(100, max_waiting=1, wait_timeout_s=2)
    for key in ("m:a", "m:b", "m:c"):
        manager.register(NetLoader(key, 60))
    results: dict[str, str] = {}

    def request(key: str) -> None:
        try:
            with manager.use(key, working_bytes=0):
                results[key] = "ok"
        except ResidencyError as e:
            results[key] = str(e)

    with manager.use("m:a", working_bytes=0):
        first = threading.Thread(target=request, args=("m:b",))
        first.start()
        while not manager.snapshot().waiting:
            time.sleep(0.01)
        second = threading.Thread(target=request, args=("m:c",))
        second.start()
        second.join(5)
        assert results["m:c"].startswith("busy")
    first.join(5)
    assert results["m:b"] == "ok" and manager.snapshot().metrics.counters["busy"] == 1


def test_same_thread_holding_the_memory_is_told_at_once():
    manager, _, _ = sim_manager(100, wait_timeout_s=30)
    manager.register(NetLoader("m:a", 60))
    manager.register(NetLoader("m:b", 60))
    t0 = time.monotonic()
    with manager.use("m:a", working_bytes=0), pytest.raises(ResidencyError, match="same request holds m:a"):  # noqa: SIM117
        with manager.use("m:b", working_bytes=0):
            pass
    assert time.monotonic() - t0 < 5


def test_run_retries_once_after_oom_with_idle_models_evicted(caplog):
    manager, _, accel = sim_manager(100)
    for key in ("m:a", "m:b"):
        manager.register(NetLoader(key, 30))
    with manager.use("m:b", working_bytes=0):
        pass
    calls = []

    def fn(model):
        calls.append(tiers(manager)["m:b"])
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has ...")
        return model(X).shape

    with caplog.at_level(logging.WARNING, logger="studio.residency"):
        assert manager.run("m:a", fn, working_bytes=0) == (2, 30 * 1024)
    assert calls == ["gpu", "ram"]  # the idle model was moved off before the retry
    snap = manager.snapshot()
    assert snap.metrics.counters["oom_retries"] == 1 and accel.empty_cache_calls >= 1
    assert any(e.kind == "oom_retry" and e.bytes == 20 * MiB for e in snap.events)
    assert "Out of memory running m:a" in caplog.text
    assert manager._records["m:a"].oom_floor >= 20 * MiB  # the next lease sets that much aside


def test_run_raises_clear_error_after_second_oom():
    manager, _, _ = sim_manager(100)
    manager.register(NetLoader("m:a", 30))

    def always_oom(model):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")

    with pytest.raises(ResidencyError, match=r"needs about .*weights 30.00 MB.*2.00 GB.*free on the card"):
        manager.run("m:a", always_oom, working_bytes=0)
    assert manager.snapshot().metrics.counters["oom_failures"] == 1
    with pytest.raises(ValueError):  # other errors pass through untouched, no retry
        manager.run("m:a", lambda m: (_ for _ in ()).throw(ValueError("bad input")))


def test_other_process_taking_memory_pushes_idle_models_down():
    manager, probe, accel = sim_manager(100, reserve_mib=10)
    for key in ("m:a", "m:b"):
        manager.register(NetLoader(key, 30))
    with manager.use("m:a", working_bytes=0):
        pass
    with manager.use("m:b", working_bytes=0):
        probe.set_process(4242, "game.exe", 40 * MiB)  # budget 100 - 40 - 10 = 50 < 60 in use
        moved = manager.maintain()
        assert moved == ["m:a"] and tiers(manager) == {"m:a": "ram", "m:b": "gpu"}  # leased m:b stays
    snap = manager.snapshot()
    assert snap.others_bytes == 40 * MiB and snap.capacity_bytes == 50 * MiB
    assert [p.name for p in snap.card.processes] == ["game.exe", "this studio"]
    assert any(e.kind == "pressure" for e in snap.events) and accel.empty_cache_calls >= 1
    probe.remove_process(4242)
    with manager.use("m:a", working_bytes=0):
        assert tiers(manager) == {"m:a": "gpu", "m:b": "gpu"}


def test_cached_blocks_eating_the_reserve_are_given_back():
    manager, probe, accel = sim_manager(120, reserve_mib=20)
    manager.register(NetLoader("m:a", 40))
    with manager.use("m:a", working_bytes=0):
        pass
    accel.cached_bytes = 70 * MiB  # freed working memory our allocator kept: the card shows only 10 MiB free
    assert probe.read().free_bytes < 20 * MiB
    calls = accel.empty_cache_calls
    assert manager.maintain() == [] and accel.empty_cache_calls == calls + 1 and accel.cached_bytes == 0
    assert tiers(manager) == {"m:a": "gpu"} and any(e.kind == "trim_cache" for e in manager.snapshot().events)
    assert manager.maintain() == [] and accel.empty_cache_calls == calls + 1  # nothing cached any more


def test_vram_cap_lowered_and_raised_live():
    manager, _, _ = sim_manager(100)
    for key in ("m:a", "m:b"):
        manager.register(NetLoader(key, 30))
        with manager.use(key, working_bytes=0):
            pass
    manager.set_caps(40 * MiB, None)
    assert sorted(tiers(manager).values()) == ["gpu", "ram"]
    assert manager.snapshot().capacity_bytes == 40 * MiB
    manager.set_caps(None, None)
    for key in ("m:a", "m:b"):
        with manager.use(key, working_bytes=0):
            pass
    assert tiers(manager) == {"m:a": "gpu", "m:b": "gpu"}
    with pytest.raises(ValueError):
        manager.set_caps(-1, None)


def test_model_bigger_than_the_whole_budget_runs_on_cpu(caplog):
    manager, _, accel = sim_manager(100)
    manager.register(NetLoader("m:huge", 120))
    with caplog.at_level(logging.WARNING, logger="studio.residency"), manager.use("m:huge", working_bytes=0) as m:
        assert not on_device(accel, m)
        assert m(X).shape == (2, 120 * 1024)
    assert "running it on the CPU" in caplog.text
    snap = manager.snapshot()
    assert snap.models[0].tier == "ram" and snap.models[0].cpu_fallback
    assert snap.metrics.counters["cpu_fallbacks"] == 1 and accel.allocated() == 0


def test_working_memory_is_measured_and_set_aside():
    manager, _, accel = sim_manager(100)
    manager.register(NetLoader("m:a", 30))
    manager.register(NetLoader("m:b", 30))
    with manager.use("m:a", working_bytes=0):
        scratch = accel.working_memory(25 * MiB)
        del scratch
    peak = manager.snapshot().models[0].working_peak
    assert 25 * MiB <= peak < 26 * MiB
    with manager.use("m:b", working_bytes=0):
        pass
    assert manager._records["m:a"].working_need(None) == peak
    # 30 (a) + 25 (a's working) + 30 (b) = 85 fits in 100; with b's own 30 MiB hint, 115 does not
    with manager.use("m:b", working_bytes=0), manager.use("m:a"):
        assert tiers(manager) == {"m:a": "gpu", "m:b": "gpu"}


def test_keep_alive_moves_idle_models_down():
    manager, _, _ = sim_manager(100, keep_alive_s=0.05)
    manager.register(NetLoader("m:a", 30))
    with manager.use("m:a", working_bytes=0):
        time.sleep(0.1)
        assert manager.maintain() == []  # leased: stays
    time.sleep(0.1)
    assert manager.maintain() == ["m:a"] and tiers(manager) == {"m:a": "ram"}


def test_ram_cap_sends_parked_models_to_disk_and_they_reload():
    manager, _, _ = sim_manager(100, ram_cap_bytes=50 * MiB)
    loaders = {key: NetLoader(key, 40, seed=i) for i, key in enumerate(("m:a", "m:b", "m:c"))}
    for loader in loaders.values():
        manager.register(loader)
    for key in ("m:a", "m:b", "m:c", "m:a", "m:b", "m:c"):
        with manager.use(key, working_bytes=0) as m:
            assert torch.equal(m(X), loaders[key].load("cpu")(X))
        assert manager.snapshot().ram_used_bytes <= 50 * MiB
    releases = sum(loader.releases for loader in loaders.values())
    reloads = sum(loader.loads for loader in loaders.values()) - 3 - 6  # 3 first loads, 6 reference loads above
    assert releases >= 1 and 1 <= reloads <= releases


def test_offload_all_and_to_disk():
    manager, _, accel = sim_manager(100)
    for key in ("m:a", "m:b"):
        manager.register(NetLoader(key, 30))
        with manager.use(key, working_bytes=0):
            pass
    assert sorted(manager.offload()) == ["m:a", "m:b"] and accel.allocated() == 0
    assert set(tiers(manager).values()) == {"ram"}
    manager.offload("m:a", to="disk")
    assert tiers(manager) == {"m:a": "disk", "m:b": "ram"}


def test_unregister_and_register_rules():
    manager, _, accel = sim_manager(100)
    loader = NetLoader("m:a", 30)
    manager.register(loader)
    with manager.use("m:a", working_bytes=0), pytest.raises(ResidencyError, match="in use"):
        manager.unregister("m:a")
    manager.unregister("m:a")
    assert not manager.is_registered("m:a") and loader.releases == 1 and accel.allocated() == 0
    with pytest.raises(ResidencyError, match="not registered"), manager.use("m:a"):
        pass


def test_generation_changes_when_weights_move():
    manager, _, _ = sim_manager(100)
    manager.register(NetLoader("m:a", 30))
    with manager.use("m:a", working_bytes=0):
        pass
    g = manager.generation("m:a")
    with manager.use("m:a", working_bytes=0):
        pass
    assert manager.generation("m:a") == g
    manager.offload("m:a")
    assert manager.generation("m:a") == g + 1


def test_concurrent_requests_keep_accounting_consistent():
    manager, _, accel = sim_manager(100, wait_timeout_s=20)
    keys = [f"m:{i}" for i in range(5)]
    for key in keys:
        manager.register(NetLoader(key, 25))
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = torch.Generator().manual_seed(seed)
        try:
            for _ in range(15):
                key = keys[int(torch.randint(len(keys), (1,), generator=rng))]
                with manager.use(key, working_bytes=MiB) as m:
                    assert on_device(accel, m)
                    assert m(X).shape == (2, 25 * 1024)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    snap = manager.snapshot()
    assert all(m.leases == 0 and m.state in ("idle", "on disk") for m in snap.models)
    assert accel.allocated() == sum(m.bytes for m in snap.models if m.tier == "gpu") <= snap.capacity_bytes
    counters = snap.metrics.counters
    assert counters["hits"] + counters["misses"] == 6 * 15
