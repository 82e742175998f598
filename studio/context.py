"""What a tab may touch: one StudioContext, built once by studio.app; nothing global.

Composition module: it is allowed to import the capability packages (lazily, so start-up imports no model code).
Each backend is one typed property, built on first use with the core `Services` and the other backends it needs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from studio.services import Services

if TYPE_CHECKING:
    from backends.audio import AsrBackend, WhisperTuner
    from backends.finetune import FinetuneBackend
    from backends.image import DiffusionBackend, SdLoraBackend
    from backends.llm import LLMBackend
    from backends.rag import RAGBackend
    from backends.tinylm import TinyLMBackend
    from backends.vision import DetectionBackend
    from backends.vlm import VLMBackend
    from studio.waiting import WorkQueues

T = TypeVar("T")


class Backends:
    """Builds each backend on first use (thread-safe, once)."""

    def __init__(self, services: Services) -> None:
        self._services = services.core()
        self._built: dict[str, Any] = {}
        self._lock = threading.RLock()  # re-entrant: building one backend may build the ones it depends on

    def _once(self, name: str, build: Callable[[], T]) -> T:
        with self._lock:
            if name not in self._built:
                self._built[name] = build()
            return self._built[name]

    @property
    def llm(self) -> LLMBackend:
        from backends import llm

        return self._once("llm", lambda: llm.create(self._services))

    @property
    def asr(self) -> AsrBackend:
        from backends import audio

        return self._once("asr", lambda: audio.create(self._services))

    @property
    def whisper_tuner(self) -> WhisperTuner:
        from backends import audio

        return self._once("whisper_tuner", lambda: audio.create_whisper_tuner(self._services))

    @property
    def detection(self) -> DetectionBackend:
        from backends import vision

        return self._once("detection", lambda: vision.create(self._services))

    @property
    def diffusion(self) -> DiffusionBackend:
        from backends import image

        return self._once("diffusion", lambda: image.create(self._services))

    @property
    def sd_lora(self) -> SdLoraBackend:
        from backends import image

        return self._once("sd_lora", lambda: image.create_lora_trainer(self._services, diffusion=self.diffusion))

    @property
    def tinylm(self) -> TinyLMBackend:
        from backends import tinylm

        return self._once("tinylm", lambda: tinylm.create(self._services))

    @property
    def finetune(self) -> FinetuneBackend:
        from backends import finetune

        return self._once("finetune", lambda: finetune.create(self._services, llm=lambda: self.llm))

    @property
    def rag(self) -> RAGBackend:
        from backends import rag

        return self._once("rag", lambda: rag.create(self._services, llm=lambda: self.llm))

    @property
    def vlm(self) -> VLMBackend:
        from backends import vlm

        return self._once("vlm", lambda: vlm.create(self._services))


@dataclass
class StudioContext(Services):
    backends: Backends = field(init=False)
    queues: WorkQueues = field(init=False)  # queue ids for device-bound events, and who holds each one
    _api: Any = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        from studio.waiting import WorkQueues

        self.backends = Backends(self)
        self.queues = WorkQueues(has_gpu=getattr(self.residency, "device", "cpu") == "cuda")

    @property
    def api(self) -> Any:
        """The /v1 API's queues, keys and recent requests (studio.api.ApiState), built on first use."""
        if self._api is None:
            from studio.api.state import ApiState

            self._api = ApiState(self.settings)
        return self._api


@dataclass(frozen=True)
class Tab:
    """One tab of the studio: `build(ctx)` creates components inside the current gr.Tab and wires events."""

    title: str
    build: Callable[[StudioContext], None]
