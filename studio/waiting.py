"""Who holds each shared work queue now, so a request that waits can say why.

Gradio's queue only shows "queue: 1/1"; a tab's handler wraps its work in `queues.hold(queue_id, label)` and the
quick (unqueued) step in front of a queued event asks `queues.why_wait(queue_id)` for a line such as
"waiting for the GPU: transcription (Audio), running 12 s, ~28 s left". The typical duration per label is a running
mean of the holds seen so far. Background GPU jobs (training) and the residency manager's waiting view add their
own lines.

On a machine without CUDA there is no GPU to share: every tab gets its own queue id ("cpu-<tab>"), so a chat does
not wait behind a transcription that does not need the same device slot (each still runs one at a time).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

GPU_QUEUE = "gpu"


@dataclass(frozen=True)
class Holder:
    label: str  # what runs, in the user's words: "transcription (Audio)"
    since: float  # wall time
    session: str | None


class WorkQueues:
    """One per studio: the queue ids for Gradio events and what holds each of them."""

    def __init__(self, has_gpu: bool) -> None:
        self.has_gpu = has_gpu
        self._lock = threading.Lock()
        self._holders: dict[int, tuple[str, Holder]] = {}
        self._ids = itertools.count()
        self._typical: dict[str, tuple[float, int]] = {}  # label -> (mean seconds, count)

    def queue_id(self, tab: str) -> str:
        return GPU_QUEUE if self.has_gpu else f"cpu-{tab.lower().replace(' ', '-')}"

    def event_kwargs(self, tab: str) -> dict[str, Any]:
        """kwargs for a Gradio event that needs the device: one at a time per queue id."""
        return {"concurrency_id": self.queue_id(tab), "concurrency_limit": 1}

    @contextlib.contextmanager
    def hold(self, queue_id: str, label: str, session: str | None = None) -> Iterator[None]:
        """Mark `queue_id` as held by `label` for the duration of the block (generators: across their yields)."""
        key, start = next(self._ids), time.time()
        with self._lock:
            self._holders[key] = (queue_id, Holder(label, start, session))
        try:
            yield
        finally:
            with self._lock:
                self._holders.pop(key, None)
                mean, n = self._typical.get(label, (0.0, 0))
                self._typical[label] = ((mean * n + time.time() - start) / (n + 1), n + 1)

    def holders(self, queue_id: str) -> list[Holder]:
        with self._lock:
            return [h for q, h in self._holders.values() if q == queue_id]

    def why_wait(self, queue_id: str, session: str | None = None, now: float | None = None) -> str:
        """'' when the queue is free; else one line per holder saying what runs and for about how long."""
        now = time.time() if now is None else now
        what = "the GPU" if queue_id == GPU_QUEUE else "the CPU slot of this tab"
        lines = []
        for h in self.holders(queue_id):
            who = "this browser tab" if session is not None and h.session == session else "another tab or window"
            ran = now - h.since
            mean, n = self._typical.get(h.label, (0.0, 0))
            left = f", ~{max(1.0, mean - ran):.0f} s left" if n and mean > ran else ""
            lines.append(f"⏳ waiting for {what}: {h.label} in {who}, running {ran:.0f} s{left}")
        return "  \n".join(lines)


def explain_wait(ctx: Any, queue_id: str, session: str | None = None) -> str:
    """why_wait plus the GPU jobs running in the background and the models the residency manager is waiting for."""
    lines = [ctx.queues.why_wait(queue_id, session)] if ctx.queues.why_wait(queue_id, session) else []
    if queue_id == GPU_QUEUE:
        for job in ctx.jobs.active():
            if job.gpu and job.status == "running":
                lines.append(f"⏳ the GPU is shared with a background job: {job.name} ({job.progress:.0%})")
        for w in ctx.residency.snapshot().waiting:
            lines.append(f"⏳ waiting for GPU memory: {w.key} ({w.reason})")
    return "  \n".join(lines)
