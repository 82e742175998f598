"""Pure decisions of the residency manager: no locks, no threads, no torch, no clocks.

The manager builds a `World` under its lock (plain numbers and the records as they are), calls a function here and
applies what comes back. Every function is unit-tested on synthetic records (tests/test_residency_planner.py).
- `budget`: what our models may occupy on the card right now.
- `decide`: Hit | CpuFallback | Place | Wait | Refuse for one request.
- `victims`, `plan_ram`, `plan_offload`, `plan_pressure`, `plan_oom_retry`, `plan_room`: which idle models move where.
Every plan that moves models to RAM respects the RAM cap (the victims whose pools would not fit go to disk).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from studio.residency.eviction import DISK_BW_GUESS, RAM_BW_GUESS, Candidate, choose_victims
from studio.residency.probes import CardReading
from studio.residency.state import DISK, GPU, RAM, ModelRecord, Tier

MiB = 2**20


class ResidencyError(RuntimeError):
    """A model could not be placed: the message says how many bytes were needed and free."""


class Action(StrEnum):
    NONE = "none"
    LOAD_GPU = "load_gpu"  # disk -> GPU
    UP = "up"  # pinned RAM -> GPU
    LOAD_CPU = "load_cpu"  # disk (or GPU) -> CPU: no GPU tier, or it can never fit


@dataclass
class Plan:
    target: ModelRecord | None
    action: Action = Action.NONE
    work: int = 0
    cpu_fallback: bool = False
    gpu_victims: list[ModelRecord] = field(default_factory=list)
    to_disk: set[str] = field(default_factory=set)  # GPU victims whose pool would not fit in RAM
    ram_victims: list[ModelRecord] = field(default_factory=list)
    pool_drops: list[ModelRecord] = field(default_factory=list)
    partial_room: int | None = None  # load the target partly resident in this many bytes, streaming the rest

    def records(self) -> list[ModelRecord]:
        return [*self.gpu_victims, *self.ram_victims, *([self.target] if self.target else [])]

    def empty(self) -> bool:
        return not self.records() and not self.pool_drops


@dataclass(frozen=True)
class Budget:
    capacity: int  # what our models may occupy now
    others: int  # bytes of other processes on the card
    context: int  # our CUDA context (not counted as model memory)


@dataclass(frozen=True)
class World:
    """The inputs of a decision. `extra_gpu`: working memory of current leases plus training leases' bytes."""

    records: Sequence[ModelRecord]
    capacity: int
    extra_gpu: int
    has_gpu: bool
    ram_cap: int
    extra_ram: int  # host pools of training leases
    policy: Any
    now: float

    def gpu_in_use(self) -> int:
        weights = sum(r.size() for r in self.records if r.tier == GPU or r.moving == "up")
        return weights + self.extra_gpu

    def ram_used(self) -> int:
        return sum(r.ram_bytes() for r in self.records) + self.extra_ram

    def idle(self, tier: Tier, exclude: set[str]) -> list[ModelRecord]:
        return [r for r in self.records if r.tier == tier and not r.leases and not r.moving and r.key not in exclude]


@dataclass(frozen=True)
class Hit:
    work: int


@dataclass(frozen=True)
class CpuFallback:
    work: int


@dataclass(frozen=True)
class Place:
    plan: Plan


@dataclass(frozen=True)
class Wait:
    need: int
    blockers: tuple[ModelRecord, ...] = ()
    trainers: tuple[Any, ...] = ()  # training leases that can give way (asked to yield by the manager)


@dataclass(frozen=True)
class Refuse:
    holders: tuple[str, ...]  # the request's own leases keep it out: waiting would wait for itself


Decision = Hit | CpuFallback | Place | Wait | Refuse


