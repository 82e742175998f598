"""Vision-language chat (LLaVA 1.5 / NeXT / OneVision, Qwen-VL, SmolVLM) and QLoRA on image-text pairs.

The torch-free public API: tabs import only this module. The backend is built lazily by the studio context
(`ctx.backends.vlm`); models load through the residency manager under keys "vlm:<id>".
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


def create(ctx: Any) -> VLMBackend:
    return VLMBackend(ctx)
