"""The mixed trace of the residency benchmark: the trace itself, the strategies that serve it (our manager with
GDSF or LRU eviction, unload-after-use, naive `.to()` moves), another program on the card, and the summary."""

from __future__ import annotations

import logging
import random
import statistics
import subprocess
import sys
import time
from collections import OrderedDict
from typing import Any

import torch

from studio.residency import ResidencyError, ResidencyManager
from studio.residency.accel import is_oom_error
from studio.residency.pinned import naive_move
from studio.units import quantile

log = logging.getLogger("studio.bench.residency")
UNLOAD_SAMPLES = 4  # requests per family timed under unload-after-use; its total is projected from them


NEIGHBOUR = """
import sys, torch
torch.cuda.init(); torch.empty(1, device="cuda")  # a CUDA context, like a desktop compositor
print("ready", flush=True)
x = None
for line in sys.stdin:
    x = torch.empty(int(line), dtype=torch.uint8, device="cuda") if int(line) else None
    torch.cuda.synchronize(); torch.cuda.empty_cache()
    print("ok", flush=True)
"""


class Neighbour:
    """Another program on the card (a browser playing video, a game): a real second CUDA process on the GPU, a
    FakeProbe entry on the simulated card."""

    def __init__(self, env: Any) -> None:
        self.env, self.proc = env, None
        if env.cuda:
            self.proc = subprocess.Popen([sys.executable, "-c", NEIGHBOUR], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True)  # fmt: skip

    def wait_ready(self) -> bool:
        if self.proc is not None and self.proc.stdout.readline().strip() != "ready":
            log.error("the neighbour process did not start (exit code %s); the trace runs without it", self.proc.poll())
            self.proc = None
            return False
        return True

    def take(self, nbytes: int) -> None:
        if self.proc is None and not self.env.cuda:
            probe = self.env.fake_probe
            probe.set_process(4242, "browser", nbytes) if nbytes else probe.remove_process(4242)
            return
        if self.proc is None:
            return
        try:
            self.proc.stdin.write(f"{nbytes}\n")
            self.proc.stdin.flush()
            if self.proc.stdout.readline().strip() != "ok":
                raise RuntimeError("no answer")
        except (OSError, RuntimeError) as e:
            log.error("the neighbour process failed (%s); continuing without it", e)
            self.proc = None

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
            self.proc = None


