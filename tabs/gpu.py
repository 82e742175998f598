"""GPU tab: what the residency manager is doing, live (about once a second).

Card readings (total/used/free, the studio's budget, other programs on the card), each model's tier, bytes,
working-memory peak, leases and last use, a memory timeline per model and for the other programs, hit/miss and
switch-time statistics, the event log, buttons to move one or all idle models down a tier, and the VRAM cap,
applied live; then the VRAM planner (tabs/gpu_planner.py): will a job fit, by part, with ranked advice, and the
footprints measured against what it predicted. UI only: everything comes from `ctx.residency`.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Any

import gradio as gr

from studio.context import StudioContext, Tab
from studio.units import fmt_bytes
from tabs.gpu_planner import build_planner

log = logging.getLogger(__name__)

GB = 2**30
REFRESH_S = 1.0
TIMELINE_S = 300  # seconds of history in the plot
MODEL_HEADERS = ["model", "tier", "state", "weights", "working peak", "leases", "uses", "last use", "swap in", "load"]
MODEL_HEADERS += ["RAM pool", "pool reuses"]
PROCESS_HEADERS = ["pid", "program", "GPU memory"]
SWITCH_HEADERS = ["move", "count", "p50", "p95", "mean"]
EVENT_HEADERS = ["time", "event", "model", "bytes", "seconds", "detail"]


def _secs(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def _ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "never"
    d = max(0.0, now - ts)
    return f"{d:.0f} s ago" if d < 120 else f"{d / 60:.0f} min ago"


def card_markdown(snap: Any) -> str:
    card = snap.card
    if card is None and snap.accelerator == "cpu":
        return (
            "### No GPU\nThis machine has no CUDA GPU (or torch was built without CUDA): the CPU is the only tier "
            f"and every model runs there. Parked models may use up to {fmt_bytes(snap.ram_cap_bytes)} of RAM "
            f"({fmt_bytes(snap.ram_used_bytes)} now)."
        )
    cap = fmt_bytes(snap.vram_cap_bytes) if snap.vram_cap_bytes else "none (whatever is free)"
    head = f"### {card.name}" if card else "### GPU (no live readings: budgeting from the caps)"
    lines = [head]
    if card:
        lines.append(
            f"**{fmt_bytes(card.used_bytes)} used / {fmt_bytes(card.total_bytes)}**, {fmt_bytes(card.free_bytes)} free · "
            f"other programs {fmt_bytes(snap.others_bytes)}"
        )
    lines.append(
        f"Studio budget **{fmt_bytes(snap.capacity_bytes)}** (cap {cap}, reserve {fmt_bytes(snap.reserve_bytes)}) · "
        f"models + working memory on the GPU **{fmt_bytes(snap.in_use_bytes)}** · parked in RAM "
        f"{fmt_bytes(snap.ram_used_bytes)} of {fmt_bytes(snap.ram_cap_bytes)} · readings from {snap.probe}, policy {snap.policy}"
    )
    return "\n\n".join(lines)


def waiting_markdown(snap: Any, now: float) -> str:
    """Requests waiting for GPU memory and training runs (running or "paused for Chat, N s")."""
    items = [f"**waiting for GPU: {w.key}** ({now - w.since:.0f} s; {w.reason})" for w in snap.waiting]
    for t in getattr(snap, "trainings", []):
        loss = t.metrics.get("loss")
        tail = f", step {t.steps}" + (f", loss {loss:.4f}" if isinstance(loss, float) else "")
        items.append(f"**training: {t.label}** ({t.status}{tail}; {fmt_bytes(t.gpu_bytes)} on the GPU)")
    return "\n\n".join(items)


def model_rows(snap: Any, now: float) -> list[list[str]]:
    rows = []
    for m in sorted(snap.models, key=lambda m: ({"gpu": 0, "ram": 1, "disk": 2}.get(m.tier, 3), m.key)):
        tier = "CPU (too big for the GPU)" if m.cpu_fallback else {"gpu": "GPU", "ram": "RAM", "disk": "disk"}[m.tier]
        rows.append(
            [
                m.key,
                tier,
                m.state,
                fmt_bytes(m.bytes) if m.bytes else f"~{fmt_bytes(m.estimate_bytes)} (estimate)",
                fmt_bytes(m.working_peak) if m.working_peak is not None else "-",
                str(m.leases),
                str(m.uses),
                _ago(m.last_use, now),
                _secs(m.swap_in_s),
                _secs(m.load_s),
                (fmt_bytes(m.pool_bytes) + ("" if m.pinned_bytes else " (pageable)")) if m.pool_bytes else "-",
                str(m.pool_reuses),
            ]
        )
    return rows


def process_rows(snap: Any) -> list[list[str]]:
    if snap.card is None:
        return []
    return [[str(p.pid), p.name, fmt_bytes(p.used_bytes)] for p in snap.card.processes]


def switch_rows(snap: Any) -> list[list[str]]:
    return [[s.kind, str(s.count), _secs(s.p50_s), _secs(s.p95_s), _secs(s.mean_s)] for s in snap.metrics.switches]


def stats_markdown(snap: Any) -> str:
    c = snap.metrics.counters
    return (
        f"hit rate **{snap.metrics.hit_rate:.0%}** ({c['hits']} hits, {c['misses']} misses) · loads {c['loads']} · "
        f"evictions {c['evictions']} · released to disk {c['releases']} · moved up {fmt_bytes(c['bytes_up'])}, "
        f"down {fmt_bytes(c['bytes_down'])} · OOM retries {c['oom_retries']} (failed {c['oom_failures']}) · "
        f"waits {c['waits']}, timeouts {c['timeouts']}, busy {c['busy']} · CPU fallbacks {c['cpu_fallbacks']}"
    )


def event_rows(snap: Any, limit: int = 40) -> list[list[str]]:
    rows = []
    for e in reversed(snap.events[-limit:]):
        when = datetime.fromtimestamp(e.time).strftime("%H:%M:%S")
        rows.append(
            [
                when,
                e.kind,
                e.key,
                fmt_bytes(e.bytes) if e.bytes else "",
                _secs(e.seconds) if e.seconds else "",
                e.detail,
            ]
        )
    return rows


def timeline_frame(snap: Any, now: float):
    """Long format (seconds, GB, series) for gr.LinePlot: one line per model on the GPU, one for other programs."""
    import pandas as pd

    points = [p for p in snap.timeline if now - p.time <= TIMELINE_S]
    keys = sorted({k for p in points for k in p.gpu_bytes})
    rows = []
    for p in points:
        t = round(p.time - now, 1)
        rows.extend({"seconds": t, "GB": p.gpu_bytes.get(k, 0) / GB, "series": k} for k in keys)
        rows.append({"seconds": t, "GB": p.others_bytes / GB, "series": "other programs"})
    frame = pd.DataFrame(rows, columns=["seconds", "GB", "series"])
    return frame.astype({"seconds": "float64", "GB": "float64", "series": "str"})


def has_gpu(snap: Any) -> bool:
    return not (snap.card is None and snap.accelerator == "cpu")


def host_reading() -> dict[str, float]:
    """This machine's RAM and CPU now (psutil), and the studio process' own memory."""
    import os

    import psutil

    vm = psutil.virtual_memory()
    proc = psutil.Process(os.getpid())
    return {
        "ram_used": float(vm.total - vm.available),
        "ram_total": float(vm.total),
        "studio_rss": float(proc.memory_info().rss),
        "cpu_percent": float(psutil.cpu_percent(interval=None)),
        "cpus": float(psutil.cpu_count() or 1),
    }


def host_markdown(r: dict[str, float]) -> str:
    return (
        f"**RAM {fmt_bytes(r['ram_used'])} used / {fmt_bytes(r['ram_total'])}** · the studio process {fmt_bytes(r['studio_rss'])} · "
        f"CPU {r['cpu_percent']:.0f}% of {r['cpus']:.0f} cores"
    )


def host_frame(points: list[tuple[float, float, float]], now: float):
    """(seconds ago, GB, series) for the RAM plot that replaces the GPU memory plot on a machine without a GPU."""
    import pandas as pd

    rows = []
    for t, used, rss in points:
        if now - t <= TIMELINE_S:
            rows += [{"seconds": round(t - now, 1), "GB": used / GB, "series": "RAM used (all programs)"},
                     {"seconds": round(t - now, 1), "GB": rss / GB, "series": "the studio"}]  # fmt: skip
    frame = pd.DataFrame(rows, columns=["seconds", "GB", "series"])
    return frame.astype({"seconds": "float64", "GB": "float64", "series": "str"})


def apply_vram_cap(ctx: StudioContext, cap_gb: float | None, no_cap: bool) -> str:
    """Set the live VRAM cap; returns a status line. Refuses caps that leave nothing after the reserve."""
    manager = ctx.residency
    if no_cap:
        manager.set_caps(None, manager.ram_cap_bytes)
        return "VRAM cap removed: the studio may use whatever is free on the card (minus the reserve)."
    if cap_gb is None or cap_gb <= 0:
        raise gr.Error(f"VRAM cap must be a positive number of GB, got {cap_gb!r}; or tick 'no cap'.")
    reserve_gb = manager.reserve_bytes / GB
    if cap_gb <= reserve_gb:
        raise gr.Error(
            f"A VRAM cap of {cap_gb:.1f} GB leaves nothing after the {reserve_gb:.1f} GB reserve, so no model could "
            f"use the GPU. Pick more than {reserve_gb:.1f} GB (or lower reserve_gb in Settings)."
        )
    manager.set_caps(int(cap_gb * GB), manager.ram_cap_bytes)
    return f"VRAM cap set to {cap_gb:.1f} GB; models above it were moved down at once."


def move_down(ctx: StudioContext, key: str | None, to_disk: bool = False) -> str:
    if not key:
        raise gr.Error("Pick a model in the list first.")
    if not ctx.residency.is_registered(key):
        raise gr.Error(f"{key} is no longer registered; refresh the list.")
    moved = ctx.residency.offload(key, to="disk" if to_disk else None)
    if not moved:
        return f"{key} was not moved: it is in use, already on disk, or being moved right now."
    return f"Moved {key} {'to disk' if to_disk else 'one tier down'}."


def move_all_down(ctx: StudioContext) -> str:
    moved = ctx.residency.offload(None)
    return f"Moved {len(moved)} idle model(s) one tier down: {', '.join(moved)}." if moved else "No idle model to move."


def _build_models(snap: Any, now: float) -> dict[str, Any]:
    models = gr.Dataframe(model_rows(snap, now), headers=MODEL_HEADERS, interactive=False, label="Models")
    with gr.Row():
        pick = gr.Dropdown(choices=[m.key for m in snap.models], label="Model", scale=2, allow_custom_value=False)
        down = gr.Button("Move down one tier", scale=1)
        to_disk = gr.Button("Release to disk", scale=1)
        all_down = gr.Button("Move all idle models down", scale=1)
    return locals()


def _build_cap(snap: Any, gpu: bool) -> dict[str, Any]:
    """The VRAM cap (only with a GPU: without one there is nothing to cap) and the memory plot."""
    with gr.Row(visible=gpu):
        top = max(1.0, round(snap.card.total_bytes / GB if snap.card else 48.0, 1))
        cap_now = min(top, snap.vram_cap_bytes / GB if snap.vram_cap_bytes else top)
        cap = gr.Slider(0.5, top, value=cap_now, step=0.1, label="VRAM cap (GB)", scale=3)
        no_cap = gr.Checkbox(value=snap.vram_cap_bytes is None, label="no cap", scale=1)
        apply = gr.Button("Apply cap", variant="primary", scale=1)
    host = gr.Markdown("", visible=not gpu)
    label = "GPU memory (last 5 minutes)" if gpu else "RAM (last 5 minutes): this machine has no GPU"
    plot = gr.LinePlot(None, x="seconds", y="GB", color="series", label=label, height=260)
    return locals()


def tick(ctx: StudioContext, current: str | None, points: list):
    s, now = ctx.residency.snapshot(), time.time()
    keys = [m.key for m in s.models]
    if has_gpu(s):
        host, frame = gr.skip(), timeline_frame(s, now)
    else:
        r = host_reading()
        points = [*[p for p in points if now - p[0] <= TIMELINE_S], (now, r["ram_used"], r["studio_rss"])]
        host, frame = host_markdown(r), host_frame(points, now)
    return (
        card_markdown(s),
        waiting_markdown(s, now),
        model_rows(s, now),
        gr.update(choices=keys, value=current if current in keys else None),
        host,
        None if frame.empty else frame,
        stats_markdown(s),
        switch_rows(s),
        process_rows(s),
        event_rows(s),
        points,
    )


def build(ctx: StudioContext) -> None:
    snap, now = ctx.residency.snapshot(), time.time()
    gpu = has_gpu(snap)
    gr.Markdown(
        "## GPU\nThe residency manager keeps models on the GPU, in pinned RAM (fast to bring back) or on disk. "
        "A model in use is never moved; the others make room as needed, cheapest to bring back first."
        + ("" if gpu else " **No GPU here:** models run on the CPU; RAM and CPU use are shown instead.")
    )
    card = gr.Markdown(card_markdown(snap))
    waiting = gr.Markdown("")
    m = _build_models(snap, now)
    c = _build_cap(snap, gpu)
    status = gr.Markdown("")
    stats = gr.Markdown("")
    with gr.Row():
        switches = gr.Dataframe(headers=SWITCH_HEADERS, interactive=False, label="Switch times", scale=1)
        processes = gr.Dataframe(headers=PROCESS_HEADERS, interactive=False, label="Programs on the card", scale=1,
                                 visible=gpu)  # fmt: skip
    events = gr.Dataframe(headers=EVENT_HEADERS, interactive=False, label="Recent events")
    points = gr.State([])  # RAM readings of this page (no GPU), bounded to the plotted window

    pick = m["pick"]
    outputs = [card, waiting, m["models"], pick, c["host"], c["plot"], stats, switches, processes, events, points]
    timer = gr.Timer(REFRESH_S)
    timer.tick(lambda cur, pts: tick(ctx, cur, pts), [pick, points], outputs, show_progress="hidden", queue=False)
    m["down"].click(lambda k: move_down(ctx, k), pick, status)
    m["to_disk"].click(lambda k: move_down(ctx, k, to_disk=True), pick, status)
    m["all_down"].click(lambda: move_all_down(ctx), None, status)
    c["apply"].click(lambda gb, nc: apply_vram_cap(ctx, gb, nc), [c["cap"], c["no_cap"]], status)
    build_planner(ctx)


TAB = Tab("GPU", build)
