"""LoRA files for Stable Diffusion: read and check them, switch them on per request, and write our own.

Files we write use the kohya-ss naming that AUTOMATIC1111, ComfyUI, InvokeAI and diffusers all read:
`lora_unet_<module path with '_'>.lora_down.weight` / `.lora_up.weight` / `.alpha`. Files we read may be kohya,
diffusers or PEFT style; diffusers' `lora_state_dict` converts them. Before anything is injected, the LoRA's
cross-attention width is compared with the model's (768 = SD 1.x, 1024 = SD 2.x, 2048 = SDXL), so a LoRA for
another base model is refused with a message instead of failing deep inside PEFT or being silently ignored.

Loaded LoRAs stay injected in the (residency-managed) UNet and text encoders as named PEFT adapters; each request
activates exactly the ones it asks for, with their scales, and disables the rest.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.safety import WeightsError, load_safetensors

log = logging.getLogger(__name__)

TEXT_DIM_NAMES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
MAX_LOADED_ADAPTERS = 8  # beyond this, adapters not asked for are deleted from the module


class LoraError(ValueError):
    """A LoRA file is unreadable or made for another model; the message names the file and the fix."""


@dataclass(frozen=True)
class LoraFile:
    path: Path
    adapter: str  # PEFT adapter name, unique per file content version
    state_dict: dict[str, Any]  # diffusers format, as returned by lora_state_dict
    network_alphas: dict[str, float] | None
    metadata: dict[str, Any] | None
    targets: frozenset[str]  # "unet", "text_encoder", "text_encoder_2"
    rank: int
    text_dim: int | None


def describe_dim(dim: int | None) -> str:
    if dim is None:
        return "unknown"
    name = TEXT_DIM_NAMES.get(dim)
    return f"{name} (text width {dim})" if name else f"a model with text width {dim}"


def lora_text_dim(tensors: dict[str, Any]) -> int | None:
    """Input width of the cross-attention key/value LoRA layers: the text-embedding width of the base model."""
    for key, value in tensors.items():
        low = key.lower()
        is_down = any(t in low for t in ("lora_down", "lora_a", "lora.down", "down.weight"))
        if "attn2" in low and ("to_k" in low or "to_v" in low) and is_down and value.ndim == 2:
            return int(value.shape[1])
    return None


def lora_rank(tensors: dict[str, Any]) -> int:
    for key, value in tensors.items():
        low = key.lower()
        if any(t in low for t in ("lora_down", "lora_a", "lora.down")) and value.ndim >= 2:
            return int(value.shape[0])
    return 0


def read_lora(path: Path, arch: str, unet_config: dict[str, Any]) -> LoraFile:
    """Read and check a LoRA file against a model (its architecture and UNet config)."""
    from diffusers.configuration_utils import FrozenDict

    from backends.image.tiny import pipeline_class

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise LoraError(f"LoRA {path.name}: only .safetensors files are loaded (convert .pt/.ckpt files first).")
    try:
        raw = load_safetensors(path)
    except WeightsError as e:
        raise LoraError(f"LoRA {path.name} cannot be read: {e}") from None
    if not raw or not any("lora" in k.lower() for k in raw):
        raise LoraError(f"{path.name} is not a LoRA file (no lora_* weights inside).")
    want = int(unet_config.get("cross_attention_dim") or 0)
    got = lora_text_dim(raw)
    if got is not None and got != want:
        raise LoraError(
            f"LoRA {path.name} was trained for {describe_dim(got)}, but the loaded model is {describe_dim(want)}. "
            "Pick a LoRA made for this base model, or switch the model."
        )
    try:
        state_dict, alphas, metadata = pipeline_class(arch).lora_state_dict(
            dict(raw), unet_config=FrozenDict(unet_config), return_lora_metadata=True
        )
    except (ValueError, KeyError) as e:
        raise LoraError(f"LoRA {path.name} has a layout diffusers does not understand: {e}") from None
    targets = frozenset(
        p for p in ("unet", "text_encoder", "text_encoder_2") if any(k.startswith(p + ".") for k in state_dict)
    )
    if not targets:
        raise LoraError(f"LoRA {path.name} has no UNet or text-encoder weights that this model can use.")
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    return LoraFile(path, f"lora_{digest}", state_dict, alphas, metadata, targets, lora_rank(raw), got)


def _loaded_adapters(module: Any) -> set[str]:
    return set(getattr(module, "peft_config", None) or {})


def _inject(module: Any, component: str, lora: LoraFile, arch: str) -> None:
    from backends.image.tiny import pipeline_class

    cls = pipeline_class(arch)
    sd = dict(lora.state_dict)
    before = _loaded_adapters(module)
    if component == "unet":
        cls.load_lora_into_unet(sd, lora.network_alphas, unet=module, adapter_name=lora.adapter, metadata=lora.metadata)
    else:
        cls.load_lora_into_text_encoder(
            sd,
            lora.network_alphas,
            text_encoder=module,
            prefix=component,
            adapter_name=lora.adapter,
            metadata=lora.metadata,
        )
    if lora.adapter not in _loaded_adapters(module) - before and lora.adapter not in before:
        raise LoraError(f"LoRA {lora.path.name}: none of its {component} layers match this model.")
    log.info("LoRA %s injected into %s as %s (rank %d)", lora.path.name, component, lora.adapter, lora.rank)


def activate_loras(
    module: Any,
    component: str,
    arch: str,
    wanted: list[tuple[LoraFile, float]],
    extra: tuple[tuple[str, float], ...] = (),
) -> None:
    """Inject missing LoRAs into `module` and make exactly `wanted` (+ `extra` adapters already there) active."""
    mine = [(lf, s) for lf, s in wanted if component in lf.targets]
    for lf, _ in mine:
        if lf.adapter not in _loaded_adapters(module):
            _inject(module, component, lf, arch)
    names = [lf.adapter for lf, _ in mine] + [n for n, _ in extra if n in _loaded_adapters(module)]
    weights = [s for _, s in mine] + [s for n, s in extra if n in _loaded_adapters(module)]
    loaded = _loaded_adapters(module)
    if not loaded:
        return
    if len(loaded) > MAX_LOADED_ADAPTERS:
        _delete(module, component, sorted(loaded - set(names)))
    if component == "unet":
        if names:
            module.enable_lora()
            module.set_adapters(names, weights)
        else:
            module.disable_lora()
        return
    from diffusers.loaders.lora_base import (
        disable_lora_for_text_encoder,
        enable_lora_for_text_encoder,
        set_adapters_for_text_encoder,
    )

    if names:
        enable_lora_for_text_encoder(module)
        set_adapters_for_text_encoder(names, module, weights)
    else:
        disable_lora_for_text_encoder(module)


def _delete(module: Any, component: str, names: list[str]) -> None:
    if not names:
        return
    if component == "unet":
        module.delete_adapters(names)
    else:
        for name in names:
            module.delete_adapter(name)
    log.info("deleted LoRA adapters %s from %s", names, component)


def peft_to_kohya(peft_state: dict[str, Any], alpha: float) -> dict[str, Any]:
    """PEFT UNet LoRA weights (`<module>.lora_A.weight`) -> kohya-ss keys with one `.alpha` per module."""
    import torch

    out: dict[str, Any] = {}
    for key, value in peft_state.items():
        module, sep, tail = key.rpartition(".lora_")
        if not sep or tail not in ("A.weight", "B.weight"):
            raise ValueError(f"unexpected PEFT LoRA key {key!r}")
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.{'lora_down' if tail == 'A.weight' else 'lora_up'}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out
