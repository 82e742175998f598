"""Fine-tune (QLoRA) for chat models: the torch-free public API.

Submodules (import them only from backends and benchmarks; tabs use this module):
- types: configs and results;  data: reading and checking datasets;  format: chat template, masks, packing;
- trainer: the generic resumable step loop (also used by the VLM fine-tune);  loss: chunked cross-entropy;
- memory: offloaded checkpointing and tiled MLP;  model: the QLoRA recipe (base, LoRA, optimizer, schedule).
"""

from __future__ import annotations

from backends.finetune.types import (
    ALL_LINEAR,
    DataError,
    DataOptions,
    DatasetReport,
    FinetuneConfig,
    FinetuneError,
    FinetuneResult,
    FitEstimate,
    LoraOptions,
    TrainOptions,
)

__all__ = [
    "ALL_LINEAR",
    "DataError",
    "DataOptions",
    "DatasetReport",
    "FinetuneConfig",
    "FinetuneError",
    "FinetuneResult",
    "FitEstimate",
    "LoraOptions",
    "TrainOptions",
]
