"""Moving one model between tiers: the mover moves tensors and returns facts (bytes, seconds); it takes no lock and
writes no record. The manager calls it on records it marked `moving` (nobody else touches those) and commits the
facts under its lock.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from studio.residency.accel import Accelerator
from studio.residency.pinned import (
    PinnedPool,
    adopt,
    device_bytes,
    host_tensors,
    is_torch_model,
    move_down,
    upload,
    upload_pool,
)
from studio.residency.pinned import tensor_slots as _slots
from studio.residency.planner import Action
from studio.residency.state import GPU, RAM, ModelRecord, Tier

log = logging.getLogger("studio.residency")


@dataclass(frozen=True)
class MoveFacts:
    obj: Any
    pool: PinnedPool | None
    tier: Tier
    bytes: int  # resident in the destination tier
    copied: int  # bytes actually copied
    seconds: float
    kind: str  # "disk->gpu", "ram->gpu", "disk->ram", "gpu->ram", "gpu->disk", ...
    streamed: int = 0  # a partly resident load: bytes of the layers left in host pools, streamed per use


class Mover:
    def __init__(self, accel: Accelerator, used_now: Callable[[], int | None]) -> None:
        self.accel = accel
        self._used_now = used_now  # card-wide used bytes (for frameworks with their own mover)

    def bring(self, rec: ModelRecord, action: Action, keep_pool: Callable[[PinnedPool], None],
              partial_room: int | None = None) -> MoveFacts:  # fmt: skip
        """Disk/RAM -> GPU, or disk/GPU -> CPU. `keep_pool(pool)` is called as soon as host tensors sit in a pool,
        so a failed device allocation after that leaves the pool with its record (never orphaned).
        `partial_room`: load it partly resident within that many bytes (Loader.load_partial)."""
        t0 = time.perf_counter()
        if partial_room is not None:
            return self._bring_partial(rec, partial_room, keep_pool, t0)
        if action == Action.LOAD_CPU:
            if rec.tier == GPU:
                facts = self.gpu_to_ram(rec)
                return MoveFacts(facts.obj, facts.pool, RAM, facts.bytes, facts.copied, facts.seconds, "gpu->ram")
            obj = rec.obj if rec.tier == RAM else rec.loader.load("cpu")
            return MoveFacts(obj, rec.pool, RAM, self._host_bytes(obj, rec), 0, time.perf_counter() - t0, "disk->ram")
        kind = "disk->gpu" if action == Action.LOAD_GPU else "ram->gpu"
        if rec.custom:
            before = self._used_now()
            obj = rec.obj
            obj = (rec.loader.load(self.accel.load_device) if action == Action.LOAD_GPU
                   else rec.loader.to_device(obj, self.accel.load_device)) or obj  # fmt: skip
            after = self._used_now()
            nbytes = after - before if before is not None and after is not None and after > before else rec.size()
            return MoveFacts(obj, None, GPU, nbytes, nbytes, time.perf_counter() - t0, kind)
        obj, pool, copied = rec.obj, rec.pool, 0
        if action == Action.LOAD_GPU:
            obj = rec.loader.load(self.accel.load_device)
        elif pool is not None and is_torch_model(obj):  # a swap-in: the copy starts before the tensor walk
            res = upload_pool(pool, self.accel, lambda: host_tensors(obj, self.accel))
            if res is not None:
                return MoveFacts(obj, pool, GPU, res.bytes, res.copied, time.perf_counter() - t0, kind)
        nbytes = device_bytes(obj, self.accel) if is_torch_model(obj) else rec.estimate
        if is_torch_model(obj) and (action == Action.UP or nbytes == 0):
            tensors = host_tensors(obj, self.accel)
            pool = adopt(tensors, pool, self.accel.host_buffer)
            keep_pool(pool)
            res = upload(tensors, pool, self.accel)
            nbytes, copied = res.bytes, res.copied
        return MoveFacts(obj, pool, GPU, int(nbytes), copied, time.perf_counter() - t0, kind)

    def _bring_partial(self, rec: ModelRecord, room: int, keep_pool: Callable[[PinnedPool], None],
                       t0: float) -> MoveFacts:  # fmt: skip
        """`load_partial(device, room, accel)` -> (model, streamer): the streamer owns the layers it keeps in host
        pools; whatever else the loader left in host memory goes up in one copy, as any load does."""
        obj, streamer = rec.loader.load_partial(self.accel.load_device, room, self.accel)
        tensors = [t for t in host_tensors(obj, self.accel) if not streamer.owns(t)]
        pool = copied = None
        if tensors:
            pool = adopt(tensors, None, self.accel.host_buffer)
            keep_pool(pool)
            copied = upload(tensors, pool, self.accel).copied
        nbytes = device_bytes(obj, self.accel)
        return MoveFacts(obj, pool, GPU, int(nbytes), copied or nbytes, time.perf_counter() - t0, "disk->gpu",
                         streamed=streamer.pool_bytes)  # fmt: skip

    def gpu_to_ram(self, rec: ModelRecord) -> MoveFacts:
        t0 = time.perf_counter()
        hook = getattr(rec.loader, "on_evict", None)
        if hook is not None:  # device buffers kept beside the idle model (a chat decoder's KV cache) go first
            try:
                hook(rec.obj)
            except Exception as e:
                log.warning("%s: on_evict() failed: %s", rec.key, e)
        if rec.custom:
            obj = rec.loader.to_device(rec.obj, "cpu") or rec.obj
            return MoveFacts(obj, None, RAM, rec.size(), rec.size(), time.perf_counter() - t0, "gpu->ram")
        res = move_down(rec.obj, rec.pool, self.accel, self.accel.host_buffer)
        return MoveFacts(rec.obj, res.pool, RAM, rec.size(), res.copied, time.perf_counter() - t0, "gpu->ram")

    def release(self, rec: ModelRecord, obj: Any, pool: PinnedPool | None) -> float:
        """Hand a model back to its loader and free its memory (the caller already detached it from the record)."""
        t0 = time.perf_counter()
        try:
            rec.loader.release(obj)
        except Exception as e:
            log.warning("%s: release() failed: %s", rec.key, e)
        del obj
        if pool is not None:
            pool.close()
        gc.collect()  # models often hold reference cycles (bitsandbytes, ultralytics): free their memory now
        return time.perf_counter() - t0

    def can_swap(self, rec: ModelRecord) -> bool:
        """Can this GPU model move to pinned RAM (rather than be released to disk)?"""
        streamed = rec.streamed_host_bytes > 0  # partly resident: it goes to disk, and loads partly again
        return self.accel.has_gpu_tier and not streamed and (rec.custom or is_torch_model(rec.obj))

    def _host_bytes(self, obj: Any, rec: ModelRecord) -> int:
        if is_torch_model(obj):
            return sum(t.numel() * t.element_size() for t in _slots(obj)) or rec.estimate
        return rec.size()
