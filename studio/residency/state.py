"""Bookkeeping of the residency manager: one record per model, metrics, the event log and the snapshot views
that the GPU tab reads. No policy here (see eviction.py and planner.py)."""

from __future__ import annotations

import contextvars
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from studio.residency.eviction import Candidate, decayed
from studio.residency.pinned import PinnedPool
from studio.residency.probes import CardReading
from studio.units import quantile

MiB = 2**20


class Tier(StrEnum):
    GPU = "gpu"
    RAM = "ram"  # pinned host memory (the only compute tier on a machine without a GPU)
    DISK = "disk"


class Moving(StrEnum):
    UP = "up"
    DOWN = "down"
    TO_CPU = "to cpu"


GPU, RAM, DISK = Tier.GPU, Tier.RAM, Tier.DISK
OOM_FLOOR_LEASES = 4  # successful measured leases after which an out-of-memory floor is forgotten

# Lease ownership: a token per lease, remembered in the caller's context (not its thread: Gradio steps a generator
# on any worker thread). A request that holds leases and asks for a model that only its own leases keep out is told
# so at once instead of waiting for itself; any thread may end any lease.
_tokens = itertools.count(1)
_held: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("residency_held", default=frozenset())


def new_token() -> int:
    return next(_tokens)


def held_tokens() -> frozenset[int]:
    return _held.get()


def hold(token: int) -> None:
    _held.set(_held.get() | {token})


def unhold(token: int) -> None:
    """Forget a token in the current context (harmless where it was never held: a generator closed elsewhere)."""
    _held.set(_held.get() - {token})


@dataclass
class ModelRecord:
    key: str
    loader: Any
    estimate: int
    custom: bool  # the loader moves the object itself (Loader.to_device), e.g. CTranslate2
    obj: Any = None
    tier: Tier = DISK
    device: str | None = None
    bytes: int = 0  # measured footprint of the weights (0 until first loaded)
    pool: PinnedPool | None = None
    leases: int = 0
    owners: list[int] = field(default_factory=list)  # tokens of the leases held on it
    moving: Moving | None = None
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
    oom_floor_left: int = 0  # measured leases until the floor is forgotten (it must not only ever grow)
    generation: int = 0  # bumped each time the weights move (CUDA graphs must be re-captured)
    cpu_fallback: bool = False
    gpu_only: bool = False  # 4-bit bitsandbytes weights: the CPU path is minutes per answer and repacks them in place
    parked_by: Any = None  # the training lease that parked these weights with its own state (see preempt.py)
    streamable: bool = False  # its loader can run it partly resident, the rest streamed (Loader.load_partial)
    streamed_host_bytes: int = 0  # when partly resident: its streamed layers' host pools (0: wholly on one tier)

    def size(self) -> int:
        return self.bytes or self.estimate

    def working_need(self, hint: int | None) -> int:
        """Bytes of working memory to set aside for a lease: the caller's hint, the largest peak measured over
        the last leases, and what an out-of-memory retry needed; a guess (10% of the weights) before either."""
        measured = max(self.working_peaks, default=None)
        if hint is None and measured is None:
            return max(32 * MiB, self.size() // 10, self.oom_floor)
        return max(hint or 0, measured or 0, self.oom_floor)

    def record_peak(self, peak: int) -> None:
        """A trustworthy working-memory peak of a finished lease; enough of them retire an out-of-memory floor."""
        self.working_peaks.append(peak)
        if self.oom_floor and peak < self.oom_floor:
            self.oom_floor_left -= 1
            if self.oom_floor_left <= 0:
                self.oom_floor = 0

    def raise_floor(self, need: int) -> None:
        self.oom_floor = max(self.oom_floor, need)
        self.oom_floor_left = OOM_FLOOR_LEASES

    def ram_bytes(self) -> int:
        if self.pool is not None:
            return self.pool.nbytes + self.streamed_host_bytes
        return self.size() if self.tier == RAM else self.streamed_host_bytes

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
    token: int
    alone: bool = False  # no other lease or move overlapped it: its peak measurement is trustworthy
    moves_at_start: int = 0  # the manager's move counter when it was granted
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
    "training_pauses",
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
    streamed_bytes: int  # layers kept in host memory and streamed to the GPU per use (a model larger than the card)
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
class TrainingView:
    key: str
    label: str
    state: str  # running, pausing, paused, resuming
    status: str  # "running", "paused for Chat, 3 s", ...
    gpu_bytes: int
    working_bytes: int
    steps: int
    pauses: int
    paused_s: float
    metrics: dict[str, Any]


def training_view(t: Any) -> TrainingView:
    return TrainingView(
        t.key, t.label, t.state.value, t.status(), t.gpu_bytes(), t.working, t.steps, t.pauses, t.paused_s,
        dict(t.metrics),
    )  # fmt: skip


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
    trainings: list[TrainingView] = field(default_factory=list)


def model_view(r: ModelRecord) -> ModelView:
    pool = r.pool  # read once: the manager replaces it under its lock, never clears it under a reader
    if r.moving:
        state = f"moving {r.moving}"
    elif r.parked_by is not None:
        state = "parked by training"
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
        pinned_bytes=pool.nbytes if pool is not None and pool.pinned else 0,
        pool_bytes=pool.nbytes if pool is not None else 0,
        pool_reuses=pool.reuses if pool is not None else 0,
        streamed_bytes=r.streamed_host_bytes,
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
