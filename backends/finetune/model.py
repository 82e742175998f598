"""The QLoRA recipe: base model (nf4 double quant on CUDA, fp32 on CPU), LoRA via PEFT's PeftModel API, memory
savers, optimizer and schedule.

Precision policy (never a silent fp32 on a GPU): on CUDA the base is nf4 with double quantisation, LoRA weights
are fp32 and compute runs under bf16 autocast where the card has bf16, else fp16 autocast with a gradient scaler.
On the CPU everything is fp32 and the log says so. (PeftModel, not transformers' `add_adapter`: transformers 5.24's
adapter integration refuses the pinned peft 0.21.)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from backends.finetune.types import FinetuneError, LoraOptions, TrainOptions

log = logging.getLogger(__name__)
OFFLOAD_FROM_TOKENS = 4096  # "auto" offloads decoder-layer inputs to RAM from this length on


def precision(device: str, opts: TrainOptions) -> tuple[str | None, str]:
    """(autocast dtype for StepLoop, a sentence for the log and the UI)."""
    if not device.startswith("cuda") or opts.precision == "fp32":
        why = "on the CPU" if not device.startswith("cuda") else "as requested"
        return None, f"fp32 ({why}: expected, slower)"
    import torch

    if torch.cuda.is_bf16_supported():
        return "bf16", "nf4 base, bf16 compute, fp32 LoRA weights"
    return "fp16", "nf4 base, fp16 compute with a gradient scaler (this card has no bf16), fp32 LoRA weights"


def load_base(folder: Path, device: str, opts: TrainOptions) -> Any:
    from backends.llm_models import check_model_folder, load_causal_lm

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
    from backends.finetune.memory import checkpoint_layers, tile_mlp

    notes = []
    if opts.gradient_checkpointing:
        offload = opts.offload_activations == "on" or (
            opts.offload_activations == "auto" and device.startswith("cuda") and max_length >= OFFLOAD_FROM_TOKENS
        )
        n = checkpoint_layers(model, offload=offload)
        notes.append(f"checkpointing {n} layers" + (", inputs offloaded to pinned RAM" if offload else ""))
    if max_length > OFFLOAD_FROM_TOKENS:
        notes.append(f"tiled MLP on {tile_mlp(model, OFFLOAD_FROM_TOKENS)} layers")
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
