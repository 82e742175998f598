"""What the /v1 API keeps between requests: API keys, the request queues (one lane per kind of model) and the log
of recent requests that the Settings tab shows. Torch-free and backend-free, so a tab may read it.

Queue policy: each lane runs `slots` requests at a time (1: one GPU; the backends and the residency manager then
arbitrate with the UI) and lets at most `max_waiting` more wait, first come first served. A request past that bound
is refused at once with `QueueFull`, which carries a Retry-After estimate (the lane's mean run time times the
requests ahead, per slot). A request whose client has gone (`cancel` set) leaves the queue without running.
Keys: one per line in `api_keys_file` ('#' comments); compared in constant time; never logged or shown.
"""

from __future__ import annotations

import contextlib
import hmac
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.datafiles import TextFileError, read_text

log = logging.getLogger(__name__)

LANES = ("chat", "embeddings", "audio", "images")
MIN_KEY_CHARS = 16


class ApiConfigError(ValueError):
    """The API's settings cannot be used as given (missing or malformed key file)."""


class QueueFull(RuntimeError):
    def __init__(self, lane: str, waiting: int, retry_after_s: int) -> None:
        super().__init__(
            f"The studio is busy: {waiting} {lane} request(s) are already waiting; retry in about {retry_after_s} s."
        )
        self.retry_after_s = retry_after_s


def read_keys(path: Path) -> tuple[str, ...]:
    """API keys from a file, one per line; blank lines and '#' comments ignored."""
    if not path.is_file():
        raise ApiConfigError(f"API key file {path} does not exist. Create it with one key per line.")
    try:
        text = read_text(path, str(path))  # a key file saved by Notepad starts with a BOM: it is not part of a key
    except TextFileError as e:
        raise ApiConfigError(str(e)) from None
    keys = []
    for n, line in enumerate(text.splitlines(), 1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        if len(key) < MIN_KEY_CHARS or any(c.isspace() for c in key):
            raise ApiConfigError(f"{path}:{n}: an API key needs {MIN_KEY_CHARS}+ characters and no spaces.")
        keys.append(key)
    if not keys:
        raise ApiConfigError(f"API key file {path} holds no key.")
    return tuple(keys)


class KeyStore:
    """The accepted keys; the file is re-read when it changes, so keys can be rotated without a restart."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._keys: tuple[str, ...] = ()
        self._mtime: float | None = None
        self._lock = threading.Lock()
        if path is not None:
            self._reload()

    def _reload(self) -> None:
        assert self.path is not None
        mtime = self.path.stat().st_mtime if self.path.exists() else None
        if mtime != self._mtime or not self._keys:
            self._keys, self._mtime = read_keys(self.path), mtime

    def check(self, key: str) -> bool:
        if self.path is None or not key:
            return False
        with self._lock:
            try:
                self._reload()
            except (ApiConfigError, OSError) as e:
                log.warning("API key file unreadable, keeping the previous keys: %s", e)
            given = key.encode()
            return any(hmac.compare_digest(given, k.encode()) for k in self._keys)  # no early exit


@dataclass
class RequestRecord:
    id: int
    route: str
    model: str
    lane: str
    arrived: float  # wall clock
    status: str = "waiting"  # waiting | running | ok | error | cancelled | refused
    wait_s: float = 0.0
    run_s: float = 0.0
    tokens: int = 0  # completion tokens (chat), inputs (embeddings), images, segments
    detail: str = ""
    _t0: float = field(default_factory=time.perf_counter, repr=False)


class Lane:
    def __init__(self, name: str, slots: int, max_waiting: int) -> None:
        self.name, self.slots, self.max_waiting = name, slots, max_waiting
        self.running = 0
        self.waiting: deque[int] = deque()
        self.run_times: deque[float] = deque(maxlen=20)

    def retry_after(self) -> int:
        mean = sum(self.run_times) / len(self.run_times) if self.run_times else 5.0
        return max(1, math.ceil(mean * (len(self.waiting) + 1) / self.slots))


class ApiState:
    """Queues, keys and the recent-request log of the /v1 API (one per studio)."""

    def __init__(self, settings: Any, *, slots: int = 1, keep: int = 50) -> None:
        self.settings = settings
        self.enabled = bool(getattr(settings, "api_enabled", True))
        self.exposed = bool(settings.share or not settings.is_loopback)
        keys_file = getattr(settings, "api_keys_file", None)
        self.keys = KeyStore(keys_file)
        self.auth_required = self.exposed or bool(getattr(settings, "api_keys_on_loopback", False))
        self.closed_reason = ""
        if self.auth_required and keys_file is None:
            self.closed_reason = (
                "The /v1 API needs API keys when the studio is reachable from other machines (or when "
                "api_keys_on_loopback is set): create a file with one key per line and set api_keys_file."
            )
        max_waiting = int(getattr(settings, "api_max_queue", 8))
        self.lanes = {name: Lane(name, slots, max_waiting) for name in LANES}
        self.recent: deque[RequestRecord] = deque(maxlen=keep)
        self.address = ""
        self._cond = threading.Condition()
        self._ids = itertools.count(1)

    # ---- queue ----------------------------------------------------------------------------------------------
    def enter(self, lane: str, route: str, model: str) -> RequestRecord:
        """Take a place in `lane` (or raise QueueFull); then `slot(record, cancel)` waits for the turn."""
        with self._cond:
            q = self.lanes[lane]
            rec = RequestRecord(next(self._ids), route, model, lane, time.time())
            if q.running >= q.slots and len(q.waiting) >= q.max_waiting:
                rec.status, rec.detail = "refused", "queue full"
                self.recent.append(rec)
                raise QueueFull(lane, len(q.waiting), q.retry_after())
            q.waiting.append(rec.id)
            self.recent.append(rec)
            return rec

    @contextlib.contextmanager
    def slot(self, rec: RequestRecord, cancel: threading.Event) -> Iterator[bool]:
        """Wait for the turn; yields False (and runs nothing) when the client left while waiting."""
        q = self.lanes[rec.lane]
        with self._cond:
            while not cancel.is_set() and (q.waiting[0] != rec.id or q.running >= q.slots):
                self._cond.wait(0.1)
            q.waiting.remove(rec.id)
            if cancel.is_set():
                rec.status, rec.detail = "cancelled", "client left while waiting"
                rec.wait_s = time.perf_counter() - rec._t0
                self._cond.notify_all()
                yield False
                return
            q.running += 1
            rec.status, rec.wait_s = "running", time.perf_counter() - rec._t0
        t_run = time.perf_counter()
        try:
            yield True
        finally:
            with self._cond:
                q.running -= 1
                rec.run_s = time.perf_counter() - t_run
                q.run_times.append(rec.run_s)
                if rec.status == "running":
                    rec.status = "cancelled" if cancel.is_set() else "ok"
                self._cond.notify_all()

    # ---- views ----------------------------------------------------------------------------------------------
    def queue_lengths(self) -> dict[str, dict[str, int]]:
        with self._cond:
            return {n: {"running": q.running, "waiting": len(q.waiting)} for n, q in self.lanes.items()}

    def snapshot(self) -> dict[str, Any]:
        with self._cond:
            recent = [{k: v for k, v in vars(r).items() if not k.startswith("_")} for r in reversed(self.recent)]
        return {
            "address": self.address,
            "enabled": self.enabled and not self.closed_reason,
            "auth": "required" if self.auth_required else "optional on loopback",
            "closed_reason": self.closed_reason,
            "queues": self.queue_lengths(),
            "max_waiting": next(iter(self.lanes.values())).max_waiting,
            "recent": recent,
        }
