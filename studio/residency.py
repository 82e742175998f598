"""Model residency: the one place that moves models between GPU, pinned CPU RAM and disk.

Backends register a `Loader` per model key and take leases:

    residency.register(loader)
    with residency.use("llm:<id>", working_bytes=...) as model: ...   # never evicted while held
    residency.run("llm:<id>", fn)                                    # lease + one retry after CUDA OOM

Moves of torch models (nn.Module, ultralytics YOLO, diffusers pipelines, bitsandbytes 4-bit) are done here, with
per-model pools of pinned host buffers (studio/pinned.py); other frameworks give `Loader.to_device(obj, device)`.
Eviction policy: studio/eviction.py. Bookkeeping and snapshot views: studio/residency_state.py.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

from studio.accel import Accelerator, CpuAccelerator, CudaAccelerator
from studio.eviction import GreedyDualSize, LeastRecentlyUsed
from studio.gpu import CardReading, GiB, MemoryProbe, NoGpuProbe, detect_probe
from studio.residency_core import _OOM, Placement, ResidencyError, _default_ram_cap, _Plan
from studio.residency_moves import Moves
from studio.residency_state import (
    DISK,
    GPU,
    RAM,
    Event,
    Lease,
    Metrics,
    ModelRecord,
    Snapshot,
    TimelinePoint,
    WaitingView,
    model_view,
)
from studio.units import fmt_bytes

__all__ = ["Loader", "ResidencyError", "ResidencyManager", "Snapshot"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class Loader(Protocol):
    """Supplied by a backend, one per model key ("llm:<id>", "asr:tiny.en", ...).

    Optional: `to_device(obj, device) -> obj` for objects that are not torch modules (CTranslate2:
    `unload_model(to_cpu=True)` / `load_model()`); torch objects are moved by the manager itself.
    """

    key: str

    def estimate_bytes(self) -> int: ...
    def load(self, device: str) -> Any: ...
    def release(self, obj: Any) -> None: ...


class ResidencyManager(Placement, Moves):
    """Decides which models live on the GPU, in pinned RAM or on disk, from live readings.

    Budget: capacity = min(card total - other processes, VRAM cap) - reserve - our CUDA context. Models on the
    GPU plus the working memory set aside for current leases must fit in it; other processes starting or growing
    shrink it live (idle models move down until the reserve is back, see `maintain`).
    Footprints are measured: weights at load (bytes of the tensors on the device; NVML delta for frameworks with
    their own mover) and peak working memory per lease (torch peak stats reset per lease, kept only when no other
    lease overlapped). A lease sets aside max(caller's hint, recent measured peaks, what an OOM needed).
    Eviction: GreedyDual-Size-Frequency on measured reload cost per byte (studio/eviction.py). Leased models are
    never evicted; a request that cannot be placed while others hold leases waits (up to `wait_timeout_s`, shown as
    waiting in the snapshot), and beyond `max_waiting` queued requests it is refused as busy. A model larger than
    the whole budget runs on the CPU with a warning. `run` retries once after an out-of-memory error with every
    idle model evicted and the cache emptied.
    Concurrency: one lock and one condition variable; moves run outside the lock, one at a time (the "mover"),
    on records marked `moving`, so snapshots and hits never wait for a 7-second load.
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
        self._probe = probe if probe is not None else (detect_probe() if accelerator.has_gpu_tier else NoGpuProbe())
        self.vram_cap_bytes, self.reserve_bytes = vram_cap_bytes, int(reserve_bytes)
        self.ram_cap_bytes = ram_cap_bytes or _default_ram_cap(accelerator.has_gpu_tier)
        self.keep_alive_s, self.wait_timeout_s, self.max_waiting = keep_alive_s, wait_timeout_s, max_waiting
        self.free_wait_s = free_wait_s
        self._policy = {"gds": GreedyDualSize, "lru": LeastRecentlyUsed}[policy]()
        self._records: dict[str, ModelRecord] = {}
        self._leases: list[Lease] = []
        self._waiting: list[WaitingView] = []
        self._cond = threading.Condition(threading.Lock())
        self._mover_busy = False
        self.metrics = Metrics()
        self._events: deque[Event] = deque(maxlen=300)
        self._timeline: deque[TimelinePoint] = deque(maxlen=600)
        self._reading: CardReading | None = None
        self._probe_failed = False
        self._monitor: threading.Thread | None = None
        self._stop = threading.Event()

    @classmethod
    def from_settings(cls, settings: Any, *, monitor_interval_s: float = 1.0) -> ResidencyManager:
        """The manager for this machine: CUDA if torch sees a GPU (NVML, else torch readings), else CPU only."""
        import torch

        gb = lambda v: None if v is None else int(v * GiB)  # noqa: E731
        manager = cls(
            "cuda" if torch.cuda.is_available() else "cpu",
            vram_cap_bytes=gb(settings.vram_cap_gb),
            ram_cap_bytes=gb(settings.ram_cap_gb),
            reserve_bytes=gb(settings.reserve_gb),
            keep_alive_s=settings.keep_alive_s,
        )
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
            self._records[loader.key] = ModelRecord(loader.key, loader, max(0, estimate), custom)
        if old is not None and old.obj is not None:
            self._drop(old)

    def is_registered(self, key: str) -> bool:
        with self._cond:
            return key in self._records

    def unregister(self, key: str) -> None:
        with self._cond:
            rec = self._records.get(key)
            if rec is None:
                return
            if rec.leases:
                raise ResidencyError(f"{key} is in use ({rec.leases} lease(s)); unregister it when they end")
            while rec.moving:
                self._cond.wait(0.1)
            del self._records[key]
        self._drop(rec)

    @contextlib.contextmanager
    def use(self, key: str, *, working_bytes: int | None = None) -> Iterator[Any]:
        lease = self._acquire(key, working_bytes)
        try:
            yield lease.record.obj
        finally:
            self._release_lease(lease)

    def run(self, key: str, fn: Callable[[Any], T], *, working_bytes: int | None = None) -> T:
        failure = self._try_run(key, fn, working_bytes)
        if not isinstance(failure, _OOM):
            return failure
        self.metrics.add("oom_retries")
        self._event("oom_retry", key, failure.tried or 0, detail=failure.message[:200])
        log.warning(
            "Out of memory running %s (tried to allocate %s); evicting every idle model and retrying once",
            key,
            fmt_bytes(failure.tried),
        )
        with self._cond:
            rec = self._records[key]
            rec.oom_floor = max(rec.oom_floor, rec.working_need(working_bytes) + (failure.tried or 0))
        self.offload(None, exclude={key}, tiers=(GPU,))
        gc.collect()  # the failed attempt's activations may sit in reference cycles
        self._accel.empty_cache()
        second = self._try_run(key, fn, working_bytes)
        if not isinstance(second, _OOM):
            return second
        self.metrics.add("oom_failures")
        raise ResidencyError(self._oom_message(key, second, working_bytes))

    def offload(
        self, key: str | None = None, *, to: str | None = None, exclude: set[str] | None = None, tiers=(GPU, RAM)
    ) -> list[str]:
        """Move one idle model (or all idle ones) one tier down, or straight `to="disk"`. Leased models stay."""
        with self._cond:
            while self._mover_busy:
                self._cond.wait(0.1)
            plan = _Plan(None, "none")
            for r in self._records.values():
                if (key is not None and r.key != key) or r.leases or r.moving or r.key in (exclude or set()):
                    continue
                if r.tier == GPU and GPU in tiers:
                    plan.gpu_victims.append(r)
                    if to == DISK or not self._accel.has_gpu_tier:
                        plan.to_disk.add(r.key)
                elif r.tier == RAM and RAM in tiers and (to in (None, DISK)):
                    plan.ram_victims.append(r)
            if not plan.records():
                return []
            self._begin(plan)
        self._finish(plan, self._execute_down, give_back=True)
        return [r.key for r in plan.records()]

    def set_caps(self, vram_bytes: int | None, ram_bytes: int | None) -> None:
        """Apply new caps live (None: no VRAM cap / the default RAM cap); models over a cap move down at once."""
        if (vram_bytes is not None and vram_bytes <= 0) or (ram_bytes is not None and ram_bytes <= 0):
            raise ValueError(f"caps must be positive bytes or None, got vram={vram_bytes} ram={ram_bytes}")
        with self._cond:
            self.vram_cap_bytes = vram_bytes
            self.ram_cap_bytes = ram_bytes or _default_ram_cap(self._accel.has_gpu_tier)
            self._event("caps", "", vram_bytes or 0, detail=f"vram={fmt_bytes(vram_bytes)} ram={fmt_bytes(ram_bytes)}")
            self._cond.notify_all()
        self.maintain()

    def capacity_bytes(self) -> int:
        """What the studio's models may occupy on the GPU right now (live budget; 0 without a GPU)."""
        reading = self._read()
        with self._cond:
            return self._budget(reading)[0]

    def generation(self, key: str) -> int:
        """Bumped every time the model's weights move: anything that captured their addresses must redo it."""
        with self._cond:
            return self._records[key].generation

    def snapshot(self) -> Snapshot:
        reading = self._read()
        with self._cond:
            capacity, others, _ = self._budget(reading)
            self._timeline_point(force=False)
            return Snapshot(
                device=self.device,
                accelerator=self._accel.kind,
                probe=self._probe.name,
                policy=self._policy.name,
                card=reading,
                capacity_bytes=capacity,
                in_use_bytes=self._gpu_in_use(),
                others_bytes=others,
                vram_cap_bytes=self.vram_cap_bytes,
                reserve_bytes=self.reserve_bytes,
                ram_cap_bytes=self.ram_cap_bytes,
                ram_used_bytes=self._ram_used(),
                models=[model_view(r) for r in self._records.values()],
                waiting=list(self._waiting),
                metrics=self.metrics.view(),
                events=list(self._events),
                timeline=list(self._timeline),
            )

    # ---- good neighbour --------------------------------------------------------------------------------------
    def maintain(self) -> list[str]:
        """Move idle models down when other processes or a lowered cap squeeze the budget, when they have been
        idle past keep-alive, or when RAM is over its cap. Called by the monitor thread about once a second."""
        reading = self._read()
        with self._cond:
            self._sample_leases(reading)
            if self._mover_busy:
                return []
            plan = self._plan_maintenance(reading)
            cache = self._accel.reserved() - self._accel.allocated()
            if not plan.records():
                if reading is not None and reading.free_bytes < self.reserve_bytes and cache > 64 * 2**20:
                    self._event("trim_cache", "", cache, detail="card free below the reserve: cached blocks freed")
                    self._accel.empty_cache()  # our allocator's idle blocks are eating the reserve: give them back
                return []
            self._begin(plan)
        self._finish(plan, self._execute_down, give_back=True)
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
