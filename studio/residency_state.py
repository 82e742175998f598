"""Bookkeeping of the residency manager: one record per model, metrics, the event log and the snapshot views
that the GPU tab reads. No policy here (see studio/eviction.py and studio/residency.py)."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from studio.eviction import Candidate, decayed
from studio.gpu import CardReading
from studio.pinned import PinnedPool
from studio.units import quantile

GPU, RAM, DISK = "gpu", "ram", "disk"
MiB = 2**20


@dataclass
class ModelRecord:
    key: str
    loader: Any
    estimate: int
    custom: bool  # the loader moves the object itself (Loader.to_device), e.g. CTranslate2
    obj: Any = None
    tier: str = DISK
    device: str | None = None
    bytes: int = 0  # measured footprint of the weights (0 until first loaded)
    pool: PinnedPool | None = None
    leases: int = 0
    owners: list[int] = field(default_factory=list)  # thread ids holding leases
    moving: str | None = None
    uses: int = 0
    freq: float = 0.0
    last_use: float = 0.0  # monotonic
    last_use_wall: float | None = None
    base: float = 0.0  # policy inflation at the last use
    load_s: float | None = None  # disk -> its tier, measured
    swap_in_s: float | None = None  # RAM -> GPU, measured
    swap_out_s: float | None = None
    working_peaks: deque[int] = field(default_factory=lambda: deque(maxlen=8))
    oom_floor: int = 0  # working bytes a lease needed when it ran out of memory
    generation: int = 0  # bumped each time the weights move (CUDA graphs must be re-captured)
    cpu_fallback: bool = False

    def size(self) -> int:
        return self.bytes or self.estimate

    def working_need(self, hint: int | None) -> int:
        """Bytes of working memory to set aside for a lease: the caller's hint, the largest peak measured over
        the last leases, and what an out-of-memory retry needed; a guess (10% of the weights) before either."""
        measured = max(self.working_peaks, default=None)
        if hint is None and measured is None:
            return max(32 * MiB, self.size() // 10, self.oom_floor)
        return max(hint or 0, measured or 0, self.oom_floor)

    def ram_bytes(self) -> int:
        if self.pool is not None:
            return self.pool.nbytes
        return self.size() if self.tier == RAM else 0

    def touch(self, inflation: float) -> None:
        now = time.monotonic()
        self.freq = decayed(self.freq, now - self.last_use) + 1.0 if self.uses else 1.0
        self.last_use, self.last_use_wall, self.base = now, time.time(), inflation
        self.uses += 1

    def candidate(self, reload_s: float, nbytes: int | None = None) -> Candidate:
        return Candidate(
            self.key, self.size() if nbytes is None else nbytes, reload_s, self.freq, self.last_use, self.base
        )


@dataclass
class Lease:
    record: ModelRecord
    working: int
    thread: int
    alone: bool = False  # no other lease overlapped it: its peak measurement is trustworthy
    base_alloc: int = 0
    probe_base: int | None = None
    probe_max: int | None = None


@dataclass(frozen=True)
class Event:
    time: float
    kind: str  # load, evict, swap_in, release, oom, oom_retry, cpu_fallback, pressure, keep_alive, busy, timeout
    key: str
    bytes: int = 0
    seconds: float = 0.0
    detail: str = ""


@dataclass(frozen=True)
class SwitchStats:
    kind: str  # "ram->gpu", "disk->gpu", "gpu->ram", ...
    count: int
    p50_s: float
    p95_s: float
    mean_s: float


COUNTERS = (
    "hits",
    "misses",
    "loads",
    "evictions",
    "releases",
    "bytes_up",
    "bytes_down",
    "oom_retries",
    "oom_failures",
    "waits",
    "timeouts",
    "busy",
    "cpu_fallbacks",
)


class Metrics:
    def __init__(self) -> None:
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.switches: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def switch(self, kind: str, seconds: float) -> None:
        with self._lock:
            self.switches.setdefault(kind, deque(maxlen=2000)).append(seconds)

    def view(self) -> MetricsView:
        with self._lock:
            stats = tuple(
                SwitchStats(k, len(v), quantile(list(v), 0.5), quantile(list(v), 0.95), sum(v) / len(v))
                for k, v in sorted(self.switches.items())
                if v
            )
            return MetricsView(dict(self.counters), stats)


@dataclass(frozen=True)
class MetricsView:
    counters: dict[str, int]
    switches: tuple[SwitchStats, ...]

    @property
    def hit_rate(self) -> float:
        total = self.counters["hits"] + self.counters["misses"]
        return self.counters["hits"] / total if total else 0.0


@dataclass(frozen=True)
class ModelView:
    key: str
    tier: str
    device: str | None
    bytes: int
    estimate_bytes: int
    pinned_bytes: int  # host pool, when page-locked
    pool_bytes: int  # host pool (pinned or not) kept for this model's swaps
    pool_reuses: int
    leases: int
    state: str  # "idle", "in use", "moving up", "moving down", "on disk"
    uses: int
    last_use: float | None  # wall time
    working_peak: int | None
    load_s: float | None
    swap_in_s: float | None
    swap_out_s: float | None
    cpu_fallback: bool
    generation: int


@dataclass(frozen=True)
class WaitingView:
    key: str
    since: float  # wall time
    need_bytes: int
    reason: str


@dataclass(frozen=True)
class TimelinePoint:
    time: float
    gpu_bytes: dict[str, int]  # per model key
    others_bytes: int
    free_bytes: int | None


@dataclass(frozen=True)
class Snapshot:
    device: str
    accelerator: str
    probe: str
    policy: str
    card: CardReading | None
    capacity_bytes: int  # what the studio's models may occupy now (live budget)
    in_use_bytes: int  # weights on the GPU + working memory set aside for leases
    others_bytes: int  # other processes on the card
    vram_cap_bytes: int | None
    reserve_bytes: int
    ram_cap_bytes: int
    ram_used_bytes: int
    models: list[ModelView]
    waiting: list[WaitingView]
    metrics: MetricsView
    events: list[Event]
    timeline: list[TimelinePoint]


def model_view(r: ModelRecord) -> ModelView:
    if r.moving:
        state = f"moving {r.moving}"
    elif r.leases:
        state = "in use"
    else:
        state = "on disk" if r.tier == DISK else "idle"
    return ModelView(
        key=r.key,
        tier=r.tier,
        device=r.device,
        bytes=r.bytes,
        estimate_bytes=r.estimate,
        pinned_bytes=r.pool.nbytes if r.pool is not None and r.pool.pinned else 0,
        pool_bytes=r.pool.nbytes if r.pool is not None else 0,
        pool_reuses=r.pool.reuses if r.pool is not None else 0,
        leases=r.leases,
        state=state,
        uses=r.uses,
        last_use=r.last_use_wall,
        working_peak=max(r.working_peaks, default=None),
        load_s=r.load_s,
        swap_in_s=r.swap_in_s,
        swap_out_s=r.swap_out_s,
        cpu_fallback=r.cpu_fallback,
        generation=r.generation,
    )
