"""What a tab or a backend may touch: one StudioContext, built once by studio.app; nothing global."""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from studio.catalog import Catalog
    from studio.jobs import JobRunner
    from studio.residency import ResidencyManager
    from studio.runs import RunStore
    from studio.settings import Settings
    from studio.waiting import WorkQueues

# Backend name -> module; each module exposes `create(ctx: StudioContext) -> backend`.
BACKEND_MODULES: dict[str, str] = {
    "llm": "backends.llm",
    "asr": "backends.asr",
    "detection": "backends.detection",
    "diffusion": "backends.diffusion",
    "sd_lora": "backends.sd_lora",
    "tinylm": "backends.tinylm",
    "rag": "backends.rag",
}


class Backends:
    """Builds each backend on first use, so start-up imports no torch model code."""

    def __init__(self, ctx: StudioContext) -> None:
        self._ctx = ctx
        self._built: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> Any:
        with self._lock:
            if name not in self._built:
                if name not in BACKEND_MODULES:
                    raise KeyError(f"unknown backend {name!r}; known: {sorted(BACKEND_MODULES)}")
                module = importlib.import_module(BACKEND_MODULES[name])
                self._built[name] = module.create(self._ctx)
            return self._built[name]


@dataclass
class StudioContext:
    settings: Settings
    residency: ResidencyManager
    catalog: Catalog
    jobs: JobRunner
    runs: RunStore
    backends: Backends = field(init=False)
    queues: WorkQueues = field(init=False)  # queue ids for device-bound events, and who holds each one

    def __post_init__(self) -> None:
        from studio.waiting import WorkQueues

        self.backends = Backends(self)
        self.queues = WorkQueues(has_gpu=getattr(self.residency, "device", "cpu") == "cuda")


@dataclass(frozen=True)
class Tab:
    """One tab of the studio: `build(ctx)` creates components inside the current gr.Tab and wires events."""

    title: str
    build: Callable[[StudioContext], None]
