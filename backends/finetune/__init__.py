"""Fine-tune (QLoRA) for chat models: the torch-free public API.

Submodules (import them only from backends and benchmarks; tabs use this module):
- types: configs and results;  data: reading and checking datasets;  format: chat template, masks, packing;
- trainer: the generic resumable step loop (also used by the VLM fine-tune);  loss: chunked cross-entropy;
- memory: offloaded checkpointing and tiled MLP;  model: the QLoRA recipe (base, LoRA, optimizer, schedule);
- evaluate: dev loss, perplexity, answers, exact match / ROUGE-L;  export: 16-bit merge + Ollama Modelfile;
- estimate: "will it fit";  task: the Shakespeare short-answer dataset;  job: one run;  backend: FinetuneBackend.
Several GPUs: `accelerate launch -m backends.finetune.launch --config run.json` (launch.py).
"""

from __future__ import annotations

from backends.finetune.backend import FinetuneBackend, create
from backends.finetune.estimate import describe as describe_fit
from backends.finetune.task import write_task
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
    "FinetuneBackend",
    "FinetuneConfig",
    "FinetuneError",
    "FinetuneResult",
    "FitEstimate",
    "LoraOptions",
    "TrainOptions",
    "create",
    "describe_fit",
    "write_task",
]
