"""Model residency: the one place that moves models between GPU, CPU RAM and disk.

PLACEHOLDER (v0): keeps the public API of DESIGN.md so backends can be written against it. It loads each model
once on the compute device and never evicts. The real manager (tiers, pinned pools, eviction, OOM retry,
metrics) replaces this file; the public names below stay.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class Loader(Protocol):
    """Supplied by a backend, one per model key ("llm:<id>", "asr:tiny.en", ...)."""

    key: str

    def estimate_bytes(self) -> int: ...
    def load(self, device: str) -> Any: ...
    def to_device(self, obj: Any, device: str) -> Any: ...
    def release(self, obj: Any) -> None: ...


class ResidencyError(RuntimeError):
    """A model could not be placed: the message says how many bytes were needed and free."""


@dataclass
class ModelState:
    key: str
    obj: Any = None
    device: str | None = None
    leases: int = 0


@dataclass
class Snapshot:
    device: str
    models: list[ModelState] = field(default_factory=list)


class ResidencyManager:
    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self._loaders: dict[str, Loader] = {}
        self._models: dict[str, ModelState] = {}
        self._lock = threading.RLock()

    def register(self, loader: Loader) -> None:
        with self._lock:
            self._loaders[loader.key] = loader

    def is_registered(self, key: str) -> bool:
        return key in self._loaders

    @contextlib.contextmanager
    def use(self, key: str, *, working_bytes: int | None = None) -> Iterator[Any]:
        with self._lock:
            state = self._models.setdefault(key, ModelState(key))
            if state.obj is None:
                state.obj = self._loaders[key].load(self.device)
                state.device = self.device
            state.leases += 1
        try:
            yield state.obj
        finally:
            with self._lock:
                state.leases -= 1

    def run(self, key: str, fn: Callable[[Any], T], *, working_bytes: int | None = None) -> T:
        with self.use(key, working_bytes=working_bytes) as model:
            return fn(model)

    def unregister(self, key: str) -> None:
        with self._lock:
            state = self._models.pop(key, None)
            if state is not None and state.obj is not None:
                self._loaders[key].release(state.obj)
            self._loaders.pop(key, None)

    def offload(self, key: str | None = None) -> None:
        """v0: no tiers yet."""

    def snapshot(self) -> Snapshot:
        with self._lock:
            return Snapshot(self.device, list(self._models.values()))

    def set_caps(self, vram_bytes: int | None, ram_bytes: int | None) -> None:
        """v0: caps are ignored."""
