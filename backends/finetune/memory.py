"""Activation memory for long sequences: decoder-layer checkpoints offloaded to pinned RAM, and a tiled MLP.

- `offload_checkpointing(model)`: every transformers `GradientCheckpointingLayer` (decoder layer) runs without
  saving activations; its input (B, T, H) is copied to pinned CPU memory and the GPU copy is dropped. In the
  backward the input comes back, the layer is recomputed with the same RNG state (so dropout masks match) and
  back-propagated (autocast as in the forward: backward runs outside the caller's autocast). The GPU then holds one layer's working set instead of one (B, T, H) tensor per layer:
  at T = 24k on Llama-3.1-8B that is 32 x 196 MB = 6.3 GB saved. Needs the input embeddings to require grad
  (`enable_input_require_grads`), as any reentrant-style checkpoint does.
- `tile_mlp(model, tile)`: the MLP is token-wise, so for T > tile it runs on `tile`-token slices, each inside a
  checkpoint; its (T, intermediate) activations (14336 wide on Llama-3.1-8B, several copies in fp32 for LoRA)
  never exist for the whole sequence.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)


def _rng_state(device: torch.device) -> tuple[Any, Any]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


class _OffloadedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: Any, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.run, ctx.device, ctx.dtype = run, hidden.device, hidden.dtype
        ctx.rng = _rng_state(hidden.device)
        kind = hidden.device.type
        ctx.amp = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))  # replayed in backward
        if hidden.device.type == "cuda":
            saved = torch.empty(hidden.shape, dtype=hidden.dtype, device="cpu", pin_memory=True)
            saved.copy_(hidden.detach(), non_blocking=True)
        else:
            saved = hidden.detach().clone()
        ctx.saved_hidden = saved
        with torch.no_grad():
            out = run(hidden)
        if not isinstance(out, torch.Tensor):
            raise TypeError("offloaded checkpointing needs decoder layers that return one tensor")
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[None, torch.Tensor]:  # type: ignore[override]
        hidden = ctx.saved_hidden.to(ctx.device, non_blocking=True).requires_grad_(True)
        ctx.saved_hidden = None
        cpu_rng, cuda_rng = ctx.rng
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        kind, amp_on, amp_dtype = ctx.amp
        with (
            torch.random.fork_rng(devices=devices),
            torch.enable_grad(),
            torch.autocast(kind, dtype=amp_dtype, enabled=amp_on),
        ):
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, ctx.device)
            out = ctx.run(hidden)
        torch.autograd.backward(out, grad_out)
        return None, hidden.grad


def offloaded_checkpoint(run: Any, hidden: torch.Tensor, *args: Any) -> torch.Tensor:
    """The `_gradient_checkpointing_func` transformers calls as fn(partial(forward, **kwargs), *args)."""
    if args:
        return checkpoint(run, hidden, *args, use_reentrant=False)
    if not torch.is_grad_enabled():
        return run(hidden)
    return _OffloadedLayer.apply(run, hidden)


def checkpoint_layers(model: Any, *, offload: bool) -> int:
    """Checkpoint every decoder layer, with the input offloaded to RAM or (offload=False) non-reentrant in place."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    def plain(run: Any, *args: Any) -> Any:
        return checkpoint(run, *args, use_reentrant=False)

    fn = offloaded_checkpoint if offload else plain
    n = 0
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.gradient_checkpointing = True
            module._gradient_checkpointing_func = fn
            n += 1
    if n == 0:
        raise ValueError(f"{type(model).__name__} has no checkpointable decoder layers")
    if offload:
        causal = model.get_base_model() if hasattr(model, "get_base_model") else model
        causal.enable_input_require_grads()
    log.info("checkpointing %d decoder layers (%s)", n, "inputs offloaded to pinned RAM" if offload else "on GPU")
    return n


def _tiled_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    tile = self._onecard_tile
    if x.dim() != 3 or x.shape[1] <= tile:
        return self._onecard_forward(x)
    slices = [x[:, i : i + tile] for i in range(0, x.shape[1], tile)]
    if torch.is_grad_enabled():
        return torch.cat([checkpoint(self._onecard_forward, s, use_reentrant=False) for s in slices], dim=1)
    return torch.cat([self._onecard_forward(s) for s in slices], dim=1)  # the no-grad pass of an offloaded layer


def tile_mlp(model: Any, tile: int = 4096) -> int:
    """Run every decoder layer's `.mlp` on `tile`-token slices (each checkpointed) when the sequence is longer."""
    n = 0
    for module in model.modules():
        mlp = getattr(module, "mlp", None)
        if isinstance(mlp, torch.nn.Module) and not hasattr(mlp, "_onecard_tile") and hasattr(mlp, "down_proj"):
            mlp._onecard_forward = mlp.forward
            mlp._onecard_tile = tile
            mlp.forward = types.MethodType(_tiled_forward, mlp)
            n += 1
    return n


def embeddings_to_ram(model: Any) -> bool:
    """Keep a frozen, untied input-embedding table in CPU RAM: the lookup runs there and only the (B, T, H) rows
    go to the GPU (1.05 GB saved on Llama-3.1-8B). Returns False (and changes nothing) for tied embeddings."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    if (head is not None and head.weight is emb.weight) or emb.weight.requires_grad:
        return False
    device = emb.weight.device
    if device.type == "cpu":
        return False
    # A plain CPU tensor, no longer a parameter: neither `.to()` nor the residency manager's training lease (which
    # places a trainer's host-memory parameters on the device) moves it back to the GPU.
    weight = emb.weight.detach().to("cpu")
    del emb._parameters["weight"]
    emb.weight = weight

    def before(module: Any, args: tuple) -> tuple:
        return (args[0].to("cpu"), *args[1:])

    def after(module: Any, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out.to(device, non_blocking=True)

    emb.register_forward_pre_hook(before)
    emb.register_forward_hook(after)
    lm._onecard_compute_device = device
    log.info("input embeddings (%d MB) kept in RAM", emb.weight.numel() * emb.weight.element_size() // 2**20)
    return True


def compute_device(lm: Any) -> torch.device:
    """Where the model computes (the input embeddings may live in RAM)."""
    return getattr(lm, "_onecard_compute_device", None) or lm.get_input_embeddings().weight.device