def budget(
    reading: CardReading | None,
    *,
    has_gpu: bool,
    card_total: int,
    reserved: int,
    vram_cap: int | None,
    reserve: int,
    pid: int | None = None,
    context: int | None = None,
) -> Budget:
    """capacity = min(card total - other processes, VRAM cap) - reserve - our CUDA context. `context`: the gauged
    figure (probes.ContextGauge) in place of this one reading's, where there is one."""
    if not has_gpu:
        return Budget(0, 0, 0)
    others = ours = 0  # ours: the CUDA context counted for this budget
    total = reading.total_bytes if reading else card_total
    own = reading.process(os.getpid() if pid is None else pid) if reading is not None and reading.per_process else None
    if own is not None:
        others = max(0, reading.used_bytes - own.used_bytes)
        ours = max(0, own.used_bytes - reserved) if context is None else context
    elif reading is not None:  # no per-process figures: our context is counted with the others
        others = max(0, reading.used_bytes - reserved)
    room = total - others - ours
    if vram_cap is not None:
        room = min(room, vram_cap - ours)
    return Budget(max(0, room - reserve), others, ours)


def reload_s(r: ModelRecord, to: Tier) -> float:
    """Measured seconds to bring `r` back to the GPU from the tier it would drop to (estimated before measured)."""
    if to == RAM and r.swap_in_s is not None:
        return r.swap_in_s
    if to == DISK and r.load_s is not None:
        return r.load_s
    return r.size() / (RAM_BW_GUESS if to == RAM else DISK_BW_GUESS)


def candidate(r: ModelRecord, tier: Tier) -> Candidate:
    to = RAM if tier == GPU else DISK
    return r.candidate(reload_s(r, to), r.size() if tier == GPU else r.ram_bytes())


def victims(w: World, tier: Tier, need: int, exclude: set[str]) -> list[ModelRecord] | None:
    """Lowest-priority idle models of `tier` freeing at least `need` bytes; None when all of them are not enough."""
    cands = [candidate(r, tier) for r in w.idle(tier, exclude)]
    chosen = choose_victims(cands, need, w.policy, w.now)
    by_key = {r.key: r for r in w.records}
    return None if chosen is None else [by_key[c.key] for c in chosen]


def decide(
    w: World,
    rec: ModelRecord,
    hint: int | None,
    *,
    yieldable: Sequence[Any] = (),
    own_trainers: Sequence[Any] = (),
    held: frozenset[int] = frozenset(),
) -> Decision:
    """What to do for a lease on `rec`. `yieldable`: training leases that may give way to this request;
    `own_trainers`: the requester's own training leases; `held`: tokens of the leases the requester holds."""
    work = rec.working_need(hint)
    if rec.parked_by is not None:  # a paused training run parked it with its state: it comes back with it
        return Wait(rec.size())
    if not w.has_gpu:
        if rec.tier == RAM:
            return Hit(work)
        plan = Plan(rec, Action.LOAD_CPU, work)
        plan_ram(w, plan, rec.size(), {rec.key})
        return Place(plan)
    if rec.tier != GPU and rec.size() + work > w.capacity:  # can never fit, even alone: run it on the CPU
        if rec.streamable and rec.tier == DISK:  # ...or partly resident, its other layers streamed from RAM
            partial = plan_partial(w, rec, work, yieldable)
            if partial is not None:
                return partial
        if rec.gpu_only:  # ...unless its weights are GPU-only: then wait for other programs to free the card
            return Wait(rec.size() + work - w.capacity)
        if rec.tier == RAM:
            return CpuFallback(work)
        return Place(Plan(rec, Action.LOAD_CPU, work, cpu_fallback=True))
    free = w.capacity - w.gpu_in_use()
    need = work - free if rec.tier == GPU else rec.size() + work - free
    if need <= 0 and rec.tier == GPU:
        return Hit(work)
    chosen = victims(w, GPU, need, {rec.key})
    if chosen is not None:
        action = {GPU: Action.NONE, RAM: Action.UP, DISK: Action.LOAD_GPU}[rec.tier]
        plan = Plan(rec, action, work, gpu_victims=chosen)
        plan_ram_for_victims(w, plan)
        return Place(plan)
    blockers = _blockers(w, rec)
    if yieldable:
        return Wait(need, blockers, tuple(yieldable))
    if (blockers or own_trainers) and all(r.leases and not r.moving and set(r.owners) <= held for r in blockers):
        return Refuse(tuple([*(r.key for r in blockers), *(t.label for t in own_trainers)]))
    if not blockers and rec.tier == GPU:
        return Hit(work)  # nothing else to free; the OOM retry in run() is the last resort
    return Wait(need, blockers)


