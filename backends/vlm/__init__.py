"""Vision-language chat (LLaVA 1.5 / NeXT / OneVision, Qwen-VL, SmolVLM) and QLoRA on image-text pairs.

The torch-free public API: tabs import only this module. The backend is built lazily by the studio context
(`ctx.backends.vlm`); models load through the residency manager under keys "vlm:<id>".

Modules: backend (VLMBackend: chat, limits, adapters, training entry), types (configs, results, per-architecture
facts), images (upload checks, downscaling, digests), prompt (processor inputs trimmed to the context), decode
(feature cache, merged embeddings, Chat's decoders, plain generate), models (catalog/folder, tiny demo LLaVA, nf4
loading with the 16-bit skip list), adapters (LoRA + projector), data (JSONL checks), train (QLoRA loop).
"""

from __future__ import annotations

from typing import Any

from backends.vlm.backend import VLMBackend, check_messages
from backends.vlm.data import VLMDataError
from backends.vlm.models import DEMO_ID, ModelNotAvailable
from backends.vlm.types import (
    FAMILIES,
    ImageOptions,
    VLMConfig,
    VLMError,
    VLMStats,
    VLMTrainConfig,
    VLMUpdate,
    family_of,
)  # fmt: skip

__all__ = [
    "DEMO_ID",
    "FAMILIES",
    "ImageOptions",
    "ModelNotAvailable",
    "VLMBackend",
    "VLMConfig",
    "VLMDataError",
    "VLMError",
    "VLMStats",
    "VLMTrainConfig",
    "VLMUpdate",
    "check_messages",
    "create",
    "family_of",
]  # fmt: skip


def create(services: Any) -> VLMBackend:
    return VLMBackend(services)
