"""Carrying out a plan for ResidencyManager: the mover moves (no lock), this commits the facts under the manager's lock.

Invariants (the lock is `manager._cond`):
- a record with `moving` set belongs to the thread holding the mover (`manager._mover_busy`); nobody else writes it;
- a record with leases is never a victim; its `obj` stays where it is until the last lease ends;
- record fields (obj, pool, tier, bytes) change only under the lock, so snapshot readers never see half a move;
- GPU accounting counts weights of models on the GPU or moving up, plus the working memory of current leases and
  the bytes of running training leases; victims stay counted until their move finished (conservative).
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

from studio.residency.accel import is_oom_error
from studio.residency.mover import MoveFacts
from studio.residency.pinned import gpu_only, is_torch_model
from studio.residency.planner import Action, Plan, ResidencyError, candidate, plan_oom_retry, tried_bytes
from studio.residency.state import DISK, GPU, RAM, ModelRecord, Moving
from studio.units import fmt_bytes

log = logging.getLogger("studio.residency")


class NeedsWait(Exception):
    """Placing ran out of memory while other leases hold some: the request goes back to waiting for them."""


def is_oom(exc: BaseException) -> bool:
    return is_oom_error(exc) and not isinstance(exc, ResidencyError)


class Executor:
    def __init__(self, manager: Any) -> None:  # manager: the ResidencyManager that owns this
        self.m = manager
        self.mover = manager._mover

    # ---- the mover token (lock held) -------------------------------------------------------------------------
    def begin(self, plan: Plan) -> None:
        m = self.m
        m._mover_busy = True
        m._moves += 1
        for r in [*plan.gpu_victims, *plan.ram_victims]:
            r.moving = Moving.DOWN
        if plan.target is not None and plan.action != Action.NONE:
            plan.target.moving = Moving.TO_CPU if plan.action == Action.LOAD_CPU else Moving.UP

    def end(self, plan: Plan) -> None:
        for r in plan.records():
            r.moving = None
        self.m._mover_busy = False
        self.m._cond.notify_all()

    def run(self, plan: Plan, *, up: bool, give_back: bool = False, grant=None):
        """Execute a begun plan outside the lock, then end it (and grant a lease, under the same lock hold)."""
        m = self.m
        free_before = None
        if give_back and m._read() is not None:
            free_before = m._reading.free_bytes
        try:
            freed = self.execute_up(plan) if up else self.execute_down(plan)
        except BaseException:
            with m._cond:
                self.end(plan)
            raise
        if give_back and freed > 0 and m._accel.has_gpu_tier:
            m._accel.empty_cache()  # PyTorch's cached blocks go back to the driver: someone else wants the memory
        with m._cond:
            self.end(plan)
            pools = []
            for r in m._trim_pools_now():
                pools.append(r.pool)
                r.pool = None
            lease = grant() if grant is not None else None
            m._timeline_point(force=True)
        for pool in pools:
            pool.close()
        if give_back:  # after the mover is free again: nobody waits behind this bounded wait
            self.give_back(freed, free_before)
        return lease

    # ---- moving down -----------------------------------------------------------------------------------------
    def execute_down(self, plan: Plan) -> int:
        m = self.m
        drops = []
        with m._cond:
            for r in plan.pool_drops:
                if r.pool is not None:
                    drops.append(r.pool)
                    r.pool = None
        for pool in drops:
            pool.close()
        for r in plan.ram_victims:
            self.to_disk(r)
        freed = 0
        for r in plan.gpu_victims:
            freed += r.size()
            if r.key in plan.to_disk or not self.mover.can_swap(r):
                self.to_disk(r)
            else:
                self.gpu_to_ram(r)
        return freed

    def gpu_to_ram(self, r: ModelRecord) -> None:
        facts = self.mover.gpu_to_ram(r)
        m = self.m
        with m._cond:
            m._policy.on_evict(candidate(r, GPU), time.monotonic())  # GreedyDual ageing: L rises to the victim's H
            r.obj, r.pool, r.tier, r.device, r.swap_out_s = facts.obj, facts.pool, RAM, "cpu", facts.seconds
            r.generation += 1
            m.metrics.add("evictions")
            m.metrics.add("bytes_down", facts.copied)
            m.metrics.switch("gpu->ram", facts.seconds)
            m._event("evict", r.key, r.size(), facts.seconds, f"gpu->ram, {fmt_bytes(facts.copied)} copied")
        log.info("evicted %s gpu->ram: %s (%s copied) in %.3f s", r.key, fmt_bytes(r.size()),
                 fmt_bytes(facts.copied), facts.seconds)  # fmt: skip

    def to_disk(self, r: ModelRecord) -> None:
        m = self.m
        with m._cond:
            source = r.tier
            if source == GPU:
                m._policy.on_evict(candidate(r, GPU), time.monotonic())
            obj, pool = r.obj, r.pool
            r.obj, r.pool, r.tier, r.device = None, None, DISK, None
            if r.streamed_host_bytes:  # a partly resident model: its full size counts again until its next load
                r.streamed_host_bytes, r.bytes = 0, 0
            r.generation += 1
        seconds = self.mover.release(r, obj, pool)
        del obj, pool
        with m._cond:
            m.metrics.add("releases")
            if source == GPU:
                m.metrics.add("evictions")
            m.metrics.switch(f"{source}->disk", seconds)
            m._event("release", r.key, r.size(), seconds, f"{source}->disk")
        log.info("released %s %s->disk: %s in %.3f s", r.key, source, fmt_bytes(r.size()), seconds)

    # ---- moving up -------------------------------------------------------------------------------------------
    def execute_up(self, plan: Plan) -> int:
        freed = self.execute_down(plan)
        if plan.action == Action.NONE:
            return freed
        try:
            self.bring(plan)
        except Exception as e:
            if not is_oom(e) or plan.action == Action.LOAD_CPU:
                raise
            self._retry_after_oom(plan, e)
        return freed

    def _retry_after_oom(self, plan: Plan, e: BaseException) -> None:
        m = self.m
        log.warning("Out of memory placing %s (%s); moving every idle model down and retrying once",
                    plan.target.key, e)  # fmt: skip
        m.metrics.add("oom_retries")
        with m._cond:
            m._event("oom", plan.target.key, tried_bytes(str(e)) or 0, detail="while placing; retrying")
            extra = plan_oom_retry(m._world(m._reading), plan)  # the RAM cap holds for these too
            for r in extra:
                r.moving = Moving.DOWN
        for r in extra:
            if r.key in plan.to_disk or not self.mover.can_swap(r):
                self.to_disk(r)
            else:
                self.gpu_to_ram(r)
        gc.collect()
        m._accel.empty_cache()  # blocks PyTorch reserved but does not use (fragmentation) go back first
        try:
            self.bring(plan)
        except Exception as e2:
            if not is_oom(e2):
                raise
            with m._cond:
                others = bool(m._leases) or m._preempt.running()
            if others:  # other leases hold memory: wait for them rather than fail
                m._event("oom_wait", plan.target.key, tried_bytes(str(e2)) or 0, detail="waiting for other leases")
                raise NeedsWait(str(e2)) from e2
            m.metrics.add("oom_failures")
            raise ResidencyError(self.placing_message(plan, e2)) from e2

    def bring(self, plan: Plan) -> None:
        rec, m = plan.target, self.m

        def keep_pool(pool) -> None:
            with m._cond:
                rec.pool = pool

        facts = self.mover.bring(rec, plan.action, keep_pool, plan.partial_room)
        self._commit_up(rec, facts)

    def _commit_up(self, rec: ModelRecord, facts: MoveFacts) -> None:
        m = self.m
        with m._cond:
            rec.obj, rec.pool, rec.tier, rec.bytes = facts.obj, facts.pool, facts.tier, int(facts.bytes)
            rec.streamed_host_bytes = facts.streamed
            rec.device = m._accel.device if facts.tier == GPU else "cpu"
            first_up = facts.kind != "ram->gpu" or rec.swap_in_s is None  # a later swap keeps the kind of weights
            if facts.tier == GPU and first_up and is_torch_model(facts.obj):
                rec.gpu_only = gpu_only(facts.obj)  # a walk over the modules: once per load, not per swap
            rec.generation += 1
            if facts.kind == "ram->gpu":
                rec.swap_in_s = facts.seconds
            elif facts.kind != "gpu->ram":
                rec.load_s = facts.seconds
                m.metrics.add("loads")
            m.metrics.add("bytes_up", facts.copied)
            m.metrics.switch(facts.kind, facts.seconds)
            detail = f"{facts.kind}, {fmt_bytes(facts.streamed)} streamed from RAM" if facts.streamed else facts.kind
            m._event("swap_in" if facts.kind == "ram->gpu" else "load", rec.key, facts.bytes, facts.seconds, detail)
        rate = f", {facts.copied / facts.seconds / 1e9:.1f} GB/s" if facts.copied and facts.seconds > 0 else ""
        verb = "swapped in" if facts.kind == "ram->gpu" else "loaded"
        log.info("%s %s: %s in %.3f s%s", verb, rec.key, fmt_bytes(facts.bytes), facts.seconds, rate)

    def give_back(self, freed: int, free_before: int | None) -> None:
        """After moving models off the GPU for someone else (the cache already emptied): wait, bounded, to see the
        card show it free. Runs with the mover released, so other requests go on meanwhile."""
        m = self.m
        if freed <= 0 or not m._accel.has_gpu_tier or free_before is None:
            return
        t0 = time.monotonic()
        while True:
            reading = m._read()
            if reading is None or reading.free_bytes >= free_before + 0.9 * freed:
                break
            if time.monotonic() - t0 > m.free_wait_s:
                log.info("freed %s but the card shows only %s more free after %.1f s", fmt_bytes(freed),
                         fmt_bytes(reading.free_bytes - free_before), m.free_wait_s)  # fmt: skip
                break
            time.sleep(0.05)
        with m._cond:
            m._event("gave_back", "", freed, time.monotonic() - t0)

    def placing_message(self, plan: Plan, e: BaseException) -> str:
        rec = plan.target
        return (
            f"Out of GPU memory placing {rec.key}: it needs {fmt_bytes(rec.size() + plan.work)} (weights "
            f"{fmt_bytes(rec.size())} + working {fmt_bytes(plan.work)}) and does not fit with every idle model moved "
            f"off and no other lease running; {self.m._desk.memory_facts()}. ({str(e)[:160]})"
            + self.m._desk.advice(rec.key)
        )
