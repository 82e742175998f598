"""Model residency: the one place that moves models between GPU, pinned CPU RAM and disk.

Backends register a `Loader` per model key and take leases:

    residency.register(loader)
    with residency.use("llm:<id>", working_bytes=...) as model: ...   # never evicted while held
    residency.run("llm:<id>", fn)                                    # lease + one retry after CUDA OOM
    with residency.training(key, modules=[m], optimizers=[opt]) as lease: ...   # preemptible (training.py)

Composition: decisions are pure functions (planner.py), tensors are moved by the mover (mover.py, no lock), plans
are carried out and committed by the executor (execute.py) and training leases are coordinated by preempt.py; this
class holds the only lock and publishes snapshots. Eviction policy: eviction.py. Records and views: state.py.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

from studio.planner import VramPlanner
from studio.residency import planner
from studio.residency.accel import Accelerator, CpuAccelerator, CudaAccelerator, configure_allocator
from studio.residency.eviction import GreedyDualSize, LeastRecentlyUsed
from studio.residency.execute import Executor
from studio.residency.leasing import _OOM, Leasing
from studio.residency.mover import Mover
from studio.residency.planner import GPU, RAM, ResidencyError, World
from studio.residency.preempt import Preemption
from studio.residency.probes import CardReading, ContextGauge, GiB, MemoryProbe, NoGpuProbe, detect_probe
from studio.residency.state import (
    DISK,
    Event,
    Lease,
    Metrics,
    ModelRecord,
    Snapshot,
    TimelinePoint,
    WaitingView,
    hold,
    model_view,
    training_view,
    unhold,
)
from studio.residency.training import TrainingLease
from studio.units import fmt_bytes

__all__ = ["Loader", "ResidencyError", "ResidencyManager", "Snapshot"]

log = logging.getLogger("studio.residency")
T = TypeVar("T")


class Loader(Protocol):
    """Supplied by a backend, one per model key ("llm:<id>", "asr:tiny.en", ...).

    Optional: `to_device(obj, device) -> obj` for objects that are not torch modules (CTranslate2:
    `unload_model(to_cpu=True)` / `load_model()`); torch objects are moved by the manager itself.
    Optional: `load_partial(device, room_bytes, accel) -> (model, streamer)` (and `can_stream() -> bool`) for a
    model that may run larger than the budget: the manager calls it when the whole model can never fit, after moving
    every idle model off the card; the loader keeps what fits in `room_bytes` on the device and the rest in host
    pools streamed per use (`studio.residency.stream.LayerStreamer`, whose `owns(t)` names the tensors it keeps).
    Such a model is never swapped to RAM: it goes to disk and loads partly again.
    Optional: `on_evict(obj)`, called before the idle model is swapped off the GPU, to drop device memory the
    backend keeps beside it between leases (Chat's static KV cache and CUDA graph), which the manager does not count.
    """

    key: str

    def estimate_bytes(self) -> int: ...
    def load(self, device: str) -> Any: ...
    def release(self, obj: Any) -> None: ...


def _asks(loader: Any, name: str) -> bool:
    """An optional yes/no of a loader (absent: yes); a loader that fails to answer says no."""
    fn = getattr(loader, name, None)
    if fn is None:
        return True
    try:
        return bool(fn())
    except Exception as e:
        log.warning("%s: %s() failed (%s); taking it as no", loader.key, name, e)
        return False


class ResidencyManager:
    """Decides which models live on the GPU, in pinned RAM or on disk, from live readings.

    Budget: capacity = min(card total - other processes, VRAM cap) - reserve - our CUDA context. Models on the
    GPU plus the working memory set aside for current leases (and running training leases) must fit in it; other
    processes starting or growing shrink it live (idle models move down until the reserve is back, see `maintain`).
    Footprints are measured: weights at load (bytes of the tensors on the device; NVML delta for frameworks with
    their own mover) and peak working memory per lease (torch peak stats reset per lease, kept only when no other
    lease or move overlapped). A lease sets aside max(caller's hint, recent measured peaks, what an OOM needed; that
    floor is retired after a few leases measured below it).
    Eviction: GreedyDual-Size-Frequency on measured reload cost per byte (eviction.py). Leased models are never
    evicted; a request that cannot be placed while others hold leases waits (up to `wait_timeout_s`, shown as
    "waiting for GPU: <model>, held by <lease>"), training leases give way at their next step, and beyond
    `max_waiting` queued requests it is refused as busy. A model larger than the whole budget runs on the CPU with
    a warning. Out of memory while placing or running: idle models move off, the allocator's cache is emptied and it
    is retried; while other leases hold memory it waits for them; it fails (with bytes) only when it cannot fit with
    every other lease ended.
    Concurrency: one lock and one condition variable; moves run outside the lock, one at a time (the "mover"), on
    records marked `moving`, so snapshots and hits never wait for a 7-second load. Leases are owned by tokens, not
    threads: any thread may end any lease.
    Assumptions: one process owns the studio's models; working memory is freed when a lease ends; the host has
    the RAM cap's worth of memory to pin.
    """

    def __init__(
        self,
        device: str | None = None,
        *,
        probe: MemoryProbe | None = None,
        accelerator: Accelerator | None = None,
        vram_cap_bytes: int | None = None,
        ram_cap_bytes: int | None = None,
        reserve_bytes: int = int(0.8 * GiB),
        keep_alive_s: float | None = None,
        wait_timeout_s: float = 60.0,
        max_waiting: int = 8,
        policy: str = "gds",
        free_wait_s: float = 2.0,
    ) -> None:
        if accelerator is None:
            accelerator = CudaAccelerator() if device and device.startswith("cuda") else CpuAccelerator()
        self._accel = accelerator
        self._context = ContextGauge()
        self._probe = probe if probe is not None else (detect_probe() if accelerator.has_gpu_tier else NoGpuProbe())
        self.vram_cap_bytes, self.reserve_bytes = vram_cap_bytes, int(reserve_bytes)
        self.ram_cap_bytes = ram_cap_bytes or planner.default_ram_cap(accelerator.has_gpu_tier)
        self.keep_alive_s, self.wait_timeout_s, self.max_waiting = keep_alive_s, wait_timeout_s, max_waiting
        self.free_wait_s = free_wait_s
        self._policy = {"gds": GreedyDualSize, "lru": LeastRecentlyUsed}[policy]()
        self._records: dict[str, ModelRecord] = {}
        self._leases: list[Lease] = []
        self._waiting: list[WaitingView] = []
        self._cond = threading.Condition(threading.Lock())
        self._mover_busy = False
        self._moves = 0  # plans begun: a lease whose span saw a move does not trust its peak measurement
        self._releases = 0  # leases ended (a request that ran out of memory waits for this to move)
        self.metrics = Metrics()
        self._events: deque[Event] = deque(maxlen=300)
        self._timeline: deque[TimelinePoint] = deque(maxlen=600)
        self._reading: CardReading | None = None
        self._reading_t = 0.0  # monotonic time of the last reading
        self._probe_failed = False
        self._monitor: threading.Thread | None = None
        self._stop = threading.Event()
        self._mover = Mover(accelerator, self._used_now)
        self._exec = Executor(self)
        self._preempt = Preemption(self)
        self._desk = Leasing(self)
        self.vram = VramPlanner()  # learns from this manager's measurements; advice on out-of-memory errors

    @classmethod
    def from_settings(cls, settings: Any, *, monitor_interval_s: float = 1.0) -> ResidencyManager:
        """The manager for this machine: CUDA if torch sees a GPU (NVML, else torch readings), else CPU only."""
        configure_allocator()  # before torch initialises CUDA: expandable segments against fragmentation
        import torch

        gb = lambda v: None if v is None else int(v * GiB)  # noqa: E731
        manager = cls(
            "cuda" if torch.cuda.is_available() else "cpu",
            vram_cap_bytes=gb(settings.vram_cap_gb),
            ram_cap_bytes=gb(settings.ram_cap_gb),
            reserve_bytes=gb(settings.reserve_gb),
            keep_alive_s=settings.keep_alive_s,
        )
        manager.vram = VramPlanner.at(settings.data_dir)  # measured footprints persist under the data dir
        if manager._accel.has_gpu_tier or manager.keep_alive_s:
            manager.start_monitor(monitor_interval_s)
        return manager

    # ---- public API --------------------------------------------------------------------------------------------
    @property
    def device(self) -> str:
        """Compute device of models on the GPU tier ("cuda" or "cpu"); read a leased model's own device instead."""
        return self._accel.device

    def register(self, loader: Loader) -> None:
        with self._cond:
            old = self._records.get(loader.key)
            if old is not None and old.loader is loader:
                return
            if old is not None and (old.leases or old.moving):
                raise ResidencyError(f"{loader.key} is in use; cannot replace its loader now")
            try:
                estimate = int(loader.estimate_bytes())
            except Exception as e:
                log.warning("%s: estimate_bytes() failed (%s); assuming 1 GB until measured", loader.key, e)
                estimate = GiB
            custom = callable(getattr(loader, "to_device", None))
            rec = ModelRecord(loader.key, loader, max(0, estimate), custom)
            rec.streamable = callable(getattr(loader, "load_partial", None)) and _asks(loader, "can_stream")
            self._records[loader.key] = rec
        if old is not None and old.obj is not None:
            self._drop(old)

    def is_resident(self, key: str) -> bool:
        """On the GPU and not moving now: a hint read without the lock (a lease decides under it)."""
        return self._desk._resident(key)

    def is_registered(self, key: str) -> bool:
        with self._cond:
            return key in self._records

    def unregister(self, key: str) -> None:
        with self._cond:
            rec = self._records.get(key)
            if rec is None:
                return
            while rec.moving:  # a load finishing now may grant a lease on it: check the leases after
                self._cond.wait(0.1)
            if rec.leases:
                raise ResidencyError(f"{key} is in use ({rec.leases} lease(s)); unregister it when they end")
            del self._records[key]
        self._drop(rec)

    @contextlib.contextmanager
    def use(self, key: str, *, working_bytes: int | None = None) -> Iterator[Any]:
        lease = self._desk.acquire(key, working_bytes)
        hold(lease.token)
        try:
            yield lease.record.obj
        finally:
            unhold(lease.token)
            self._desk.release(lease)

    def training(
        self,
        key: str,
        *,
        modules: Sequence[Any],
        optimizers: Sequence[Any] = (),
        working_bytes: int | None = None,
        label: str = "",
    ) -> TrainingLease:
        """A preemptible training lease (training.py): `with manager.training(...) as lease:` then
        `with lease.step(): ...` per step. It gives way at a step boundary to an interactive request that waits for
        its memory, and comes back by itself; results do not change. A no-op without a GPU tier."""
        from studio.jobs import current_job

        return TrainingLease(self, key, modules, optimizers, working_bytes, label, job=current_job())

    def run(self, key: str, fn: Callable[[Any], T], *, working_bytes: int | None = None) -> T:
        """`fn(model)` under a lease. After an out-of-memory error: idle models off, cache emptied, one retry; if
        other leases were running it waits for them (bounded) and tries once more before failing with bytes."""
        failure = self._desk.try_run(key, fn, working_bytes)
        if not isinstance(failure, _OOM):
            return failure
        self.metrics.add("oom_retries")
        self._event("oom_retry", key, failure.tried or 0, detail=failure.message[:200])
        log.warning("Out of memory running %s (tried to allocate %s); evicting every idle model and retrying once",
                    key, fmt_bytes(failure.tried))  # fmt: skip
        with self._cond:
            rec = self._records[key]
            rec.raise_floor(rec.working_need(working_bytes) + (failure.tried or 0))
        for _ in range(2):
            self.offload(None, exclude={key}, tiers=(GPU,))
            gc.collect()  # the failed attempt's activations may sit in reference cycles
            self._accel.empty_cache()
            second = self._desk.try_run(key, fn, working_bytes)
            if not isinstance(second, _OOM):
                return second
            if not self._desk.wait_for_others(key):
                break
        self.metrics.add("oom_failures")
        raise ResidencyError(self._desk.oom_message(key, second, working_bytes))

    def offload(
        self, key: str | None = None, *, to: str | None = None, exclude: set[str] | None = None, tiers=(GPU, RAM)
    ) -> list[str]:
        """Move one idle model (or all idle ones) one tier down, or straight `to="disk"`. Leased models stay; the
        RAM cap holds (models whose pools would not fit go to disk)."""
        reading = self._read()
        with self._cond:
            while self._mover_busy:
                self._cond.wait(0.1)
            tiers = tiers if to != "ram" else (GPU,)
            plan = planner.plan_offload(self._world(reading), key, to_disk=to == DISK, exclude=exclude or set(),
                                        tiers=tiers)  # fmt: skip
            if plan.empty():
                return []
            self._exec.begin(plan)
        self._exec.run(plan, up=False, give_back=True)
        return [r.key for r in plan.records()]

    def set_caps(self, vram_bytes: int | None, ram_bytes: int | None) -> None:
        """Apply new caps live (None: no VRAM cap / the default RAM cap); models over a cap move down at once."""
        if (vram_bytes is not None and vram_bytes <= 0) or (ram_bytes is not None and ram_bytes <= 0):
            raise ValueError(f"caps must be positive bytes or None, got vram={vram_bytes} ram={ram_bytes}")
        with self._cond:
            self.vram_cap_bytes = vram_bytes
            self.ram_cap_bytes = ram_bytes or planner.default_ram_cap(self._accel.has_gpu_tier)
            self._event("caps", "", vram_bytes or 0, detail=f"vram={fmt_bytes(vram_bytes)} ram={fmt_bytes(ram_bytes)}")
            self._cond.notify_all()
        self.maintain()

    def capacity_bytes(self) -> int:
        """What the studio's models may occupy on the GPU right now (live budget; 0 without a GPU)."""
        reading = self._read()
        with self._cond:
            return self._budget(reading).capacity

    def generation(self, key: str) -> int:
        """Bumped every time the model's weights move: anything that captured their addresses must redo it."""
        with self._cond:
            return self._records[key].generation

    def snapshot(self) -> Snapshot:
        reading = self._read()
        with self._cond:
            b = self._budget(reading)
            self._timeline_point(force=False)
            return Snapshot(
                device=self.device,
                accelerator=self._accel.kind,
                probe=self._probe.name,
                policy=self._policy.name,
                card=reading,
                capacity_bytes=b.capacity,
                in_use_bytes=self._gpu_in_use(),
                others_bytes=b.others,
                vram_cap_bytes=self.vram_cap_bytes,
                reserve_bytes=self.reserve_bytes,
                ram_cap_bytes=self.ram_cap_bytes,
                ram_used_bytes=self._ram_used(),
                models=[model_view(r) for r in self._records.values()],
                waiting=list(self._waiting),
                metrics=self.metrics.view(),
                events=list(self._events),
                timeline=list(self._timeline),
                trainings=[training_view(t) for t in self._preempt.leases],
            )

    def context_figures(self) -> dict[str, int | None]:
        """Our CUDA context as gauged (probes.ContextGauge), the largest single reading and the readings rejected."""
        g = self._context
        return {"context_bytes": g.value, "raw_max_bytes": g.raw_max, "rejected_readings": g.rejected}

    # ---- good neighbour --------------------------------------------------------------------------------------
    def maintain(self) -> list[str]:
        """Move idle models down when other processes or a lowered cap squeeze the budget, when they have been
        idle past keep-alive, or when RAM is over its cap. Called by the monitor thread about once a second."""
        reading = self._read()
        with self._cond:
            self._desk.sample(reading)
            if self._mover_busy:
                return []
            now = time.monotonic()
            plan, events = planner.plan_pressure(self._world(reading), self.keep_alive_s, lambda r: now - r.last_use)
            for kind, key, nbytes, detail in events:
                self._event(kind, key, nbytes, detail=detail)
                if kind == "pressure":
                    log.info("GPU budget exceeded by %s (other programs or a lower cap): moving %s down",
                             fmt_bytes(nbytes), key)  # fmt: skip
            cache = self._accel.reserved() - self._accel.allocated()
            if plan.empty():
                if reading is not None and reading.free_bytes < self.reserve_bytes and cache > 64 * 2**20:
                    self._event("trim_cache", "", cache, detail="card free below the reserve: cached blocks freed")
                    self._accel.empty_cache()  # our allocator's idle blocks are eating the reserve: give them back
                return []
            self._exec.begin(plan)
        self._exec.run(plan, up=False, give_back=True)
        return [r.key for r in plan.records()]

    def start_monitor(self, interval_s: float = 1.0) -> None:
        if self._monitor is not None:
            return

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.maintain()
                except Exception:
                    log.exception("residency monitor step failed")

        self._monitor = threading.Thread(target=loop, name="residency-monitor", daemon=True)
        self._monitor.start()

    def close(self) -> None:
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join(timeout=5)
            self._monitor = None

    # ---- readings, accounting, events (lock held unless said) --------------------------------------------------
    def _read(self) -> CardReading | None:
        """A fresh card reading (no lock needed; None without a GPU or when the probe fails)."""
        has_gpu = self._accel.has_gpu_tier
        try:
            before = self._accel.reserved() if has_gpu else 0
            reading = self._probe.read()
            self._context.observe(reading, os.getpid(), before, self._accel.reserved() if has_gpu else 0)
        except Exception as e:
            if not self._probe_failed:
                log.warning("GPU probe %s failed (%s); budgeting from the caps alone", self._probe.name, e)
                self._probe_failed = True
            reading = None
        self._reading, self._reading_t = reading, time.monotonic()
        return reading

    def _recent_reading(self, max_age_s: float) -> CardReading | None:
        """The last reading if it is younger than `max_age_s`, else a fresh one: a lease on a model already on the
        card need not pay an NVML read (~0.8 ms on the H200) when the card was read a moment ago."""
        reading = self._reading
        if reading is not None and time.monotonic() - self._reading_t < max_age_s:
            return reading
        return self._read()

    def _used_now(self) -> int | None:
        reading = self._read()
        return None if reading is None else reading.used_bytes

    def _budget(self, reading: CardReading | None) -> planner.Budget:
        has_gpu = self._accel.has_gpu_tier
        return planner.budget(
            reading, has_gpu=has_gpu, card_total=self._accel.total_bytes() if has_gpu else 0,
            reserved=self._accel.reserved(), vram_cap=self.vram_cap_bytes, reserve=self.reserve_bytes,
            context=self._context.value,
        )  # fmt: skip

    def _world(self, reading: CardReading | None) -> World:
        return World(
            records=list(self._records.values()),
            capacity=self._budget(reading).capacity,
            extra_gpu=sum(lease.working for lease in self._leases) + self._preempt.gpu_bytes(),
            has_gpu=self._accel.has_gpu_tier,
            ram_cap=self.ram_cap_bytes,
            extra_ram=self._preempt.ram_bytes(),
            policy=self._policy,
            now=time.monotonic(),
        )

    def _gpu_in_use(self) -> int:
        return self._world(self._reading).gpu_in_use()

    def _ram_used(self) -> int:
        return self._world(self._reading).ram_used()

    def _trim_pools_now(self) -> list[ModelRecord]:
        return planner.trim_pools(self._world(self._reading))

    def _event(self, kind: str, key: str, nbytes: int = 0, seconds: float = 0.0, detail: str = "") -> None:
        self._events.append(Event(time.time(), kind, key, int(nbytes), seconds, detail))

    def _timeline_point(self, force: bool) -> None:
        now = time.time()
        if not force and self._timeline and now - self._timeline[-1].time < 0.5:
            return
        reading = self._reading
        others = self._budget(reading).others
        per_model = {r.key: r.size() for r in self._records.values() if r.tier == GPU}
        self._timeline.append(TimelinePoint(now, per_model, others, reading.free_bytes if reading else None))

    def _make_room_now(self) -> None:
        """Move idle models down at once when the budget is exceeded (a training lease just started)."""
        self.maintain()

    def _drop(self, rec: ModelRecord) -> None:
        """Release a record that is no longer registered (or whose loader was replaced)."""
        was_gpu = rec.tier == GPU
        self._exec.to_disk(rec)
        if was_gpu:
            self._accel.empty_cache()
