"""Memory modes for image generation, chosen per request from the live GPU budget.

Policy, cheapest first (ComfyUI's order: degrade before failing):
1. Everything on the GPU: text encoders, UNet, VAE and the working memory of both stages fit in the budget.
2. Text encoders parked: generation leases its components stage by stage (text encoders, then UNet, then VAE);
   in this mode the backend moves the text encoders to pinned RAM once the prompt is encoded (`generate_with`).
   Left to the residency manager, the decode's room was made by evicting the UNet instead (a little cheaper per
   byte to bring back, 3x the bytes): 9.6 GB moved per image where the encoders move 3.
3. Tiled VAE decode: when UNet + VAE + the decoder's full-size activations do not fit, decode in overlapping
   tiles (a few percent slower, a fraction of the memory) rather than evicting the UNet.
4. Attention slicing: when even the UNet's own working memory does not fit beside its weights.
VAE slicing (decode one image of a batch at a time) is always used for batches: it costs nothing measurable.
An out-of-memory error during decode falls back to tiles anyway (`decode_latents`), because estimates are estimates.

Working-memory figures are per latent pixel (UNet) or image pixel (VAE) and per byte of the compute dtype; the mode
rule is the planner's (`studio.planner.formulas.image_modes`). Measured on an H200 with torch's memory history
(docs/planner.md): SDXL 1024 peaks in the fp32 VAE decode, 4.77 GiB of working memory (2.0 GiB of it a cuDNN
workspace) beside the weights: 11.42 GiB with every component on the GPU, 9.86-10.12 GiB with the text encoders
parked, against a 10.4-10.6 GiB budget under the 12 GiB cap.
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
    text_encoders_parked: bool = False
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
        text_encoders_parked=parked,
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