def _blockers(w: World, rec: ModelRecord) -> tuple[ModelRecord, ...]:
    """Other models on the card that cannot leave now: leased or being moved."""
    return tuple(r for r in w.records if r.key != rec.key and r.tier == GPU and (r.leases or r.moving))


PARTIAL_MIN_SHARE = 8  # a partly resident load needs at least 1/8 of the model's size on the card


def plan_partial(w: World, rec: ModelRecord, work: int, yieldable: Sequence[Any] = ()) -> Decision | None:
    """A model larger than the budget, partly resident: every idle model leaves the card (the more layers stay, the
    faster it runs) and it gets the room that is left. Waits while leases hold what it needs; None where even the
    whole card would leave too little (it then runs on the CPU, or waits if its weights are GPU-only)."""
    least = rec.size() // PARTIAL_MIN_SHARE
    if w.capacity - work < least:
        return None
    chosen = w.idle(GPU, {rec.key})
    room = w.capacity - (w.gpu_in_use() - sum(r.size() for r in chosen)) - work
    if room < least:
        blockers = _blockers(w, rec)
        return Wait(least - room, blockers, tuple(yieldable))
    plan = Plan(rec, Action.LOAD_GPU, work, gpu_victims=chosen, partial_room=room)
    plan_ram_for_victims(w, plan)
    return Place(plan)


def plan_ram_for_victims(w: World, plan: Plan) -> None:
    """GPU victims go to pinned RAM; those whose pool would not fit under the RAM cap go to disk instead."""
    extra = sum(v.size() for v in plan.gpu_victims if v.pool is None and v.key not in plan.to_disk)
    exclude = {r.key for r in plan.records()}
    if extra and not plan_ram(w, plan, extra, exclude):
        plan.to_disk |= {v.key for v in plan.gpu_victims if v.pool is None}


def plan_ram(w: World, plan: Plan, extra: int, exclude: set[str]) -> bool:
    """Make room for `extra` bytes of RAM under the cap: first drop the host pools of models that are on the GPU
    (only a head start for their next swap-down), then move idle RAM models to disk. False if impossible."""
    over = w.ram_used() + extra - w.ram_cap
    over -= sum(r.ram_bytes() for r in plan.ram_victims) + sum(r.pool.nbytes for r in plan.pool_drops if r.pool)
    if over <= 0:
        return True
    drops = [r for r in w.records if r.tier == GPU and r.pool is not None and not r.moving]
    drops = [r for r in drops if r.key not in exclude and r not in plan.pool_drops]
    drops.sort(key=lambda r: w.policy.priority(candidate(r, GPU), w.now))
    chosen = []
    for r in drops:
        if over <= 0:
            break
        chosen.append(r)
        over -= r.pool.nbytes
    more = victims(w, RAM, over, exclude | {r.key for r in plan.ram_victims}) if over > 0 else []
    if more is None:
        return False
    plan.pool_drops += chosen
    plan.ram_victims += more
    return True


def plan_offload(
    w: World, key: str | None, *, to_disk: bool, exclude: set[str], tiers: Sequence[Tier] = (GPU, RAM)
) -> Plan:
    """Move one idle model (or all idle ones) one tier down, or straight to disk; the RAM cap holds."""
    plan = Plan(None)
    for r in w.records:
        if (key is not None and r.key != key) or r.leases or r.moving or r.key in exclude:
            continue
        if r.tier == GPU and GPU in tiers:
            plan.gpu_victims.append(r)
            if to_disk or not w.has_gpu:
                plan.to_disk.add(r.key)
        elif r.tier == RAM and RAM in tiers:
            plan.ram_victims.append(r)
    plan_ram_for_victims(w, plan)
    return plan


