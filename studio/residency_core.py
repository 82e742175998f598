"""The inner half of ResidencyManager: reading the card, deciding placements, and moving models.

Invariants (the lock is `self._cond`):
- a record with `moving` set belongs to the thread holding the mover (`_mover_busy`); nobody else touches it;
- a record with leases is never a victim; its `obj` stays where it is until the last lease ends;
- GPU accounting counts weights of models on the GPU or moving up, plus the working memory of current leases;
  victims stay counted until their move finished (conservative).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from studio.accel import is_oom_error
from studio.eviction import DISK_BW_GUESS, RAM_BW_GUESS, choose_victims
from studio.gpu import CardReading
from studio.residency_state import DISK, GPU, RAM, Event, Lease, ModelRecord, TimelinePoint, WaitingView
from studio.units import fmt_bytes

log = logging.getLogger("studio.residency")


class ResidencyError(RuntimeError):
    """A model could not be placed: the message says how many bytes were needed and free."""


@dataclass
class _OOM:
    message: str
    tried: int | None


@dataclass
class _Plan:
    target: ModelRecord | None
    action: str  # "none" | "load_gpu" | "up" | "load_cpu"
    work: int = 0
    cpu_fallback: bool = False
    gpu_victims: list[ModelRecord] = field(default_factory=list)
    to_disk: set[str] = field(default_factory=set)  # GPU victims whose pool would not fit in RAM
    ram_victims: list[ModelRecord] = field(default_factory=list)
    pool_drops: list[ModelRecord] = field(default_factory=list)

    def records(self) -> list[ModelRecord]:
        return [*self.gpu_victims, *self.ram_victims, *([self.target] if self.target else [])]


def _default_ram_cap(has_gpu: bool) -> int:
    """A quarter of physical RAM for parked models on a GPU machine; half of it when the CPU is the only tier."""
    import psutil  # os.sysconf has no SC_PHYS_PAGES on Windows

    total = psutil.virtual_memory().total
    return total // 4 if has_gpu else total // 2


def _tried_bytes(message: str) -> int | None:
    m = re.search(r"Tried to allocate ([\d.]+) ?(KiB|MiB|GiB|TiB|bytes)", message)
    if not m:
        return None
    scale = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
    return int(float(m.group(1)) * scale.get(m.group(2), 1))


def _oom(exc: BaseException) -> bool:
    return is_oom_error(exc) and not isinstance(exc, ResidencyError)


class Placement:
    """Mixin with the internals of ResidencyManager (attributes are set in ResidencyManager.__init__)."""

    # ---- readings and accounting ------------------------------------------------------------------------------
    def _read(self) -> CardReading | None:
        try:
            reading = self._probe.read()
        except Exception as e:
            if not self._probe_failed:
                log.warning("GPU probe %s failed (%s); budgeting from the caps alone", self._probe.name, e)
                self._probe_failed = True
            reading = None
        self._reading = reading
        return reading

    def _budget(self, reading: CardReading | None) -> tuple[int, int, int]:
        """(capacity for our models, bytes used by other processes, our CUDA context)."""
        if not self._accel.has_gpu_tier:
            return 0, 0, 0
        reserved, others, context = self._accel.reserved(), 0, 0
        total = reading.total_bytes if reading else self._accel.total_bytes()
        own = reading.process(os.getpid()) if reading is not None and reading.per_process else None
        if own is not None:
            others, context = max(0, reading.used_bytes - own.used_bytes), max(0, own.used_bytes - reserved)
        elif reading is not None:  # no per-process figures: our context is counted with the others
            others = max(0, reading.used_bytes - reserved)
        room = total - others - context
        if self.vram_cap_bytes is not None:
            room = min(room, self.vram_cap_bytes - context)
        return max(0, room - self.reserve_bytes), others, context

    def _gpu_in_use(self) -> int:
        weights = sum(r.size() for r in self._records.values() if r.tier == GPU or r.moving == "up")
        return weights + sum(lease.working for lease in self._leases)

    def _ram_used(self) -> int:
        return sum(r.ram_bytes() for r in self._records.values())

    def _reload_s(self, r: ModelRecord, to: str) -> float:
        if to == RAM and r.swap_in_s is not None:
            return r.swap_in_s
        if to == DISK and r.load_s is not None:
            return r.load_s
        return r.size() / (RAM_BW_GUESS if to == RAM else DISK_BW_GUESS)

    def _idle(self, tier: str, exclude: set[str]) -> list[ModelRecord]:
        return [
            r
            for r in self._records.values()
            if r.tier == tier and not r.leases and not r.moving and r.key not in exclude
        ]

    def _victims(self, tier: str, need: int, exclude: set[str]) -> list[ModelRecord] | None:
        to = RAM if tier == GPU else DISK
        cands = [
            r.candidate(self._reload_s(r, to), r.size() if tier == GPU else r.ram_bytes())
            for r in self._idle(tier, exclude)
        ]
        chosen = choose_victims(cands, need, self._policy, time.monotonic())
        return None if chosen is None else [self._records[c.key] for c in chosen]

    # ---- decisions (lock held) --------------------------------------------------------------------------------
    def _decide(self, rec: ModelRecord, hint: int | None, reading: CardReading | None) -> tuple[str, Any]:
        """("hit", work) | ("cpu", work) | ("plan", _Plan) | ("wait", (need, blockers)) | ("self", blockers)."""
        work = rec.working_need(hint)
        if not self._accel.has_gpu_tier:
            if rec.tier == RAM:
                return "hit", work
            plan = _Plan(rec, "load_cpu", work)
            self._plan_ram(plan, rec.size(), {rec.key})
            return "plan", plan
        capacity = self._budget(reading)[0]
        if rec.tier != GPU and rec.size() + work > capacity:  # can never fit, even alone: run it on the CPU
            return ("cpu", work) if rec.tier == RAM else ("plan", _Plan(rec, "load_cpu", work, cpu_fallback=True))
        free = capacity - self._gpu_in_use()
        need = work - free if rec.tier == GPU else rec.size() + work - free
        if need <= 0 and rec.tier == GPU:
            return "hit", work
        victims = self._victims(GPU, need, {rec.key})
        if victims is None:
            blockers = [
                r for r in self._records.values() if r.key != rec.key and r.tier == GPU and (r.leases or r.moving)
            ]
            me = threading.get_ident()
            if blockers and all(r.leases and not r.moving and set(r.owners) == {me} for r in blockers):
                return "self", blockers
            if not blockers and rec.tier == GPU:
                return "hit", work  # nothing else to free; the OOM retry in run() is the last resort
            return "wait", (need, blockers)
        plan = _Plan(rec, {GPU: "none", RAM: "up", DISK: "load_gpu"}[rec.tier], work, gpu_victims=victims)
        self._plan_ram_for_victims(plan)
        return "plan", plan

    def _plan_ram_for_victims(self, plan: _Plan) -> None:
        extra = sum(v.size() for v in plan.gpu_victims if v.pool is None)
        exclude = {r.key for r in plan.records()}
        if extra and not self._plan_ram(plan, extra, exclude):
            plan.to_disk |= {v.key for v in plan.gpu_victims if v.pool is None}

    def _plan_ram(self, plan: _Plan, extra: int, exclude: set[str]) -> bool:
        """Make room for `extra` bytes of RAM under the cap: first drop the host pools of models that are on the GPU
        (only a head start for their next swap-down), then move idle RAM models to disk. False if impossible."""
        over = self._ram_used() + extra - self.ram_cap_bytes
        if over <= 0:
            return True
        drops = [r for r in self._records.values() if r.tier == GPU and r.pool is not None and not r.moving]
        drops = [r for r in drops if r.key not in exclude and r not in plan.pool_drops]
        now = time.monotonic()
        drops.sort(key=lambda r: self._policy.priority(r.candidate(self._reload_s(r, RAM)), now))
        chosen = []
        for r in drops:
            if over <= 0:
                break
            chosen.append(r)
            over -= r.pool.nbytes
        victims = self._victims(RAM, over, exclude | {r.key for r in plan.ram_victims}) if over > 0 else []
        if victims is None:
            return False
        plan.pool_drops += chosen
        plan.ram_victims += victims
        return True

    def _plan_maintenance(self, reading: CardReading | None) -> _Plan:
        plan, now = _Plan(None, "none"), time.monotonic()
        if self._accel.has_gpu_tier:
            over = self._gpu_in_use() - self._budget(reading)[0]
            if over > 0:
                victims = self._victims(GPU, over, set()) or self._idle(GPU, set())
                plan.gpu_victims += victims
                if victims:
                    log.info(
                        "GPU budget exceeded by %s (other programs or a lower cap): moving %s down",
                        fmt_bytes(over),
                        ", ".join(v.key for v in victims),
                    )
                    self._event("pressure", ",".join(v.key for v in victims), over)
        if self.keep_alive_s:
            tier = GPU if self._accel.has_gpu_tier else RAM
            for r in self._idle(tier, {v.key for v in plan.gpu_victims}):
                if now - r.last_use > self.keep_alive_s:
                    (plan.gpu_victims if tier == GPU else plan.ram_victims).append(r)
                    self._event("keep_alive", r.key, r.size(), detail=f"idle {now - r.last_use:.0f} s")
        if plan.gpu_victims:
            self._plan_ram_for_victims(plan)
        if self._ram_used() - self.ram_cap_bytes > 0:
            self._plan_ram(plan, 0, {r.key for r in plan.records()})
        return plan

    # ---- leases -----------------------------------------------------------------------------------------------
    def _acquire(self, key: str, hint: int | None) -> Lease:
        deadline, waiter = time.monotonic() + self.wait_timeout_s, None
        try:
            while True:
                reading = self._read()
                with self._cond:
                    rec = self._records.get(key)
                    if rec is None:
                        raise ResidencyError(f"{key} is not registered; its backend must register a loader first")
                    kind, info = ("moving", None) if rec.moving else self._decide(rec, hint, reading)
                    if kind in ("hit", "cpu"):
                        return self._grant(rec, info, hit=True, cpu=kind == "cpu")
                    if kind == "self":
                        names = ", ".join(r.key for r in info)
                        raise ResidencyError(
                            f"{key} does not fit on the GPU while this same request holds {names}; "
                            "release those leases first (a leased model is never evicted)"
                        )
                    if kind == "plan" and not self._mover_busy:
                        self._begin(info)
                        plan = info
                        break
                    if waiter is None:
                        waiter = self._enqueue(rec, info)
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self.metrics.add("timeouts")
                        self._event("timeout", key, waiter.need_bytes)
                        raise ResidencyError(
                            f"Timed out after {self.wait_timeout_s:.0f} s waiting for GPU memory for {key}: "
                            f"{waiter.reason}. Try again when they finish, or raise the VRAM cap."
                        )
                    self._cond.wait(min(remaining, 0.25))
        finally:
            if waiter is not None:
                with self._cond:
                    self._waiting.remove(waiter)
        return self._finish(
            plan, self._execute_up, grant=lambda: self._grant(rec, plan.work, hit=False, cpu=plan.cpu_fallback)
        )

    def _enqueue(self, rec: ModelRecord, info: Any) -> WaitingView:
        if len(self._waiting) >= self.max_waiting:
            self.metrics.add("busy")
            self._event("busy", rec.key)
            raise ResidencyError(
                f"busy: {len(self._waiting)} requests are already waiting for the GPU; try {rec.key} again shortly"
            )
        need, blockers = info if isinstance(info, tuple) else (rec.size(), [])
        held = ", ".join(f"{b.key} ({fmt_bytes(b.size())})" for b in blockers) or "a model being moved"
        reason = f"it needs {fmt_bytes(need)} more than is free; held by models in use: {held}"
        waiter = WaitingView(rec.key, time.time(), int(need), reason)
        self._waiting.append(waiter)
        self.metrics.add("waits")
        log.info("waiting for GPU: %s (%s)", rec.key, reason)
        return waiter

    def _grant(self, rec: ModelRecord, work: int, *, hit: bool, cpu: bool = False) -> Lease:
        me = threading.get_ident()
        if cpu and not rec.cpu_fallback:
            cap = self._budget(self._reading)[0]
            log.warning(
                "%s needs %s but the whole GPU budget is %s: running it on the CPU (slower)",
                rec.key,
                fmt_bytes(rec.size() + work),
                fmt_bytes(cap),
            )
            self.metrics.add("cpu_fallbacks")
            self._event("cpu_fallback", rec.key, rec.size() + work, detail=f"budget {fmt_bytes(cap)}")
        rec.cpu_fallback = cpu
        lease = Lease(rec, work if rec.tier == GPU else 0, me, alone=not self._leases)
        for other in self._leases:
            other.alone = False
        if lease.alone and rec.tier == GPU and not rec.custom:
            self._accel.reset_peak()
            lease.base_alloc = self._accel.allocated()
        if rec.custom and rec.tier == GPU and self._reading is not None:
            lease.probe_base = lease.probe_max = self._reading.used_bytes
        rec.leases += 1
        rec.owners.append(me)
        rec.touch(self._policy.inflation)
        self._leases.append(lease)
        self.metrics.add("hits" if hit else "misses")
        return lease

    def _release_lease(self, lease: Lease) -> None:
        rec = lease.record
        reading = self._read() if rec.custom else None
        with self._cond:
            self._leases.remove(lease)
            rec.leases -= 1
            rec.owners.remove(lease.thread)
            rec.last_use, rec.last_use_wall = time.monotonic(), time.time()
            if lease.alone and rec.tier == GPU:
                if not rec.custom:
                    rec.working_peaks.append(max(0, self._accel.peak() - lease.base_alloc))
                elif lease.probe_base is not None and reading is not None:
                    top = max(lease.probe_max or 0, reading.used_bytes)
                    rec.working_peaks.append(max(0, top - lease.probe_base))
            self._cond.notify_all()

    def _sample_leases(self, reading: CardReading | None) -> None:
        if reading is not None:
            for lease in self._leases:
                if lease.probe_max is not None:
                    lease.probe_max = max(lease.probe_max, reading.used_bytes)

    # ---- running moves ----------------------------------------------------------------------------------------
    def _begin(self, plan: _Plan) -> None:
        self._mover_busy = True
        for r in [*plan.gpu_victims, *plan.ram_victims]:
            r.moving = "down"
        if plan.target is not None and plan.action != "none":
            r = plan.target
            r.moving = "up" if plan.action in ("up", "load_gpu") else "to cpu"

    def _finish(self, plan: _Plan, execute, *, give_back: bool = False, grant=None):
        free_before = self._reading.free_bytes if give_back and self._read() is not None else None
        try:
            freed = execute(plan)
        except BaseException:
            with self._cond:
                self._end(plan)
            raise
        if give_back:
            self._give_back(freed, free_before)
        with self._cond:
            self._end(plan)
            trimmed = self._trim_pools()
            lease = grant() if grant is not None else None
            self._timeline_point(force=True)
        for pool in trimmed:
            pool.close()
        return lease

    def _trim_pools(self) -> list:
        """Host pools of models that sit on the GPU are only a head start for their next swap-down: while RAM is
        over its cap, take them away (lowest priority first). Returns the pools for the caller to close."""
        over = self._ram_used() - self.ram_cap_bytes
        if over <= 0:
            return []
        now = time.monotonic()
        owners = [r for r in self._records.values() if r.tier == GPU and r.pool is not None and not r.moving]
        owners.sort(key=lambda r: self._policy.priority(r.candidate(self._reload_s(r, RAM)), now))
        pools = []
        for r in owners:
            if over <= 0:
                break
            pools.append(r.pool)
            over -= r.pool.nbytes
            r.pool = None
        return pools

    def _end(self, plan: _Plan) -> None:
        for r in plan.records():
            r.moving = None
        self._mover_busy = False
        self._cond.notify_all()

    # ---- run() helpers, events, timeline ----------------------------------------------------------------------
    def _try_run(self, key: str, fn, hint: int | None):
        try:
            with self.use(key, working_bytes=hint) as model:
                return fn(model)
        except Exception as e:
            if not _oom(e):
                raise
            message = str(e)
        return _OOM(message, _tried_bytes(message))

    def _oom_message(self, key: str, failure: _OOM, hint: int | None) -> str:
        reading = self._read()
        with self._cond:
            rec = self._records[key]
            capacity, others, _ = self._budget(reading)
            work = rec.working_need(hint)
        tried = f"; the failing allocation was {fmt_bytes(failure.tried)}" if failure.tried else ""
        return (
            f"Out of GPU memory running {key} even after moving every idle model off the GPU: it needs about "
            f"{fmt_bytes(rec.size() + work)} (weights {fmt_bytes(rec.size())} + working {fmt_bytes(work)}){tried}; "
            f"{fmt_bytes(reading.free_bytes if reading else None)} is free on the card ({fmt_bytes(others)} used by "
            f"other programs, studio budget {fmt_bytes(capacity)}). Use a smaller input or batch, a lower "
            "precision, or close other GPU programs."
        )

    def _event(self, kind: str, key: str, nbytes: int = 0, seconds: float = 0.0, detail: str = "") -> None:
        self._events.append(Event(time.time(), kind, key, int(nbytes), seconds, detail))

    def _timeline_point(self, force: bool) -> None:
        now = time.time()
        if not force and self._timeline and now - self._timeline[-1].time < 0.5:
            return
        reading = self._reading
        others = self._budget(reading)[1]
        per_model = {r.key: r.size() for r in self._records.values() if r.tier == GPU}
        self._timeline.append(TimelinePoint(now, per_model, others, reading.free_bytes if reading else None))
