"""GPU tab: its formatting functions against a live (simulated-card) manager, the controls, and that it builds."""

from __future__ import annotations

import dataclasses
import time

import gradio as gr
import pytest

from studio.residency.state import WaitingView
from tabs import gpu as gpu_tab
from tests.test_residency_support import MiB, NetLoader, sim_manager


class _Ctx:
    def __init__(self, residency) -> None:
        self.residency = residency


@pytest.fixture
def busy_manager():
    manager, probe, _ = sim_manager(100, reserve_mib=10)
    for key in ("llm:a", "asr:b", "detection:c"):
        manager.register(NetLoader(key, 30))
    for key in ("llm:a", "asr:b", "detection:c", "llm:a"):
        with manager.use(key, working_bytes=0):
            time.sleep(0.01)
    probe.set_process(77, "game.exe", 5 * MiB)
    return manager


def test_tables_show_tiers_processes_switches_and_events(busy_manager):
    snap, now = busy_manager.snapshot(), time.time()
    rows = {r[0]: r for r in gpu_tab.model_rows(snap, now)}
    assert set(rows) == {"llm:a", "asr:b", "detection:c"}
    assert sorted(r[1] for r in rows.values()) == ["GPU", "GPU", "RAM"]
    assert rows["llm:a"][3] == "30.00 MB" and rows["llm:a"][6] == "2" and rows["llm:a"][7].endswith("s ago")
    assert ["77", "game.exe", "5.00 MB"] in gpu_tab.process_rows(snap)
    kinds = {r[0] for r in gpu_tab.switch_rows(snap)}
    assert {"disk->gpu", "gpu->ram", "ram->gpu"} <= kinds
    assert any(r[1] == "evict" for r in gpu_tab.event_rows(snap))
    text = gpu_tab.card_markdown(snap)
    assert "Fake 12 GB card" in text and "other programs 5.00 MB" in text and "Studio budget" in text
    assert "hit rate **0%** (0 hits, 4 misses)" in gpu_tab.stats_markdown(snap)  # 3 x 30 MiB + pads > 90 MiB


def test_timeline_has_a_line_per_model_and_other_programs(busy_manager):
    frame = gpu_tab.timeline_frame(busy_manager.snapshot(), time.time())
    assert {"llm:a", "asr:b", "detection:c", "other programs"} <= set(frame["series"])
    assert (frame["seconds"] <= 0).all() and frame["GB"].max() > 0


def test_move_buttons_and_live_cap(busy_manager):
    ctx = _Ctx(busy_manager)
    assert gpu_tab.move_down(ctx, "llm:a").startswith("Moved llm:a one tier down")
    assert gpu_tab.move_down(ctx, "llm:a", to_disk=True).startswith("Moved llm:a to disk")
    assert "idle model(s)" in gpu_tab.move_all_down(ctx)
    with pytest.raises(gr.Error, match="Pick a model"):
        gpu_tab.move_down(ctx, None)
    with pytest.raises(gr.Error, match="reserve"):
        gpu_tab.apply_vram_cap(ctx, 0.005, False)
    assert "set to" in gpu_tab.apply_vram_cap(ctx, 0.05, False)
    assert busy_manager.vram_cap_bytes == int(0.05 * 2**30)
    assert "removed" in gpu_tab.apply_vram_cap(ctx, None, True) and busy_manager.vram_cap_bytes is None


def test_waiting_request_is_shown():
    manager, _, _ = sim_manager(100)
    snap, now = manager.snapshot(), time.time()
    assert gpu_tab.waiting_markdown(snap, now) == ""
    waiting = WaitingView("diffusion:x", now - 3, 50 * MiB, "it needs 50 MB more than is free; held by llm:a")
    text = gpu_tab.waiting_markdown(dataclasses.replace(snap, waiting=[waiting]), now)
    assert "waiting for GPU: diffusion:x" in text and "(3 s;" in text and "held by llm:a" in text


def test_tab_builds_on_this_machine(ctx):
    with gr.Blocks():
        gpu_tab.TAB.build(ctx)
    assert gpu_tab.TAB.title == "GPU"
    text = gpu_tab.card_markdown(ctx.residency.snapshot())
    assert text.startswith("### No GPU") or "Studio budget" in text


def test_without_a_gpu_the_tab_shows_ram_and_cpu(ctx):
    import dataclasses as dc

    cpu_only = dc.replace(ctx.residency.snapshot(), card=None, accelerator="cpu")
    assert not gpu_tab.has_gpu(cpu_only)
    ctx = dc.replace(ctx)  # a copy whose residency reports no GPU, whatever this machine has
    ctx.residency = type("NoGpu", (), {"snapshot": lambda self: cpu_only})()
    _, _, _, _, host, frame, *_, points = gpu_tab.tick(ctx, None, [])
    _, _, _, _, _, frame, *_, points = gpu_tab.tick(ctx, None, points)
    assert host.startswith("**RAM ") and "CPU" in host and "cores" in host
    assert len(points) == 2 and set(frame["series"]) == {"RAM used (all programs)", "the studio"}
    assert frame["GB"].dtype == "float64" and (frame["GB"] > 0).all()  # not a flat 0 GB VRAM line


def test_training_runs_are_shown_with_their_pause():
    from studio.residency.state import TrainingView

    snap, now = sim_manager(100)[0].snapshot(), time.time()
    paused = TrainingView("t", "SD LoRA", "paused", "paused for Chat, 4 s", 0, 0, 12, 1, 0.0, {"loss": 0.25})
    text = gpu_tab.waiting_markdown(dataclasses.replace(snap, trainings=[paused]), now)
    assert "training: SD LoRA** (paused for Chat, 4 s, step 12, loss 0.2500" in text
