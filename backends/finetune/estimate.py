""" "Will it fit": GPU bytes of a QLoRA run from the model's config.json, before anything is loaded (torch-free).

Parts: nf4 weights (0.516 bytes per linear parameter with double quantisation, 16-bit embeddings and head; the
embedding table leaves the GPU under the long-sequence policy), LoRA weights + gradients (fp32) + optimizer state
(2 bytes per parameter for 8-bit AdamW, 8 for fp32 AdamW), activations (checkpointed layer inputs on the GPU below
4096 tokens, in RAM from there; one layer's recompute working set), and the chunked loss (two fp32 chunks of
logits). The factors were fitted to the H200 measurements in studio/bench/results/finetune-h200.md (Llama-3.1-8B:
estimate 7.70 GB vs 7.44 measured at 2048; 7.64 / 9.03 / 11.79 vs 7.09 / 8.36 / 11.66 at 8k / 16k / 32k,
erring high); the measured
peak is shown beside the estimate after a run. On the CPU the same parts are fp32 and the figure is RAM.
"""

from __future__ import annotations

import json
from pathlib import Path

from backends.finetune.types import FitEstimate, LoraOptions, TrainOptions
from studio.planner import qlora_parts


def estimate_fit(model_folder: Path, lora: LoraOptions, train: TrainOptions, max_length: int, *, cuda: bool,
                 available: int | None = None) -> FitEstimate:  # fmt: skip
    """The planner's QLoRA formula (studio/planner/formulas.py `qlora_parts`) for this run's options."""
    config = json.loads((Path(model_folder) / "config.json").read_text(encoding="utf-8"))
    c = dict(config.get("text_config", config))
    c.setdefault("tie_word_embeddings", config.get("tie_word_embeddings", False))
    p = qlora_parts(c, rank=lora.rank, targets=tuple(lora.targets), batch=train.batch_size, seq=max_length,
                    checkpointing=train.gradient_checkpointing, chunked_loss=train.chunked_loss,
                    adamw8bit=train.optimizer != "adamw", embeddings_in_ram=train.embeddings_in_ram, cuda=cuda)  # fmt: skip
    return FitEstimate(p["weights"], p["lora"], p["optimizer"], p["activations"], p["logits"], overhead=p["overhead"],
                       available=available)  # fmt: skip


def describe(e: FitEstimate) -> str:
    gb = 1e9
    head = f"**{e.total / gb:.2f} GB** needed"
    if e.available is not None:
        head += f" of {e.available / gb:.2f} GB available: " + ("fits." if e.fits else "**does not fit**.")
    return (f"{head} Weights {e.weights / gb:.2f}, LoRA {e.lora / gb:.2f}, optimizer {e.optimizer / gb:.2f}, "
            f"activations {e.activations / gb:.2f}, logits {e.logits / gb:.2f}, overhead {e.overhead / gb:.2f} GB.")  # fmt: skip
