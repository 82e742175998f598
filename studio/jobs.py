"""Background jobs (training, ingestion, downloads): progress, logs, cooperative cancel, one GPU job at a time.

A job is a function `fn(job) -> result` run in a worker thread. It reports with `job.set_progress(f, msg)` and
`job.log(msg)`, and polls `job.should_stop()`; when that turns true it saves what it has and returns (the job then
ends as "cancelled"). At most one `gpu=True` job runs at a time; the others wait with status "queued" and their
place in the queue in `job.message`. CPU jobs (`gpu=False`) start at once and run side by side.

Jobs belong to the process, not to a browser session: closing the browser tab does NOT stop a job; it keeps
running and its state is visible again in the Runs tab on the next visit. When the app itself shuts down
(Ctrl+C, window closed, `JobRunner.shutdown`), every job is asked to stop and given `timeout` seconds to save.
A failing `fn` marks its job "failed" (error message in `job.error`, traceback in `job.logs`) and never takes
the runner down.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = frozenset({DONE, FAILED, CANCELLED})
MAX_LOG_LINES = 1000
_current = threading.local()


def current_job() -> Job | None:
    """The job whose function runs on this thread (None outside a job): how a training lease finds its job."""
    return getattr(_current, "job", None)


class Job:
    """One unit of background work; its fields are read by the UI while the worker thread updates them."""

    def __init__(self, job_id: str, name: str, fn: Callable[[Job], Any], gpu: bool, max_logs: int = MAX_LOG_LINES):
        self.id = job_id
        self.name = name
        self.gpu = gpu
        self.fn = fn
        self.status = QUEUED
        self.unique: str | None = None  # JobRunner.submit(unique=...): one such job at a time
        self.progress = 0.0
        self.message = ""
        self.result: Any = None
        self.error: str | None = None
        self.created = time.time()
        self.started: float | None = None
        self.finished: float | None = None
        self.paused_for: str | None = None  # set by a training lease while it gives way to an interactive request
        self.paused_s = 0.0
        self.pauses = 0
        self._message_before_pause = ""
        self._paused_since = 0.0
        self._logs: deque[str] = deque(maxlen=max_logs)
        self._stop = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()

    # ---- called by the job function --------------------------------------------------------------------
    def set_progress(self, fraction: float, message: str = "") -> None:
        self.progress = min(1.0, max(0.0, float(fraction)))
        if message:
            self.message = message

    def log(self, msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        with self._lock:
            self._logs.append(line)
        log.info("job %s (%s): %s", self.id, self.name, msg)

    def should_stop(self) -> bool:
        return self._stop.is_set()

    def note_pause(self, reason: str | None, paused_s: float) -> None:
        """Called by the job's training lease: `reason` ("Chat") while it has given way, None when it resumed."""
        if reason is not None:
            self._message_before_pause, self.paused_for = self.message, reason
            self._paused_since = time.monotonic()
            self.message = f"paused for {reason}"
            self.log(f"paused for {reason} (an interactive request needs the GPU)")
            return
        if self.paused_for is not None:
            self.pauses += 1
            spent, self.paused_s = paused_s - self.paused_s, paused_s
            self.log(f"resumed after {spent:.1f} s paused for {self.paused_for}")
            self.message = self._message_before_pause
        self.paused_for = None

    @property
    def pause_text(self) -> str:
        """ "paused for Chat, 3 s" while paused; "paused 2x for 3 s in all" after; "" when it never paused."""
        if self.paused_for is not None:
            return f"paused for {self.paused_for}, {time.monotonic() - self._paused_since:.0f} s"
        return f"paused {self.pauses}x, {self.paused_s:.0f} s in all" if self.pauses else ""

    # ---- read by anyone ------------------------------------------------------------------------------
    @property
    def logs(self) -> list[str]:
        with self._lock:
            return list(self._logs)

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job has finished (done, failed or cancelled); False if `timeout` ran out first."""
        return self._done.wait(timeout)

    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.finished or time.time()) - self.started

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "gpu": self.gpu,
            "status": self.status,
            "progress": self.progress,
            "message": self.message,
            "error": self.error,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "paused": self.pause_text,
        }

    def __repr__(self) -> str:
        return f"Job({self.id!r}, {self.name!r}, status={self.status!r}, progress={self.progress:.2f})"

    # ---- internal ------------------------------------------------------------------------------------
    def _finish(self, status: str) -> None:
        self.status = status
        self.finished = time.time()
        if status == DONE:
            self.progress = 1.0
        self._done.set()


class JobRunner:
    """Runs jobs in daemon threads; a single dispatcher thread hands the GPU to one queued GPU job at a time."""

    def __init__(self, max_jobs_kept: int = 200, exit_timeout: float = 30.0) -> None:
        self._jobs: dict[str, Job] = {}
        self._gpu_queue: deque[Job] = deque()
        self._gpu_busy = False
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._max_kept = max_jobs_kept
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._exit_timeout = exit_timeout
        # At interpreter exit (after Ctrl+C or window close) running jobs still get the chance to save.
        ref = weakref.ref(self)
        atexit.register(lambda: (r := ref()) is not None and r.shutdown(r._exit_timeout))

    def submit(self, name: str, fn: Callable[[Job], Any], *, gpu: bool = True, unique: str | None = None) -> Job:
        """Queue `fn` to run in the background; returns its Job at once. With `unique`, while a job of that key is
        queued or running, submitting again returns that job and queues nothing: a double-clicked Train (or a second
        session asking for the same run) follows the run already started, as one run. Once it ended, the key is free.
        """
        with self._cond:
            if self._closed:
                raise RuntimeError("The job runner is shut down; no new jobs are accepted.")
            busy = next((j for j in self._jobs.values() if unique and j.unique == unique and not j.is_finished), None)
            if busy is not None:
                log.info("submit %r: %s is already %s with the same key; returning it", name, busy.id, busy.status)
                return busy
            job = Job(f"job-{next(self._ids):04d}", name, fn, gpu)
            job.unique = unique
            self._jobs[job.id] = job
            self._prune()
            if gpu:
                self._gpu_queue.append(job)
                self._update_queue_messages()
                self._dispatch_gpu()
            else:
                self._start(job)
        log.info("submitted %s (%s, gpu=%s)", job.id, name, gpu)
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def list(self) -> list[Job]:
        """All kept jobs, newest first."""
        with self._cond:
            return sorted(self._jobs.values(), key=lambda j: j.created, reverse=True)

    def active(self) -> list[Job]:
        return [j for j in self.list() if not j.is_finished]

    def cancel(self, job_id: str) -> bool:
        """Ask a job to stop. A queued job is cancelled at once; a running one stops at its next should_stop().

        Returns False when the job is unknown or already finished.
        """
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.is_finished:
                return False
            job._stop.set()
            if job.status == QUEUED:
                if job in self._gpu_queue:
                    self._gpu_queue.remove(job)
                job.message = "cancelled before it started"
                job._finish(CANCELLED)
                self._update_queue_messages()
            else:
                job.message = "stopping: waiting for the job to save and return"
        log.info("cancel requested for %s", job_id)
        return True

    def shutdown(self, timeout: float = 30.0) -> bool:
        """Stop accepting jobs, ask every job to stop, and wait up to `timeout` s for them to save and return.

        Returns True when every job has finished in time.
        """
        with self._cond:
            self._closed = True
            pending = [j for j in self._jobs.values() if not j.is_finished]
        for job in pending:
            self.cancel(job.id)
        deadline = time.monotonic() + timeout
        ok = True
        for job in pending:
            ok = job.wait(max(0.0, deadline - time.monotonic())) and ok
        if not ok:
            log.warning("shutdown: some jobs did not stop within %.0f s", timeout)
        return ok

    # ---- internal ------------------------------------------------------------------------------------
    def _start(self, job: Job) -> None:
        job.status = RUNNING
        job.started = time.time()
        if job.message.startswith("queued"):
            job.message = ""
        t = threading.Thread(target=self._run, args=(job,), name=f"studio-{job.id}", daemon=True)
        self._threads = [th for th in self._threads if th.is_alive()]
        self._threads.append(t)
        t.start()

    def _run(self, job: Job) -> None:
        _current.job = job
        try:
            job.result = job.fn(job)
            status = CANCELLED if job.should_stop() else DONE
            if status == CANCELLED and not job.message.startswith("cancelled"):
                job.message = "cancelled (partial work saved by the job)"
        except BaseException as e:  # a job must never take the runner down
            job.error = f"{type(e).__name__}: {e}"
            job.message = f"failed: {job.error}"
            with job._lock:
                job._logs.extend(traceback.format_exc().rstrip().splitlines())
            log.exception("job %s (%s) failed", job.id, job.name)
            status = FAILED
        with self._cond:
            job._finish(status)
            if job.gpu:
                self._gpu_busy = False
                self._dispatch_gpu()
            self._cond.notify_all()

    def _dispatch_gpu(self) -> None:
        """Start the next queued GPU job if the GPU is free; caller holds self._cond."""
        if self._gpu_busy or not self._gpu_queue:
            return
        job = self._gpu_queue.popleft()
        self._gpu_busy = True
        self._update_queue_messages()
        self._start(job)

    def _update_queue_messages(self) -> None:
        for pos, job in enumerate(self._gpu_queue, start=1):
            job.message = f"queued: position {pos} for the GPU"

    def _prune(self) -> None:
        finished = sorted((j for j in self._jobs.values() if j.is_finished), key=lambda j: j.created)
        for job in finished[: max(0, len(self._jobs) - self._max_kept)]:
            del self._jobs[job.id]
