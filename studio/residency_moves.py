"""Moving models between tiers for ResidencyManager: bringing a model up (disk or pinned RAM -> GPU, or disk ->
CPU), moving victims down (GPU -> pinned RAM, anything -> disk) and giving memory back to the card.

Every method here runs in the thread that holds the mover (see residency_core) on records marked `moving`;
results are committed to the records under the lock, with one log line and one event per move.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

from studio.pinned import device_bytes, is_torch_model, move_down, move_up, tensor_slots
from studio.residency_core import ResidencyError, _oom, _Plan, _tried_bytes
from studio.residency_state import DISK, GPU, RAM, ModelRecord
from studio.units import fmt_bytes

log = logging.getLogger("studio.residency")


class Moves:
    """Mixin of ResidencyManager (attributes are set in ResidencyManager.__init__)."""

    def _execute_up(self, plan: _Plan) -> int:
        freed = self._execute_down(plan)
        if plan.action == "none":
            return freed
        try:
            self._bring(plan)
        except Exception as e:
            if not _oom(e) or plan.action == "load_cpu":
                raise
            log.warning(
                "Out of memory placing %s (%s); moving every idle model down and retrying once", plan.target.key, e
            )
            self.metrics.add("oom_retries")
            self._event("oom", plan.target.key, _tried_bytes(str(e)) or 0, detail="while placing; retrying")
            with self._cond:
                extra = self._idle(GPU, {r.key for r in plan.records()})
                for r in extra:
                    r.moving = "down"
                plan.gpu_victims += extra
            self._down_gpu(extra, set())
            gc.collect()
            self._accel.empty_cache()
            try:
                self._bring(plan)
            except Exception as e2:
                if not _oom(e2):
                    raise
                self.metrics.add("oom_failures")
                capacity = self._budget(self._read())[0]
                raise ResidencyError(
                    f"Out of GPU memory placing {plan.target.key}: it needs {fmt_bytes(plan.target.size() + plan.work)} "
                    f"and the studio's GPU budget is {fmt_bytes(capacity)} with every idle model moved off"
                ) from e2
        return freed

    def _execute_down(self, plan: _Plan) -> int:
        for r in plan.pool_drops:
            pool, r.pool = r.pool, None
            if pool is not None:
                pool.close()
        for r in plan.ram_victims:
            self._to_disk(r, RAM)
        return self._down_gpu(plan.gpu_victims, plan.to_disk)

    def _down_gpu(self, victims: list[ModelRecord], to_disk: set[str]) -> int:
        freed = 0
        for r in victims:
            freed += r.size()
            if r.key in to_disk or not self._accel.has_gpu_tier or not (r.custom or is_torch_model(r.obj)):
                self._to_disk(r, r.tier)
            else:
                self._gpu_to_ram(r)
        return freed

    def _bring(self, plan: _Plan) -> None:
        rec, t0 = plan.target, time.perf_counter()
        obj, pool, copied = rec.obj, rec.pool, 0
        if plan.action == "load_cpu":
            if rec.tier == DISK:
                obj = rec.loader.load("cpu")
            elif rec.tier == GPU:
                self._gpu_to_ram(rec)
                obj, pool = rec.obj, rec.pool
            nbytes, kind, tier = self._host_bytes(obj, rec), "disk->ram", RAM
        elif rec.custom:
            before = self._used_now()
            obj = (
                rec.loader.load(self._accel.load_device)
                if plan.action == "load_gpu"
                else rec.loader.to_device(obj, self._accel.load_device)
            ) or obj
            after = self._used_now()
            nbytes = after - before if before is not None and after is not None and after > before else rec.size()
            kind, tier, copied = ("disk->gpu" if plan.action == "load_gpu" else "ram->gpu"), GPU, nbytes
        else:
            if plan.action == "load_gpu":
                obj = rec.loader.load(self._accel.load_device)
            nbytes = device_bytes(obj, self._accel) if is_torch_model(obj) else rec.estimate
            if is_torch_model(obj) and (plan.action == "up" or nbytes == 0):
                res = move_up(obj, pool, self._accel, self._accel.host_buffer)
                nbytes, pool, copied = res.bytes, res.pool, res.copied
            kind, tier = ("disk->gpu" if plan.action == "load_gpu" else "ram->gpu"), GPU
        dt = time.perf_counter() - t0
        with self._cond:
            rec.obj, rec.pool, rec.tier, rec.bytes = obj, pool, tier, int(nbytes)
            rec.device = self._accel.device if tier == GPU else "cpu"
            rec.generation += 1
            if kind == "ram->gpu":
                rec.swap_in_s = dt
            else:
                rec.load_s = dt
                self.metrics.add("loads")
            self.metrics.add("bytes_up", copied)
            self.metrics.switch(kind, dt)
            self._event("load" if kind != "ram->gpu" else "swap_in", rec.key, nbytes, dt, kind)
        rate = f", {copied / dt / 1e9:.1f} GB/s" if copied and dt > 0 else ""
        log.info(
            "%s %s: %s in %.3f s%s",
            "loaded" if kind != "ram->gpu" else "swapped in",
            rec.key,
            fmt_bytes(nbytes),
            dt,
            rate,
        )

    def _host_bytes(self, obj: Any, rec: ModelRecord) -> int:
        if is_torch_model(obj):
            return sum(t.numel() * t.element_size() for t in tensor_slots(obj)) or rec.estimate
        return rec.size()

    def _used_now(self) -> int | None:
        reading = self._read()
        return None if reading is None else reading.used_bytes

    def _gpu_to_ram(self, r: ModelRecord) -> None:
        t0 = time.perf_counter()
        if r.custom:
            obj, pool, copied = r.loader.to_device(r.obj, "cpu") or r.obj, None, r.size()
        else:
            res = move_down(r.obj, r.pool, self._accel, self._accel.host_buffer)
            obj, pool, copied = r.obj, res.pool, res.copied
        dt = time.perf_counter() - t0
        with self._cond:
            r.obj, r.pool, r.tier, r.device, r.swap_out_s = obj, pool, RAM, "cpu", dt
            r.generation += 1
            self.metrics.add("evictions")
            self.metrics.add("bytes_down", copied)
            self.metrics.switch("gpu->ram", dt)
            self._event("evict", r.key, r.size(), dt, f"gpu->ram, {fmt_bytes(copied)} copied")
        log.info("evicted %s gpu->ram: %s (%s copied) in %.3f s", r.key, fmt_bytes(r.size()), fmt_bytes(copied), dt)

    def _to_disk(self, r: ModelRecord, source: str) -> None:
        t0 = time.perf_counter()
        with self._cond:
            obj, pool = r.obj, r.pool
            r.obj, r.pool, r.tier, r.device = None, None, DISK, None
            r.generation += 1
        try:
            r.loader.release(obj)
        except Exception as e:
            log.warning("%s: release() failed: %s", r.key, e)
        del obj
        if pool is not None:
            pool.close()
        gc.collect()  # models often hold reference cycles (bitsandbytes, ultralytics): free their memory now
        dt = time.perf_counter() - t0
        with self._cond:
            self.metrics.add("releases")
            if source == GPU:
                self.metrics.add("evictions")
            self.metrics.switch(f"{source}->disk", dt)
            self._event("release", r.key, r.size(), dt, f"{source}->disk")
        log.info("released %s %s->disk: %s in %.3f s", r.key, source, fmt_bytes(r.size()), dt)

    def _drop(self, rec: ModelRecord) -> None:
        """Release a record that is no longer registered (or whose loader was replaced)."""
        was_gpu = rec.tier == GPU
        self._to_disk(rec, rec.tier)
        if was_gpu:
            self._accel.empty_cache()

    def _give_back(self, freed: int, free_before: int | None) -> None:
        """After moving models off the GPU for someone else: empty the cache, wait (bounded) to see it free."""
        if freed <= 0 or not self._accel.has_gpu_tier:
            return
        self._accel.empty_cache()
        if free_before is None:
            return
        t0 = time.monotonic()
        while True:
            reading = self._read()
            if reading is None or reading.free_bytes >= free_before + 0.9 * freed:
                break
            if time.monotonic() - t0 > self.free_wait_s:
                log.info(
                    "freed %s but the card shows only %s more free after %.1f s",
                    fmt_bytes(freed),
                    fmt_bytes(reading.free_bytes - free_before),
                    self.free_wait_s,
                )
                break
            time.sleep(0.05)
        self._event("gave_back", "", freed, time.monotonic() - t0)
