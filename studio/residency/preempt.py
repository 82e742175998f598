"""The manager's side of preemptible training leases (studio/residency/training.py has the trainer's side).

`Preemption` is owned by one ResidencyManager and works under its lock (`manager._cond`): it keeps the list of
training leases, counts their bytes, asks them to yield for a waiting interactive request, and finds room for them
when they come back (after every waiting request is placed; idle models are moved down for them, leased ones never).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from studio.residency import pinned, planner
from studio.residency.state import GPU, RAM, held_tokens
from studio.residency.training import TrainingLease, TrainState, state_tensors, tensor_bytes
from studio.units import fmt_bytes

log = logging.getLogger("studio.residency")
MiB = 2**20
TAB_NAMES = {
    "llm": "Chat",
    "asr": "Transcribe",
    "vad": "Transcribe",
    "speaker": "Transcribe",
    "diffusion": "Image",
    "sd": "Image",
    "yolo": "Detection",
    "detection": "Detection",
    "embed": "RAG",
    "reranker": "RAG",
    "rag": "RAG",
    "tinylm": "Tiny LM",
    "vlm": "Vision chat",
}


def request_label(key: str) -> str:
    """ "Chat" for "llm:<id>", ...: what the job and the GPU tab say a training run paused for."""
    return TAB_NAMES.get(key.split(":", 1)[0], key)


class Preemption:
    def __init__(self, manager: Any) -> None:  # manager: the ResidencyManager that owns this
        self.m = manager
        self.leases: list[TrainingLease] = []

    # ---- accounting (lock held) ------------------------------------------------------------------------------
    def gpu_bytes(self) -> int:
        return sum(t.gpu_bytes() for t in self.leases)

    def ram_bytes(self) -> int:
        return sum(t._pool.nbytes for t in self.leases if t._pool is not None)

    def running(self) -> bool:
        return any(t.gpu_bytes() > 0 for t in self.leases)

    def yieldable(self, me: Any) -> list[TrainingLease]:
        """Running leases that could give way to a request from `me` (never the requester's own training)."""
        return [t for t in self.leases if t.state == TrainState.RUNNING and t.gpu_bytes() > 0 and t._owner != me]

    def ask_to_yield(self, leases: list[TrainingLease], key: str) -> None:
        for t in leases:
            if t.yield_to is None:
                t.yield_to = request_label(key)
                self.m._event("train_yield", t.key, t.gpu_bytes(), detail=f"{t.label}: {key} is waiting")
                log.info("training %s asked to pause for %s", t.label, key)

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def begin(self, lease: TrainingLease) -> None:
        m = self.m
        with m._cond:
            self.leases.append(lease)
            if lease._noop:
                lease.state = TrainState.RUNNING
                return
        t0 = time.monotonic()
        accel = m._accel
        host = []
        if accel.device != "cpu":  # a real device: modules still in host memory are placed like a paused lease
            host = state_tensors(lease.modules, [], lambda t: t.device.type == "cpu" and not accel.on_device(t))
        if host:
            lease._pool = pinned.adopt(host, None, accel.host_buffer)
            with m._cond:
                lease.state = TrainState.PAUSED
                lease.state_bytes = tensor_bytes(host) + tensor_bytes(lease._tensors())
                lease.working = self._working(lease)
                lease.paused_for, lease.paused_since = "room on the GPU", t0
            lease._resume(None, t0)
            lease.pauses, lease.paused_s = 0, 0.0  # placing it at the start is not a pause
            return
        nbytes = tensor_bytes(lease._tensors())
        with m._cond:
            rec = m._records.get(lease.key)
            if rec is not None and rec.tier == GPU and rec.leases:  # the trainer holds it: its weights are counted
                lease.record = rec
                held = held_tokens()
                for x in m._leases:  # the trainer's own lease on it: the training lease counts the working memory
                    if x.record is rec and x.token in held:
                        x.working = 0
            lease.state_bytes = self._own_bytes(lease, nbytes)
            lease.working = self._working(lease)
            lease.state = TrainState.RUNNING
            self.disturb()
            m._event("train_start", lease.key, lease.need_bytes(), detail=lease.label)
        m._make_room_now()

    def end(self, lease: TrainingLease) -> None:
        with self.m._cond:
            lease.state = TrainState.ENDED
            if lease in self.leases:
                self.leases.remove(lease)
            self.m._event("train_end", lease.key, 0, lease.paused_s, detail=f"{lease.label}: {lease.pauses} pauses")
            self.m._cond.notify_all()

    @staticmethod
    def _own_bytes(lease: TrainingLease, nbytes: int) -> int:
        """Bytes of the lease's tensors, less the weights its registered model already counts."""
        return max(0, nbytes - (lease.record.size() if lease.record is not None else 0))

    def _working(self, lease: TrainingLease) -> int:
        if lease.declared_working is not None:
            return max(lease.declared_working, max(lease.measured, default=0))
        if lease.measured:
            return max(lease.measured)
        return max(32 * MiB, lease.state_bytes // 10)  # a guess until its first steps are measured

    # ---- measuring its working memory (first steps) ----------------------------------------------------------
    def measure_start(self, lease: TrainingLease) -> int | None:
        m = self.m
        with m._cond:
            others = len(m._leases) > self._record_leases(lease)
            if others or any(t is not lease and t.gpu_bytes() for t in self.leases):
                return None  # someone else's allocations would be counted as ours
            m._accel.reset_peak()
            return m._accel.allocated()

    def measure_end(self, lease: TrainingLease, base: int | None) -> None:
        m = self.m
        base = None if base is not None and base < 0 else base
        if lease.steps >= 3 and base is None:
            return
        nbytes = tensor_bytes(lease._tensors())  # optimizer state appears after the first step
        with m._cond:
            lease.state_bytes = self._own_bytes(lease, nbytes)
            if base is not None and len(m._leases) <= self._record_leases(lease):
                lease.measured.append(max(0, m._accel.peak() - base))
            lease.working = self._working(lease)

    # ---- pausing and coming back -----------------------------------------------------------------------------
    def paused(self, lease: TrainingLease, copied: int, seconds: float) -> None:
        m = self.m
        with m._cond:
            lease.state = TrainState.PAUSED
            self._park_record(lease)
            m._releases += 1  # a request that ran out of memory placing may try again
            m.metrics.add("training_pauses")
            m.metrics.switch("training gpu->ram", seconds)
            m._event("train_pause", lease.key, copied, seconds, detail=f"{lease.label} paused for {lease.paused_for}")
            m._cond.notify_all()
        log.info("training %s paused for %s: %s parked in %.3f s", lease.label, lease.paused_for,
                 fmt_bytes(copied), seconds)  # fmt: skip

    def _record_leases(self, lease: TrainingLease) -> int:
        return sum(1 for x in self.m._leases if lease.record is not None and x.record is lease.record)

    def _park_record(self, lease: TrainingLease) -> None:
        """The trained model's weights went to pinned RAM with the training state: the record says so, and the
        working memory its leases set aside is given back until it resumes (lock held)."""
        rec = lease.record
        if rec is None:
            return
        rec.tier, rec.device, rec.parked_by = RAM, "cpu", lease
        rec.generation += 1
        if rec.pool is not None:
            rec.pool.synced = None  # its tensors moved without it: the next swap-down copies everything
        for x in self.m._leases:
            if x.record is rec:
                x.saved_working, x.working = x.working, 0

    def _unpark_record(self, lease: TrainingLease) -> None:
        rec = lease.record
        if rec is None or rec.parked_by is not lease:
            return
        rec.tier, rec.device, rec.parked_by = GPU, self.m._accel.device, None
        rec.generation += 1
        for x in self.m._leases:
            if x.record is rec:
                x.working = x.saved_working

    def wait_for_room(self, lease: TrainingLease) -> None:
        """Block until no interactive request waits and the lease's bytes fit (moving idle models down)."""
        m = self.m
        while True:
            reading = m._read()
            with m._cond:
                plan: Any = False
                if not m._waiting and not m._mover_busy:
                    others = bool(m._leases) or any(t is not lease and t.gpu_bytes() for t in self.leases)
                    plan = planner.plan_room(m._world(reading), lease.need_bytes(), others_hold=others)
                if plan is None:
                    lease.state, lease.yield_to = TrainState.RESUMING, None
                    self.disturb()  # its upload lands in the peaks of the leases running now
                    return
                if plan is False:
                    m._cond.wait(0.25)
                    continue
                m._exec.begin(plan)
            m._exec.run(plan, up=False)  # the room is for our own trainer: no waiting to see the card show it free

    def disturb(self) -> None:
        """A trainer allocates on the card (starting, resuming; lock held): no running lease may take what it
        allocates for its own working memory (a chat lease would then reserve gigabytes for itself ever after)."""
        self.m._moves += 1
        for other in self.m._leases:
            other.alone = False

    def requeue(self, lease: TrainingLease) -> None:
        with self.m._cond:
            lease.state = TrainState.PAUSED
            self.m._cond.notify_all()

    failed = requeue

    def resumed(self, lease: TrainingLease, total_s: float, upload_s: float) -> None:
        m = self.m
        with m._cond:
            lease.state = TrainState.RUNNING
            self._unpark_record(lease)
            lease.paused_s += total_s
            lease.pauses += 1
            reason, lease.paused_for, lease.paused_since = lease.paused_for, None, None
            m.metrics.switch("training ram->gpu", upload_s)
            m._event("train_resume", lease.key, lease.need_bytes(), total_s, detail=f"{lease.label} after {reason}")
            m._cond.notify_all()
        log.info("training %s resumed after %.2f s paused for %s", lease.label, total_s, reason)
