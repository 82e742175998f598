"""The QLoRA recipe: base model (nf4 double quant on CUDA, fp32 on CPU), LoRA via PEFT's PeftModel API, memory
savers, optimizer and schedule.

Precision policy (never a silent fp32 on a GPU): on CUDA the base is nf4 with double quantisation computing in bf16
(fp16 on cards without bf16); LoRA weights are fp32. Below LONG_FROM_TOKENS the small LoRA matmuls run in fp32 too
(measured on an H200: bf16 autocast's extra cast kernels cost 13% of a launch-bound 2048-token step); from
LONG_FROM_TOKENS on everything runs under bf16 autocast (fp16 + gradient scaler without bf16), so no fp32 copies
of long activations exist. On the CPU everything is fp32 and the log says so.

Memory policy by length (measured, studio/bench/results/finetune-h200.md): below LONG_FROM_TOKENS decoder layers
are checkpointed on the GPU; from it on their inputs go to pinned RAM, the input-embedding table stays in RAM
(its CPU lookup cost 10% at 2048 tokens, nothing that matters at 32k), and the MLP runs in tiles. (PeftModel, not transformers' `add_adapter`: transformers 5.24's
adapter integration refuses the pinned peft 0.21.)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from backends.finetune.types import FinetuneError, LoraOptions, TrainOptions

log = logging.getLogger(__name__)
LONG_FROM_TOKENS = 4096  # the long-sequence policy (autocast, offload, embeddings in RAM) from this length on


def precision(device: str, opts: TrainOptions, max_length: int) -> tuple[str | None, str]:
    """(autocast dtype for StepLoop, a sentence for the log and the UI)."""
    if not device.startswith("cuda") or opts.precision == "fp32":
        why = "on the CPU" if not device.startswith("cuda") else "as requested"
        return None, f"fp32 ({why}: expected, slower)"
    import torch

    half = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    note = "" if half == "bf16" else " (this card has no bf16)"
    if max_length < LONG_FROM_TOKENS:
        return None, f"nf4 base computing in {half}{note}; LoRA fp32"
    scaler = " with a gradient scaler" if half == "fp16" else ""
    return half, f"nf4 base, {half} autocast{scaler}{note}, fp32 LoRA weights"


def load_base(folder: Path, device: str, opts: TrainOptions) -> Any:
    from backends.llm import check_model_folder, load_causal_lm

    params = check_model_folder(folder)
    nf4 = device.startswith("cuda") and opts.precision == "auto"
    model = load_causal_lm(folder, device, params=params, precision="nf4" if nf4 else "auto")
    model.config.use_cache = False
    return model


def attach_lora(model: Any, lora: LoraOptions) -> Any:
    """Freeze the base and wrap it in a PeftModel with a fresh LoRA adapter ("default")."""
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in lora.targets if t not in names]
    if missing:
        raise FinetuneError(f"LoRA targets {missing} are not module names of this model; it has e.g. "
                            f"{sorted(n for n in names if n.endswith('proj'))[:8]}.")  # fmt: skip
    model.requires_grad_(False)
    config = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.targets),
        use_rslora=lora.rslora, use_dora=lora.dora, bias="none", task_type="CAUSAL_LM",
    )  # fmt: skip
    return get_peft_model(model, config)


def apply_memory_savers(model: Any, opts: TrainOptions, device: str, max_length: int) -> list[str]:
    """Checkpointing (offloaded to pinned RAM when asked or long), tiled MLP for long sequences. Returns notes."""
    from backends.finetune.memory import checkpoint_layers, embeddings_to_ram, tile_mlp

    notes = []
    long = max_length >= LONG_FROM_TOKENS
    if opts.embeddings_in_ram and long and device.startswith("cuda") and embeddings_to_ram(model):
        notes.append("input embeddings in RAM")
    if opts.gradient_checkpointing and not device.startswith("cuda") and not long:
        notes.append("no checkpointing on the CPU below 4096 tokens (RAM is plentiful; a third less compute)")
    elif opts.gradient_checkpointing:
        offload = opts.offload_activations == "on" or (
            opts.offload_activations == "auto" and device.startswith("cuda") and long
        )
        n = checkpoint_layers(model, offload=offload)
        notes.append(f"checkpointing {n} layers" + (", inputs offloaded to pinned RAM" if offload else ""))
    if max_length > LONG_FROM_TOKENS:
        notes.append(f"tiled MLP on {tile_mlp(model, LONG_FROM_TOKENS)} layers")
    if opts.chunked_loss:
        notes.append("chunked cross-entropy (no full-vocabulary logits)")
    return notes


def make_optimizer(params: list[Any], opts: TrainOptions, device: str) -> tuple[Any, str]:
    import torch

    if device.startswith("cuda") and opts.optimizer != "adamw":
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if opts.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        return cls(params, lr=opts.learning_rate, weight_decay=opts.weight_decay), cls.__name__
    note = "AdamW (torch)" + (" - 8-bit AdamW needs CUDA" if opts.optimizer != "adamw" else "")
    return torch.optim.AdamW(params, lr=opts.learning_rate, weight_decay=opts.weight_decay), note


def make_scheduler(optimizer: Any, opts: TrainOptions) -> Any:
    from transformers import get_scheduler

    name = "constant_with_warmup" if opts.schedule == "constant" else opts.schedule
    return get_scheduler(name, optimizer, num_warmup_steps=min(opts.warmup_steps, opts.max_steps),
                         num_training_steps=opts.max_steps)  # fmt: skip


def adapter_state(model: Any) -> dict[str, Any]:
    """The LoRA tensors as PEFT saves them (keys without the adapter name)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def save_adapter(model: Any, folder: Path, metadata: dict[str, str] | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors into `folder` (which the caller writes atomically)."""
    import json

    from studio.safety import save_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    config = model.peft_config["default"].to_dict()
    config["inference_mode"] = True
    for k, v in list(config.items()):
        if isinstance(v, set):
            config[k] = sorted(v)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, default=str))
    save_safetensors(
        adapter_state(model), folder / "adapter_model.safetensors", metadata={"format": "pt", **(metadata or {})}
    )
