"""Granting and ending interactive leases for ResidencyManager (under its lock), waiting when others hold memory.

A request is decided by `planner.decide` on a fresh `World`: Hit and CpuFallback are granted at once, Place runs
its plan through the executor (moves outside the lock), Wait queues it (bounded, shown in the snapshot as
"waiting for GPU: <model>, held by <lease>"; training leases are asked to give way at their next step) and Refuse
answers at once (only the request's own leases keep it out). A placement that runs out of memory while other
leases hold some goes back to waiting until one of them ends.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from studio.residency import planner
from studio.residency.execute import NeedsWait, is_oom
from studio.residency.planner import GPU, CpuFallback, Hit, Place, Refuse, ResidencyError, Wait, tried_bytes
from studio.residency.state import Lease, ModelRecord, WaitingView, held_tokens, new_token
from studio.units import fmt_bytes

log = logging.getLogger("studio.residency")
RECENT_READ_S = 0.1  # how old a card reading a lease on a resident model may reuse
# A model "larger than the whole budget" runs on the CPU, many times slower: that verdict is read again after this
# pause before it is taken. One NVML reading can count memory the studio has just freed as other programs' (on the
# H200, 2026-12-01 17:11: 8.95 GB "other programs" beside a 2.5 GB neighbour, right after a 5.3 GB eviction and a
# paused trainer's 3 GB), and a request then ran on the CPU although it fitted.
FALLBACK_CONFIRM_S = 0.25


@dataclass
class _OOM:
    message: str
    tried: int | None


class Leasing:
    def __init__(self, manager: Any) -> None:  # manager: the ResidencyManager that owns this
        self.m = manager

    def acquire(self, key: str, hint: int | None) -> Lease:
        m = self.m
        deadline, waiter, after_oom = time.monotonic() + m.wait_timeout_s, None, None
        first, confirm_at = True, None
        try:
            while True:
                if confirm_at is not None:  # a CPU fallback is taken only if a second reading agrees (see below)
                    time.sleep(max(0.0, confirm_at - time.monotonic()))
                # first try on a model already on the card: a reading of the last RECENT_READ_S will do (a frame of
                # a video, the next image); anything that waits or moves reads the card afresh
                reading = m._recent_reading(RECENT_READ_S) if first and self._resident(key) else m._read()
                first = False
                with m._cond:
                    rec = m._records.get(key)
                    if rec is None:
                        raise ResidencyError(f"{key} is not registered; its backend must register a loader first")
                    decision = self._next(rec, hint, reading, after_oom)
                    falls_back = isinstance(decision, CpuFallback) or (
                        isinstance(decision, Place) and decision.plan.cpu_fallback
                    )
                    if falls_back and confirm_at is None and m._accel.has_gpu_tier:
                        confirm_at = time.monotonic() + FALLBACK_CONFIRM_S
                        continue
                    if isinstance(decision, Hit | CpuFallback):
                        return self.grant(rec, decision.work, hit=True, cpu=isinstance(decision, CpuFallback))
                    if isinstance(decision, Refuse):
                        raise ResidencyError(
                            f"{key} does not fit on the GPU while this same request holds {', '.join(decision.holders)}; "
                            "release those leases first (a leased model is never evicted)"
                        )
                    if not isinstance(decision, Place) or m._mover_busy:
                        waiter = self._refresh(waiter or self._enqueue(rec, decision), rec, decision)
                        self._wait(waiter, rec, deadline)
                        continue
                    plan = decision.plan
                    m._exec.begin(plan)
                try:
                    return m._exec.run(
                        plan, up=True, grant=lambda r=rec, p=plan: self.grant(r, p.work, hit=False, cpu=p.cpu_fallback)
                    )
                except NeedsWait:
                    with m._cond:
                        after_oom = m._releases  # wait for another lease to end, then plan again
        finally:
            if waiter is not None:
                with m._cond:
                    m._waiting.remove(waiter)

    def _resident(self, key: str) -> bool:
        """On the card and not moving: a hint read without the lock (the decision is taken under it)."""
        rec = self.m._records.get(key)
        return rec is not None and rec.tier == GPU and rec.moving is None

    def _next(self, rec: ModelRecord, hint: int | None, reading: Any, after_oom: int | None) -> Any:
        """The decision for this turn of the loop (lock held); None while the model is being moved."""
        m = self.m
        if after_oom is not None and m._releases == after_oom:  # it ran out of memory: wait for a lease to end
            decision: Any = Wait(rec.size(), self._holders(rec), tuple(m._preempt.yieldable(held_tokens())))
        elif rec.moving:
            return None
        else:
            decision = self._decide(rec, hint, reading)
        if isinstance(decision, Wait) and decision.trainers:
            m._preempt.ask_to_yield(list(decision.trainers), rec.key)
        return decision

    def _wait(self, waiter: WaitingView, rec: ModelRecord, deadline: float) -> None:
        """One bounded wait in the queue (lock held): shown in the snapshot, a timeout says who held the memory."""
        m = self.m
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            m.metrics.add("timeouts")
            m._event("timeout", rec.key, waiter.need_bytes)
            raise ResidencyError(
                f"Timed out after {m.wait_timeout_s:.0f} s waiting for GPU memory for {rec.key}: {waiter.reason}. "
                "Try again when they finish, or raise the VRAM cap."
            )
        m._cond.wait(min(remaining, 0.25))

    def _decide(self, rec: ModelRecord, hint: int | None, reading: Any) -> planner.Decision:
        m, held = self.m, held_tokens()
        own = [t for t in m._preempt.leases if t.gpu_bytes() and t._owner in held]
        return planner.decide(m._world(reading), rec, hint, yieldable=m._preempt.yieldable(held), own_trainers=own,
                              held=held)  # fmt: skip

    def _holders(self, rec: ModelRecord) -> tuple[ModelRecord, ...]:
        return tuple(r for r in self.m._records.values() if r.key != rec.key and r.tier == GPU and r.leases)

    def _enqueue(self, rec: ModelRecord, decision: Any) -> WaitingView:
        m = self.m
        if len(m._waiting) >= m.max_waiting:
            m.metrics.add("busy")
            m._event("busy", rec.key)
            raise ResidencyError(
                f"busy: {len(m._waiting)} requests are already waiting for the GPU; try {rec.key} again shortly"
            )
        waiter = self._view(rec, decision, time.time())
        m._waiting.append(waiter)
        m.metrics.add("waits")
        log.info("waiting for GPU: %s, %s", rec.key, waiter.reason)
        return waiter

    def _refresh(self, waiter: WaitingView, rec: ModelRecord, decision: Any) -> WaitingView:
        """Keep the waiting view's reason current (who holds the memory changes while it waits)."""
        new = self._view(rec, decision, waiter.since)
        if new.reason == waiter.reason:
            return waiter
        i = self.m._waiting.index(waiter)
        self.m._waiting[i] = new
        return new

    def _view(self, rec: ModelRecord, decision: Any, since: float) -> WaitingView:
        if isinstance(decision, Wait):
            need, blockers, trainers = decision.need, decision.blockers, decision.trainers
        else:
            need, blockers, trainers = rec.size(), (), ()
        held = [f"{b.key} ({fmt_bytes(b.size())})" for b in blockers]
        held += [f"{t.label} (training, {fmt_bytes(t.gpu_bytes())}; pausing at its next step)" for t in trainers]
        if isinstance(decision, Wait) and not held and rec.gpu_only and not rec.moving:
            reason = (f"other programs on the card hold the memory it needs ({fmt_bytes(need)} more than the studio's "
                      "budget); its 4-bit weights do not run on the CPU")  # fmt: skip
        else:
            reason = (
                f"held by {', '.join(held) or 'a model being moved'} (it needs {fmt_bytes(need)} more than is free)"
            )
        return WaitingView(rec.key, since, int(need), reason)

    def grant(self, rec: ModelRecord, work: int, *, hit: bool, cpu: bool = False) -> Lease:
        m = self.m
        if cpu and not rec.cpu_fallback:
            b = m._budget(m._reading)
            cap = b.capacity
            log.warning("%s needs %s but the whole GPU budget is %s (other programs %s, our CUDA context %s, reserve "
                        "%s, PyTorch reserved %s): running it on the CPU (slower)", rec.key, fmt_bytes(rec.size() + work),
                        fmt_bytes(cap), fmt_bytes(b.others), fmt_bytes(b.context), fmt_bytes(m.reserve_bytes),
                        fmt_bytes(m._accel.reserved()))  # fmt: skip
            m.metrics.add("cpu_fallbacks")
            m._event("cpu_fallback", rec.key, rec.size() + work, detail=f"budget {fmt_bytes(cap)}")
        rec.cpu_fallback = cpu
        token = new_token()
        alone = not m._leases and not m._preempt.running() and not m._mover_busy
        lease = Lease(rec, work if rec.tier == GPU else 0, token, alone=alone, moves_at_start=m._moves)
        for other in m._leases:
            other.alone = False
        if lease.alone and rec.tier == GPU and not rec.custom:
            m._accel.reset_peak()
            lease.base_alloc = m._accel.allocated()
        if rec.custom and rec.tier == GPU and m._reading is not None:
            lease.probe_base = lease.probe_max = m._reading.used_bytes
        rec.leases += 1
        rec.owners.append(token)
        rec.touch(m._policy.inflation)
        m._leases.append(lease)
        m.metrics.add("hits" if hit else "misses")
        return lease

    def release(self, lease: Lease) -> None:
        m, rec = self.m, lease.record
        reading = m._read() if rec.custom else None
        measured = job = None
        with m._cond:
            m._leases.remove(lease)
            rec.leases -= 1
            rec.owners.remove(lease.token)
            rec.last_use, rec.last_use_wall = time.monotonic(), time.time()
            m._releases += 1
            trusted = lease.alone and m._moves == lease.moves_at_start  # nobody else's load in its peak
            if trusted and rec.tier == GPU:
                if not rec.custom:
                    peak = m._accel.peak()
                    measured = max(0, peak - lease.base_alloc)
                    # the planner's view: all this job holds beyond its weights, buffers it keeps between leases
                    # (a chat's KV cache) included; the other models' weights on the card are not the job's
                    others = sum(r.size() for r in m._records.values() if r is not rec and r.tier == GPU)
                    job = max(0, peak - others - rec.bytes)
                elif lease.probe_base is not None and reading is not None:
                    measured = job = max(0, max(lease.probe_max or 0, reading.used_bytes) - lease.probe_base)
                if measured is not None:
                    rec.record_peak(measured)
            m._cond.notify_all()
        if job is not None:  # outside the lock: the planner's store writes a file
            m.vram.observe(rec.key, rec.bytes, job)

    def sample(self, reading: Any) -> None:
        if reading is not None:
            for lease in self.m._leases:
                if lease.probe_max is not None:
                    lease.probe_max = max(lease.probe_max, reading.used_bytes)

    # ---- run() helpers -----------------------------------------------------------------------------------------
    def try_run(self, key: str, fn, hint: int | None):
        try:
            with self.m.use(key, working_bytes=hint) as model:
                return fn(model)
        except Exception as e:
            if not is_oom(e):
                raise
            message = str(e)
        return _OOM(message, tried_bytes(message))

    def wait_for_others(self, key: str) -> bool:
        """After a second out-of-memory error: if other leases were running, wait (bounded, shown as waiting) until
        none is, and say True (try once more); False when there was nobody to wait for."""
        m = self.m
        deadline = time.monotonic() + m.wait_timeout_s
        with m._cond:
            if not m._leases and not m._preempt.running():
                return False
            rec = m._records[key]
            waiter = self._enqueue(rec, Wait(rec.size(), self._holders(rec)))
            try:
                while m._leases or m._preempt.running():
                    m._preempt.ask_to_yield(m._preempt.yieldable(frozenset()), key)
                    if time.monotonic() > deadline:
                        return False
                    m._cond.wait(0.25)
            finally:
                m._waiting.remove(waiter)
        return True

    # ---- messages ----------------------------------------------------------------------------------------------
    def memory_facts(self) -> str:
        reading = self.m._read()
        b = self.m._budget(reading)
        return (
            f"{fmt_bytes(reading.free_bytes if reading else None)} is free on the card ({fmt_bytes(b.others)} used by "
            f"other programs, studio budget {fmt_bytes(b.capacity)}; PyTorch holds {fmt_bytes(self.m._accel.reserved())}"
            f" reserved, {fmt_bytes(self.m._accel.allocated())} allocated)"
        )

    def oom_message(self, key: str, failure: _OOM, hint: int | None) -> str:
        with self.m._cond:
            rec = self.m._records[key]
            work = rec.working_need(hint)
        tried = f"; the failing allocation was {fmt_bytes(failure.tried)}" if failure.tried else ""
        return (
            f"Out of GPU memory running {key} even after moving every idle model off the GPU and with no other lease "
            f"running: it needs about {fmt_bytes(rec.size() + work)} (weights {fmt_bytes(rec.size())} + working "
            f"{fmt_bytes(work)}){tried}; {self.memory_facts()}. Use a smaller input or batch, a lower precision, or "
            "close other GPU programs." + self.advice(key)
        )

    def advice(self, key: str) -> str:
        """The VRAM planner's sentence for the job declared on `key` (with numbers), or ''."""
        text = self.m.vram.advice(key, self.m.capacity_bytes())
        return f" {text}" if text else ""