def plan_oom_retry(w: World, plan: Plan) -> list[ModelRecord]:
    """After an out-of-memory error placing `plan.target`: every other idle GPU model joins the victims (the RAM
    cap holds: those that do not fit in RAM go to disk). Returns the new victims."""
    extra = w.idle(GPU, {r.key for r in plan.records()})
    plan.gpu_victims += extra
    plan_ram_for_victims(w, plan)
    return extra


def plan_pressure(
    w: World, keep_alive_s: float | None, idle_for: Callable[[ModelRecord], float]
) -> tuple[Plan, list[tuple[str, str, int, str]]]:
    """Idle models that must move down now: the budget is exceeded (other programs, a lower cap), they have been
    idle past keep-alive, or RAM is over its cap. Returns the plan and events (kind, key, bytes, detail)."""
    plan, events = Plan(None), []
    if w.has_gpu:
        over = w.gpu_in_use() - w.capacity
        if over > 0:
            chosen = victims(w, GPU, over, set()) or w.idle(GPU, set())
            plan.gpu_victims += chosen
            if chosen:
                events.append(("pressure", ",".join(v.key for v in chosen), over, ""))
    if keep_alive_s:
        tier = GPU if w.has_gpu else RAM
        for r in w.idle(tier, {v.key for v in plan.gpu_victims}):
            if idle_for(r) > keep_alive_s:
                (plan.gpu_victims if tier == GPU else plan.ram_victims).append(r)
                events.append(("keep_alive", r.key, r.size(), f"idle {idle_for(r):.0f} s"))
    if plan.gpu_victims:
        plan_ram_for_victims(w, plan)
    if w.ram_used() - w.ram_cap > 0:
        plan_ram(w, plan, 0, {r.key for r in plan.records()})
    return plan, events


def plan_room(w: World, nbytes: int, *, others_hold: bool) -> Plan | bool | None:
    """Room for `nbytes` more on the GPU (a training lease coming back). None: it fits; a plan: move these idle
    models down first; False: wait (leases hold the memory). Without anything to wait for it goes ahead (None)."""
    need = nbytes - (w.capacity - w.gpu_in_use())
    if need <= 0:
        return None
    chosen = victims(w, GPU, need, set())
    if chosen:
        plan = Plan(None, gpu_victims=chosen)
        plan_ram_for_victims(w, plan)
        return plan
    return False if others_hold else None


def trim_pools(w: World) -> list[ModelRecord]:
    """While RAM is over its cap, the host pools of models on the GPU go (lowest priority first)."""
    over = w.ram_used() - w.ram_cap
    if over <= 0:
        return []
    owners = [r for r in w.records if r.tier == GPU and r.pool is not None and not r.moving]
    owners.sort(key=lambda r: w.policy.priority(candidate(r, GPU), w.now))
    chosen = []
    for r in owners:
        if over <= 0:
            break
        chosen.append(r)
        over -= r.pool.nbytes
    return chosen


def default_ram_cap(has_gpu: bool) -> int:
    """A quarter of physical RAM for parked models on a GPU machine; half of it when the CPU is the only tier."""
    import psutil  # os.sysconf has no SC_PHYS_PAGES on Windows

    total = psutil.virtual_memory().total
    return total // 4 if has_gpu else total // 2


def tried_bytes(message: str) -> int | None:
    m = re.search(r"Tried to allocate ([\d.]+) ?(KiB|MiB|GiB|TiB|bytes)", message)
    if not m:
        return None
    scale = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
    return int(float(m.group(1)) * scale.get(m.group(2), 1))
