"""Memory modes for image generation, chosen per request from the live GPU budget.

Policy, cheapest first (ComfyUI's order: degrade before failing):
1. Everything on the GPU: text encoders, UNet, VAE and the working memory of both stages fit in the budget.
2. Text encoders parked: generation always leases its components stage by stage (text encoders, then UNet + VAE),
   so when the budget is short the residency manager parks the idle text encoders in pinned RAM and keeps the
   UNet resident. Nothing in this module has to do anything for that; it is named in the plan for the UI.
3. Tiled VAE decode: when UNet + VAE + the decoder's full-size activations do not fit, decode in overlapping
   tiles (a few percent slower, a fraction of the memory) rather than evicting the UNet.
4. Attention slicing: when even the UNet's own working memory does not fit beside its weights.
VAE slicing (decode one image of a batch at a time) is always used for batches: it costs nothing measurable.
An out-of-memory error during decode falls back to tiles anyway (`decode_latents`), because estimates are estimates.

Working-memory figures are per latent pixel (UNet) or image pixel (VAE) and per byte of the compute dtype; the mode
rule is the planner's (`studio.planner.formulas.image_modes`). On an H200 SDXL 1024x1024 with every component on the
GPU peaked at 11.42 GiB beside 6.6 GiB of weights, over the 10.7 GiB budget planned with the old 900; the margin-high
decode figure is now 1,300, which parks the text encoders there (6.62 GiB peak). Where the all-on excess comes from
is not known: not the decode alone (docs/planner.md, studio/bench/results/planner-h200*.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from studio.planner.formulas import decode_working_bytes, image_modes, unet_working_bytes  # the planner's

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoryPlan:
    mode: str
    vae_tiling: bool = False
    vae_slicing: bool = False
    attention_slicing: bool = False
    unet_working_bytes: int = 0
    decode_working_bytes: int = 0
    budget_bytes: int | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        flags = ((self.vae_tiling, "tiled VAE"), (self.attention_slicing, "sliced attention"))
        extras = [name for on, name in flags if on]
        budget = f", budget {self.budget_bytes / 2**30:.1f} GiB" if self.budget_bytes else ""
        return self.mode + (f" + {', '.join(extras)}" if extras else "") + budget


def plan_memory(
    components: dict[str, int],
    *,
    width: int,
    height: int,
    batch: int,
    cfg: bool,
    dtype_bytes: int,
    vae_dtype_bytes: int,
    budget_bytes: int | None,
) -> MemoryPlan:
    """Choose the cheapest mode that fits. `components` maps component name -> weight bytes on the GPU."""
    slicing = batch > 1
    at_once = 1 if slicing else batch
    unet_work = unet_working_bytes(width, height, batch, cfg, dtype_bytes)
    decode_full = decode_working_bytes(width, height, at_once, vae_dtype_bytes, tiled=False)
    if budget_bytes is None:  # CPU: RAM is the limit; tile only very large images
        tiled = width * height > 2048 * 2048
        return MemoryPlan(
            "CPU",
            vae_tiling=tiled,
            vae_slicing=slicing,
            unet_working_bytes=unet_work,
            decode_working_bytes=decode_full,
            notes=("no CUDA GPU: running on the CPU",),
        )
    unet, vae = components.get("unet", 0), components.get("vae", 0)
    text = sum(v for k, v in components.items() if k.startswith("text_encoder"))
    notes: list[str] = []
    parked, tiled, attention_slicing = image_modes(text, unet, vae, unet_work, decode_full, budget_bytes)
    mode = "text encoders parked in RAM" if parked else "all on GPU"
    if parked:
        notes.append("text encoders run first, then wait in pinned RAM while the UNet works")
    if attention_slicing:
        unet_work //= 4
        notes.append("UNet activations do not fit beside its weights: attention computed in slices")
    decode = decode_working_bytes(width, height, at_once, vae_dtype_bytes, tiled=tiled)
    if tiled:
        notes.append("decoder activations do not fit beside the UNet: VAE decodes in tiles")
    if unet + vae + min(unet_work, decode) > budget_bytes:
        notes.append(
            f"UNet + VAE need {(unet + vae) / 2**30:.1f} GiB, more than the {budget_bytes / 2**30:.1f} GiB budget: "
            "expect the residency manager to refuse or to free other models first"
        )
    return MemoryPlan(
        mode,
        vae_tiling=tiled,
        vae_slicing=slicing,
        attention_slicing=attention_slicing,
        unet_working_bytes=unet_work,
        decode_working_bytes=decode,
        budget_bytes=budget_bytes,
        notes=tuple(notes),
    )


def decode_latents(vae: Any, latents: Any, plan: MemoryPlan) -> Any:
    """VAE decode to a (N, 3, H, W) tensor in [-1, 1]; falls back to tiles after a CUDA out-of-memory error."""
    import torch

    latents = latents.to(device=vae.device, dtype=vae.dtype)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    latents = latents / vae.config.scaling_factor + shift
    try:
        return _decode(vae, latents, tiled=plan.vae_tiling, sliced=plan.vae_slicing)
    except torch.OutOfMemoryError:
        if plan.vae_tiling and plan.vae_slicing:
            raise
        log.warning("out of memory in VAE decode (%s): retrying with tiles, one image at a time", plan.describe())
        torch.cuda.empty_cache()
        return _decode(vae, latents, tiled=True, sliced=True)


def _decode(vae: Any, latents: Any, *, tiled: bool, sliced: bool) -> Any:
    import torch

    if tiled:
        vae.enable_tiling()
    try:
        with torch.inference_mode():
            parts = latents.split(1) if sliced else [latents]
            return torch.cat([vae.decode(p, return_dict=False)[0] for p in parts])
    finally:
        if tiled:
            vae.disable_tiling()