# ---- (b) the mixed trace ----------------------------------------------------------------------------------------
def make_trace(n: int, seed: int, names: list[str]) -> list[str]:
    """Bursts of chat, each followed by an image (sometimes 2-3), a detection run (1-4) or a transcription."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        out += ["llm"] * rng.randint(3, 8)
        r = rng.random()
        out += (
            ["sd"] * rng.choice([1, 1, 2, 3])
            if r < 0.4
            else ["yolo"] * rng.choice([1, 2, 4])
            if r < 0.75
            else ["whisper"]
        )
    return [k for k in out if k in names][:n]


def _neighbour_step(neighbour: Neighbour | None, i: int, window: tuple[int, int, int]) -> None:
    """Another program takes `window[2]` bytes for requests window[0]..window[1]-1, then leaves."""
    if neighbour is not None and i in (window[0], window[1]):
        neighbour.take(window[2] if i == window[0] else 0)


def run_managed(env: Any, strategy: str, families: dict, loaders: dict, trace: list[str], budget_s: float,
                neighbour: Neighbour | None = None, window: tuple[int, int, int] = (-1, -1, 0)) -> dict:  # fmt: skip
    m = env.manager("lru" if strategy == "lru" else "gds", monitor=True)
    for loader in loaders.values():
        m.register(loader)
    rows, failures, stop = [], [], time.monotonic() + budget_s
    per_key = dict.fromkeys(families, 0)
    try:
        for i, key in enumerate(trace):
            if time.monotonic() > stop:
                break
            _neighbour_step(neighbour, i, window)
            if strategy == "unload" and per_key[key] >= UNLOAD_SAMPLES:
                continue  # every unload request is a cold load + run + release: a few per family suffice
            per_key[key] += 1
            rows.append(_managed_request(env, m, strategy, families[key], key, failures))
    finally:
        _neighbour_step(neighbour, window[1], window)
    snap = m.snapshot()
    m.close()
    m.offload(None, to="disk")
    out = _summary(rows, trace, families, failures)
    out.update(counters=snap.metrics.counters, switches={s.kind: vars(s) for s in snap.metrics.switches})
    out["events"] = [vars(e) for e in snap.events if e.kind in ("pressure", "oom", "oom_retry", "cpu_fallback")]
    return out


def _managed_request(env: Any, m: ResidencyManager, strategy: str, fam: Any, key: str, failures: list) -> dict:
    ready: list[float] = []
    before = m._records[key].tier
    t0 = time.perf_counter()

    def fn(model: Any) -> None:
        ready.append(time.perf_counter())
        fam.request(model)
        env.sync()

    try:
        m.run(key, fn, working_bytes=fam.working_hint)
    except ResidencyError as e:
        failures.append(str(e)[:300])
    done = time.perf_counter()
    if strategy == "unload":
        m.offload(key, to="disk")
    end = time.perf_counter()
    return {"key": key, "from": before, "switch_s": (ready[0] - t0) if ready else None,
            "compute_s": done - ready[-1] if ready else None, "unload_s": end - done, "total_s": end - t0}  # fmt: skip


class NaiveCache:
    """The plain way: an LRU cache of models; moves are `model.to("cpu")` / `model.to("cuda")` (pageable memory)."""

    def __init__(self, env: Any, loaders: dict, capacity: Any) -> None:
        self.env, self.loaders, self.capacity = env, loaders, capacity  # capacity(): the live budget, as ours
        self.objs: dict[str, Any] = {}
        self.on_gpu: OrderedDict[str, int] = OrderedDict()
        self.swap_in: dict[str, list[float]] = {}
        self.swap_out: dict[str, list[float]] = {}
        self.ooms = 0

    def acquire(self, key: str, need: int) -> Any:
        if key in self.on_gpu:
            self.on_gpu.move_to_end(key)
            return self.objs[key]
        size = self.loaders[key].nbytes
        capacity = self.capacity()
        while self.on_gpu and sum(self.on_gpu.values()) + size + need > capacity:
            self._evict(next(iter(self.on_gpu)))
        t0 = time.perf_counter()
        if key not in self.objs:
            self.objs[key] = self.loaders[key].load(self.env.device)
        else:
            naive_move(self.objs[key], self.env.device)
            self.env.sync()
            self.swap_in.setdefault(key, []).append(time.perf_counter() - t0)
        self.on_gpu[key] = size
        return self.objs[key]

    def _evict(self, key: str) -> None:
        t0 = time.perf_counter()
        naive_move(self.objs[key], "cpu")
        self.env.sync()
        self.swap_out.setdefault(key, []).append(time.perf_counter() - t0)
        del self.on_gpu[key]

    def run(self, key: str, fam: Any, ready: list[float]) -> None:
        for attempt in (0, 1):
            try:
                obj = self.acquire(key, fam.working_hint)
                ready.append(time.perf_counter())
                fam.request(obj)
                self.env.sync()
                return
            except Exception as e:
                if not is_oom_error(e) or attempt:
                    raise
                self.ooms += 1
                for other in [k for k in self.on_gpu if k != key]:
                    self._evict(other)
                if self.env.cuda:
                    torch.cuda.empty_cache()


def run_naive(env: Any, families: dict, loaders: dict, trace: list[str], budget_s: float,
              neighbour: Neighbour | None = None, window: tuple[int, int, int] = (-1, -1, 0)) -> dict:  # fmt: skip
    budget = env.manager()  # only reads the card: the same live budget as our manager's
    cache = NaiveCache(env, loaders, budget.capacity_bytes)
    rows, failures, stop = [], [], time.monotonic() + budget_s
    try:
        for i, key in enumerate(trace):
            if time.monotonic() > stop:
                break
            _neighbour_step(neighbour, i, window)
            before = "gpu" if key in cache.on_gpu else ("ram" if key in cache.objs else "disk")
            ready: list[float] = []
            t0 = time.perf_counter()
            try:
                cache.run(key, families[key], ready)
            except Exception as e:
                if not is_oom_error(e):
                    raise
                failures.append(str(e)[:300])
            end = time.perf_counter()
            rows.append({"key": key, "from": before, "switch_s": ready[0] - t0 if ready else None,
                         "compute_s": end - ready[-1] if ready else None, "unload_s": 0.0, "total_s": end - t0})  # fmt: skip
    finally:
        _neighbour_step(neighbour, window[1], window)
    out = _summary(rows, trace, families, failures)
    out.update(oom_retries=cache.ooms, swap_in=cache.swap_in, swap_out=cache.swap_out)
    cache.objs.clear()
    if env.cuda:
        torch.cuda.empty_cache()
    return out


def _summary(rows: list[dict], trace: list[str], families: dict, failures: list[str]) -> dict:
    total = sum(r["total_s"] for r in rows)
    per_family = {}
    for k in families:
        done = [r["total_s"] for r in rows if r["key"] == k]
        per_family[k] = {
            "done": len(done),
            "in_trace": trace.count(k),
            "mean_s": statistics.mean(done) if done else None,
        }
    complete = len(rows) == len(trace)
    projected = total
    if not complete:
        means = [f["mean_s"] for f in per_family.values() if f["in_trace"]]
        projected = (
            None if None in means else sum(f["mean_s"] * f["in_trace"] for f in per_family.values() if f["in_trace"])
        )
    switches = [r["switch_s"] for r in rows if r["switch_s"] is not None]
    moves = [r["switch_s"] for r in rows if r["switch_s"] is not None and r["from"] != "gpu"]
    swaps = [r["switch_s"] for r in rows if r["switch_s"] is not None and r["from"] == "ram"]
    return {
        "requests_done": len(rows), "requests": len(trace), "complete": complete, "total_s": total,
        "projected_total_s": projected, "switch_p50_s": quantile(switches, 0.5), "switch_p95_s": quantile(switches, 0.95),
        "moves": len(moves), "move_mean_s": statistics.mean(moves) if moves else None,
        "move_p50_s": quantile(moves, 0.5), "move_p95_s": quantile(moves, 0.95),
        "swaps_from_ram": len(swaps), "swap_mean_s": statistics.mean(swaps) if swaps else None,
        "swap_p50_s": quantile(swaps, 0.5), "swap_p95_s": quantile(swaps, 0.95),
        "failures": failures, "per_family": per_family, "rows": rows,
    }  # fmt: skip
