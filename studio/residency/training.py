"""Preemptible training leases: one interface for every trainer that shares the card with interactive requests.

    with ctx.residency.training(key, modules=[model], optimizers=[opt], working_bytes=None, label="Fine-tune") as lease:
        for step in range(n):
            with lease.step():          # may block first: an interactive request is waiting
                loss = train_step()
            lease.report(step=step, loss=loss)
        # lease.paused_s, lease.pauses

What the manager counts for a running lease: the bytes of the trainer's tensors on the compute device (module
parameters, buffers and gradients, optimizer state) plus its working memory (the caller's `working_bytes`, else the
peak measured over its first steps). An interactive request that does not fit because a running training lease holds
the memory asks it to yield; at its next step boundary (`lease.step()` entry) the trainer
1. saves the RNG state (torch CPU, every CUDA device, Python `random`, NumPy),
2. parks its tensors in a pinned host pool (`pinned.park`: identity kept, only `.data` moves; optimizers and tied
   weights stay valid),
3. stops being counted, so the request is placed and runs,
4. waits until no request is waiting and its bytes fit again (idle models are moved down for it),
5. uploads its tensors (one allocation, one copy), restores the RNG state and goes on.
Nothing about the numbers changes: the same seed gives the same loss curve paused or not.
Entering the lease with modules still in host memory (a GPU machine) places them on the device the same way.
Without a GPU tier the lease is a cheap no-op (nothing waits for GPU memory there).
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch

from studio.residency import pinned
from studio.residency.accel import is_oom_error
from studio.residency.planner import ResidencyError
from studio.residency.state import hold, new_token, unhold
from studio.units import fmt_bytes

log = logging.getLogger("studio.residency")
MEASURE_STEPS = 3  # steps whose peak working memory is measured when the caller gives no `working_bytes`
UPLOAD_RETRIES = 3


class TrainState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    PAUSING = "pausing"
    PAUSED = "paused"
    RESUMING = "resuming"
    ENDED = "ended"


@dataclass(frozen=True)
class RngState:
    cpu: torch.Tensor
    cuda: list[torch.Tensor] | None
    python: Any
    numpy: Any


def capture_rng(cuda: bool) -> RngState:
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy is a dependency
        np_state = None
    cuda_state = torch.cuda.get_rng_state_all() if cuda and torch.cuda.is_initialized() else None
    return RngState(torch.get_rng_state(), cuda_state, random.getstate(), np_state)


def restore_rng(state: RngState) -> None:
    torch.set_rng_state(state.cpu)
    if state.cuda is not None:
        torch.cuda.set_rng_state_all(state.cuda)
    random.setstate(state.python)
    if state.numpy is not None:
        import numpy as np

        np.random.set_state(state.numpy)


def state_tensors(modules: Sequence[Any], optimizers: Sequence[Any], on_compute) -> list[torch.Tensor]:
    """Every tensor a trainer owns on the compute device, each object once, in a fixed order: module tensors
    (parameters, buffers, tensor attributes), parameter gradients, then optimizer state."""
    seen: set[int] = set()
    out: list[torch.Tensor] = []

    def add(t: Any) -> None:
        ok = isinstance(t, torch.Tensor) and id(t) not in seen and t.layout == torch.strided and not t.is_meta
        if ok and on_compute(t):
            seen.add(id(t))
            out.append(t)

    for m in modules:
        for t in pinned.tensor_slots(m):
            add(t)
        for root in pinned.model_modules(m):
            for p in root.parameters():
                add(p.grad)
    for opt in optimizers:
        for group_state in opt.state.values():
            for value in group_state.values() if isinstance(group_state, dict) else []:
                add(value)
    return out


def tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class TrainingLease:
    """One trainer's claim on the card; see the module docstring. Made by `ResidencyManager.training()`."""

    def __init__(
        self,
        manager: Any,  # the ResidencyManager
        key: str,
        modules: Sequence[Any],
        optimizers: Sequence[Any],
        working_bytes: int | None,
        label: str,
        job: Any = None,
    ) -> None:
        if working_bytes is not None and working_bytes < 0:
            raise ValueError(f"working_bytes must be >= 0 or None, got {working_bytes}")
        self.key, self.label = key, label or key
        self.modules, self.optimizers = list(modules), list(optimizers)
        self.declared_working = working_bytes
        self.paused_s, self.pauses, self.steps = 0.0, 0, 0
        self.metrics: dict[str, Any] = {}
        self.started = time.time()
        # fields below are guarded by the manager's lock
        self.state = TrainState.STARTING
        self.state_bytes = 0  # bytes of its tensors on the device
        self.working = working_bytes or 0
        self.measured: list[int] = []
        self.yield_to: str | None = None  # set by the manager: who is waiting for this lease's memory
        self.paused_for: str | None = None
        self.paused_since: float | None = None
        self._manager, self._job = manager, job
        self._pool: pinned.PinnedPool | None = None
        self._noop = not manager._accel.has_gpu_tier
        self.record: Any = None  # the registered model being trained, when `key` names one (its weights are its)
        self._open_step: int | None = None  # boundary(): the measuring base of the step in progress (-1: none)
        self._owner = new_token()

    # ---- what the manager counts ---------------------------------------------------------------------------
    def gpu_bytes(self) -> int:
        """Bytes this lease holds on the card now (0 while paused)."""
        if self._noop or self.state in (TrainState.PAUSED, TrainState.STARTING, TrainState.ENDED):
            return 0
        return self.state_bytes + self.working

    def need_bytes(self) -> int:
        parked = self.record.size() if self.record is not None and self.record.parked_by is self else 0
        return self.state_bytes + self.working + parked

    @property
    def device(self) -> str:
        """Where the trainer's tensors and batches live."""
        return self._manager.device

    @property
    def paused(self) -> bool:
        return self.state in (TrainState.PAUSING, TrainState.PAUSED, TrainState.RESUMING)

    def status(self) -> str:
        """A short line for the job and the GPU tab: "running", "paused for Chat, 3 s", ..."""
        if self.paused and self.paused_since is not None:
            return f"paused for {self.paused_for}, {time.monotonic() - self.paused_since:.0f} s"
        tail = f" (paused {self.pauses}x, {self.paused_s:.0f} s in all)" if self.pauses else ""
        return f"{self.state.value}{tail}"

    # ---- the trainer's side --------------------------------------------------------------------------------
    def __enter__(self) -> TrainingLease:
        hold(self._owner)
        self._manager._preempt.begin(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.state == TrainState.ENDED:
            return  # already ended (a callback-driven trainer may end it twice)
        unhold(self._owner)
        self._manager._preempt.end(self)
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """One training step. At its start the lease gives way if an interactive request waits for its memory."""
        if self._noop:
            yield
            self.steps += 1
            return
        if self.yield_to is not None:
            self._pause_and_resume()
        base = self._manager._preempt.measure_start(self) if len(self.measured) < MEASURE_STEPS else None
        yield
        self._manager._preempt.measure_end(self, base)
        self.steps += 1

    def boundary(self) -> None:
        """A step boundary for trainers driven by callbacks (Ultralytics' on_train_batch_end), where no `with` block
        can wrap a step: ends the step that ran since the last boundary and starts the next one, giving way first
        when an interactive request waits. Equivalent to consecutive `with lease.step():` blocks."""
        if self._noop:
            self.steps += 1
            return
        if self._open_step is not None:
            self._manager._preempt.measure_end(self, self._open_step)
            self.steps += 1
        if self.yield_to is not None:
            self._pause_and_resume()
        base = self._manager._preempt.measure_start(self) if len(self.measured) < MEASURE_STEPS else None
        self._open_step = base if base is not None else -1

    def report(self, **metrics: Any) -> None:
        """Latest metrics (step, loss, ...) for the GPU tab and the job."""
        self.metrics.update(metrics)

    # ---- pausing ---------------------------------------------------------------------------------------------
    def on_compute(self, t: torch.Tensor) -> bool:
        return t.device.type == torch.device(self._manager._accel.device).type

    def _tensors(self) -> list[torch.Tensor]:
        return state_tensors(self.modules, self.optimizers, self.on_compute)

    def _pause_and_resume(self) -> None:
        mgr, accel = self._manager, self._manager._accel
        t0 = time.monotonic()
        accel.synchronize()
        rng = capture_rng(accel.kind == "cuda")
        with mgr._cond:
            reason = self.yield_to or "another request"
            self.state, self.paused_for, self.paused_since = TrainState.PAUSING, reason, t0
        self._notify_job()
        tensors = self._tensors()
        facts = pinned.park(tensors, self._pool, accel, accel.host_buffer)
        self._pool = facts.pool
        del tensors  # only views of the pool remain
        mgr._preempt.paused(self, facts.copied, time.monotonic() - t0)
        accel.empty_cache()  # the trainer's freed blocks go back to the card for the waiting request
        self._resume(rng, t0)

    def _resume(self, rng: RngState | None, t0: float) -> None:
        mgr, accel = self._manager, self._manager._accel
        for attempt in range(UPLOAD_RETRIES + 1):
            mgr._preempt.wait_for_room(self)
            tensors = self._tensors_in_pool()
            if self._pool is None or len(tensors) != len(self._pool.layout):
                raise ResidencyError(f"training {self.label}: its tensors changed while it was paused")
            t1 = time.perf_counter()
            try:
                pinned.upload(tensors, self._pool, accel)
                break
            except Exception as e:
                if not is_oom_error(e) or attempt == UPLOAD_RETRIES:
                    mgr._preempt.failed(self)
                    raise ResidencyError(
                        f"Out of GPU memory bringing training {self.label} back: it needs "
                        f"{fmt_bytes(self.need_bytes())} ({e})"
                    ) from e
                log.warning("training %s: out of memory coming back (%s); waiting and retrying", self.label, e)
                mgr._preempt.requeue(self)
                accel.empty_cache()
        if rng is not None:
            restore_rng(rng)
        mgr._preempt.resumed(self, time.monotonic() - t0, time.perf_counter() - t1)
        self._notify_job()

    def _tensors_in_pool(self) -> list[torch.Tensor]:
        """The parked tensors, in pool order (they are views of the pool, so `on_compute` may not see them)."""
        everything = state_tensors(self.modules, self.optimizers, lambda t: True)
        return [t for t in everything if self._pool is not None and _in_pool(t, self._pool)]

    def _notify_job(self) -> None:
        if self._job is not None and hasattr(self._job, "note_pause"):
            self._job.note_pause(self.paused_for if self.paused else None, self.paused_s)


def _in_pool(t: torch.Tensor, pool: pinned.PinnedPool) -> bool:
    base = pool.host.tensor.data_ptr()
    return t.device.type == "cpu" and base <= t.data_ptr() < base + max(pool.total, 1)
