"""Concurrency helpers for work that Gradio runs on any thread.

Gradio steps a generator on any worker thread and closes it (Stop, a closed tab) on the event loop, so nothing that
lives across a `yield` may be tied to a thread:
- `OwnedSlot`: "one at a time" with an ownership token instead of a thread-bound lock: whoever holds the token
  (any thread) releases it, once; a second release is a no-op. Not re-entrant.
- `SafeStream`: wraps a generator so that steps run one at a time whichever thread calls `next`, and `close()` from
  another thread while a step runs first asks the step to stop (the generator polls the stream's `is_set()` like a
  cancel event), waits for it to return, then closes the generator (its `finally` blocks run there).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class OwnedSlot:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._owner: object | None = None

    def acquire(self, timeout: float | None = None) -> object | None:
        """A token once the slot is free (None after `timeout` seconds)."""
        token = object()
        with self._cond:
            if not self._cond.wait_for(lambda: self._owner is None, timeout):
                return None
            self._owner = token
        return token

    def release(self, token: object | None) -> None:
        with self._cond:
            if token is not None and self._owner is token:
                self._owner = None
                self._cond.notify()

    @property
    def busy(self) -> bool:
        return self._owner is not None

    @contextlib.contextmanager
    def held(self, timeout: float | None = None, message: str = "busy") -> Iterator[None]:
        token = self.acquire(timeout)
        if token is None:
            raise RuntimeError(message)
        try:
            yield
        finally:
            self.release(token)

    def __enter__(self) -> OwnedSlot:
        self._token = self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release(self._token)


class SafeStream(Generic[T]):
    """See the module docstring. `make(stop)` builds the generator; `stop.is_set()` turns true on `close()` or when
    the caller's own `cancel` event is set."""

    def __init__(self, make: Callable[[Any], Iterator[T]], cancel: threading.Event | None = None) -> None:
        self._closing = threading.Event()
        self._cancel = cancel
        self._step = threading.Lock()
        self._closed = False
        self._gen = make(self)

    def is_set(self) -> bool:
        return self._closing.is_set() or (self._cancel is not None and self._cancel.is_set())

    def __iter__(self) -> SafeStream[T]:
        return self

    def __next__(self) -> T:
        with self._step:
            if self._closed:
                raise StopIteration
            try:
                return next(self._gen)
            except BaseException:
                self._closed = True
                raise

    def close(self) -> None:
        self._closing.set()  # a step running on another thread stops at its next check
        with self._step:
            if not self._closed:
                self._closed = True
                self._gen.close()
