"""The planner the studio runs with: formulas + learned corrections + the jobs backends declared per model key.

The residency manager owns one (`manager.vram`). A backend declares the job before it takes its lease
(`manager.vram.declare(key, model_info, task)`); then
- the manager reports every trustworthy measurement of that key (`observe`: weights at load, working peak per
  lease) and the planner stores it beside its prediction for that family and shape (store.py), which corrects
  later estimates of the family;
- an out-of-memory error on that key carries `advice(key, budget)`: the job's needs and the nearest setting that
  fits, with numbers (plan.oom_advice).
Declarations are kept per key (the last one wins); a key nobody declared learns nothing and gets no advice.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from studio.planner.models import ModelInfo
from studio.planner.plan import Estimate, oom_advice, plan
from studio.planner.store import Footprint, FootprintStore
from studio.planner.tasks import Task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    model: ModelInfo
    task: Task
    predicted: Estimate  # raw formula, no correction: the store compares measurements with the formula itself

    @property
    def family(self) -> str:
        return family_of(self.model, self.task)


def family_of(model: ModelInfo, task: Task) -> str:
    return f"{model.family}:{task.kind}"


class VramPlanner:
    def __init__(self, store: FootprintStore | None = None) -> None:
        self.store = store if store is not None else FootprintStore(None)
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    @classmethod
    def at(cls, data_dir: Path) -> VramPlanner:
        return cls(FootprintStore(Path(data_dir) / "planner" / "footprints.json"))

    def plan(self, model: ModelInfo, task: Task, budget: int | None = None, *, learn: bool = True) -> Estimate:
        """The estimate for `task`, corrected by what was measured for its family (unless `learn` is False)."""
        corr = (lambda m, t: self.store.correction(family_of(m, t))) if learn else None
        return plan(model, task, budget, correction=corr)

    def declare(self, key: str, model: ModelInfo, task: Task) -> Estimate:
        """Backends call this before leasing `key` for `task`; returns the (corrected) estimate."""
        job = Job(model, task, plan(model, task))
        with self._lock:
            self._jobs[key] = job
        return self.plan(model, task)

    def job(self, key: str) -> Job | None:
        with self._lock:
            return self._jobs.get(key)

    def observe(self, key: str, weights: int, working_peak: int | None) -> Footprint | None:
        """A trustworthy measurement of `key` from the residency manager: its weights, and what the job held beyond
        them at the lease's peak (buffers it keeps between leases included); stored when a job was declared."""
        job = self.job(key)
        if job is None or not weights:
            return None
        parts = job.predicted.parts
        fp = Footprint(job.family, f"{job.model.shape_label}; {job.task.label()}", key, parts["weights"], int(weights),
                       job.predicted.total - parts["weights"], int(working_peak or 0), time.time())  # fmt: skip
        self.store.add(fp)
        log.info("footprint %s (%s): weights %d measured / %d predicted, working %d / %d", key, fp.family,
                 fp.measured_weights, fp.predicted_weights, fp.measured_working, fp.predicted_working)  # fmt: skip
        return fp

    def advice(self, key: str, budget: int | None) -> str:
        """The planner's sentence for an out-of-memory error on `key` ('' when no job was declared for it)."""
        job = self.job(key)
        if job is None:
            return ""
        try:
            return oom_advice(self.plan(job.model, job.task, budget))
        except (ValueError, KeyError) as e:  # advice must never hide the error it decorates
            log.warning("no planner advice for %s: %s", key, e)
            return ""
