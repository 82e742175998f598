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

LONG_FROM_TOKENS = 4096
NF4_BYTES_PER_PARAM = 0.516
MLP_TILE = 4096
LOSS_CHUNK_LOGITS = 1 << 26
ALLOCATOR_OVERHEAD = 0.03  # fragmentation


def _shape(config: dict) -> dict[str, int]:
    c = config.get("text_config", config)
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    head_dim = c.get("head_dim") or hidden // heads
    return {
        "H": hidden, "I": c["intermediate_size"], "L": c["num_hidden_layers"], "V": c["vocab_size"],
        "q": heads * head_dim, "kv": (c.get("num_key_value_heads") or heads) * head_dim,
        "tied": bool(c.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
    }  # fmt: skip


def linear_shapes(s: dict[str, int]) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear kind of one decoder layer."""
    H, I = s["H"], s["I"]  # noqa: E741
    return {"q_proj": (H, s["q"]), "k_proj": (H, s["kv"]), "v_proj": (H, s["kv"]), "o_proj": (s["q"], H),
            "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}  # fmt: skip


def estimate_fit(model_folder: Path, lora: LoraOptions, train: TrainOptions, max_length: int, *, cuda: bool,
                 available: int | None = None) -> FitEstimate:  # fmt: skip
    s = _shape(json.loads((Path(model_folder) / "config.json").read_text(encoding="utf-8")))
    shapes = linear_shapes(s)
    long = cuda and max_length >= LONG_FROM_TOKENS
    linear = s["L"] * sum(i * o for i, o in shapes.values())
    table = s["V"] * s["H"]
    if cuda:
        weights = linear * NF4_BYTES_PER_PARAM + table * 2 * (0 if long and train.embeddings_in_ram else 1)
        weights += 0 if s["tied"] else table * 2
    else:
        weights = (linear + table * (1 if s["tied"] else 2)) * 4
    lora_params = s["L"] * sum(lora.rank * (i + o) for k, (i, o) in shapes.items() if k in lora.targets)
    opt_bytes = 2 if cuda and train.optimizer != "adamw" else 8
    b, t = train.batch_size, max_length
    act = 2 if cuda else 4
    if long:
        activations = b * t * s["H"] * act * 20 + b * min(t, MLP_TILE) * s["I"] * act * 4
    else:
        stored = s["L"] * b * t * s["H"] * act if train.gradient_checkpointing else s["L"] * b * t * (
            s["H"] * 10 + s["I"] * 4) * act  # fmt: skip
        activations = stored + b * t * (s["H"] * 6 + s["I"] * 3) * act
    chunk = max(128, LOSS_CHUNK_LOGITS // s["V"])
    logits = min(chunk, b * t) * s["V"] * 4 * 2 if train.chunked_loss else b * t * s["V"] * (2 + 4 + 4)
    parts = [int(weights), lora_params * 8, lora_params * opt_bytes, int(activations), int(logits)]
    return FitEstimate(*parts, overhead=int(sum(parts) * ALLOCATOR_OVERHEAD), available=available)


def describe(e: FitEstimate) -> str:
    gb = 1e9
    head = f"**{e.total / gb:.2f} GB** needed"
    if e.available is not None:
        head += f" of {e.available / gb:.2f} GB available: " + ("fits." if e.fits else "**does not fit**.")
    return (f"{head} Weights {e.weights / gb:.2f}, LoRA {e.lora / gb:.2f}, optimizer {e.optimizer / gb:.2f}, "
            f"activations {e.activations / gb:.2f}, logits {e.logits / gb:.2f}, overhead {e.overhead / gb:.2f} GB.")  # fmt: skip
