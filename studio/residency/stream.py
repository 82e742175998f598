"""Running a model larger than the card: decoder layers that do not fit live in pinned RAM and stream in per use.

`LayerStreamer(layers, accel, resident=k)` keeps layers [0, k) where they are (on the GPU) and moves every later
layer's tensors into its own `PinnedPool` (the residency manager's host pools, studio/residency/pinned.py: one
page-locked buffer per layer, allocated once). A forward pre-hook uploads the layer (ONE device allocation and ONE
copy of the pool, at the card's pinned host-to-device bandwidth) and a forward hook points its tensors back at the
pool views, so the device copy is freed as soon as the layer has run: the GPU holds the resident layers plus one
streamed layer at a time. Weights are not changed by inference, so nothing is copied back.
Tensors keep their identity (only `.data` changes), so bitsandbytes quant states and tied weights stay valid.
Timing: before each upload the device is synchronised (so the previous layer's compute is not counted as moving),
then the upload is timed; `stats()` gives bytes, seconds moving and the share of the wall time spent moving.
Streaming is for inference only (no autograd through streamed layers) and the model must not be moved by anyone
else while a streamer is attached (`close()` detaches it and leaves the streamed layers in their pools).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from studio.residency.accel import Accelerator
from studio.residency.pinned import PinnedPool, adopt, park, tensor_slots, upload

log = logging.getLogger("studio.residency")
SMALL_BYTES = 4096


@dataclass(frozen=True)
class StreamStats:
    layers_streamed: int
    uploads: int
    bytes_moved: int
    moving_s: float
    wall_s: float  # since the streamer was attached or `reset()`

    @property
    def share_moving(self) -> float:
        return self.moving_s / self.wall_s if self.wall_s > 0 else 0.0


class _Streamed:
    def __init__(self, module: nn.Module, pool: PinnedPool, tensors: list[Any]) -> None:
        self.module, self.pool, self.tensors = module, pool, tensors


class LayerStreamer:
    def __init__(self, layers: Sequence[nn.Module], accel: Accelerator, resident: int) -> None:
        if not 0 <= resident <= len(layers):
            raise ValueError(f"resident layers must be 0..{len(layers)}, got {resident}")
        self.accel = accel
        self.resident = resident
        self._streamed: list[_Streamed] = []
        self._owned: set[int] | None = None
        self._hooks: list[Any] = []
        for layer in layers[resident:]:
            self.stream(layer)
        accel.empty_cache()
        self.reset()
        if self._streamed:
            log.info("streaming %d of %d layers from host memory (%.2f GB in pools, %s)", len(self._streamed),
                     len(layers), self.pool_bytes / 1e9, "pinned" if self.pinned else "pageable")  # fmt: skip

    def stream(self, layer: nn.Module) -> None:
        """Move one more layer into its host pool and stream it from there (a builder can add layers one by one,
        so a model larger than the card never has to be whole on it). Tensors under `SMALL_BYTES` (norm weights,
        quantisation code tables that bitsandbytes shares between layers) stay where they are."""
        tensors = [t for t in tensor_slots(layer) if t.numel() * t.element_size() >= SMALL_BYTES]
        on_device = [self.accel.on_device(t) for t in tensors]
        if all(on_device):
            pool = park(tensors, None, self.accel, self.accel.host_buffer).pool
        elif not any(on_device):
            pool = adopt(tensors, None, self.accel.host_buffer)
        else:
            raise ValueError(f"{type(layer).__name__} has tensors both on and off the device: place it first")
        entry = _Streamed(layer, pool, tensors)
        self._streamed.append(entry)
        self._owned = None
        self._hooks.append(layer.register_forward_pre_hook(lambda m, a, e=entry: self._bring(e)))
        self._hooks.append(layer.register_forward_hook(lambda m, a, o, e=entry: self._drop(e)))

    def owns(self, t: Any) -> bool:
        """Is `t` one of the tensors this streamer keeps in a host pool (the residency manager leaves those)?"""
        if self._owned is None:
            self._owned = {id(x) for e in self._streamed for x in e.tensors}
        return id(t) in self._owned

    @property
    def pool_bytes(self) -> int:
        return sum(e.pool.nbytes for e in self._streamed)

    @property
    def pinned(self) -> bool:
        return all(e.pool.pinned for e in self._streamed)

    def _bring(self, e: _Streamed) -> None:
        self.accel.synchronize()  # the previous layer's kernels finish first: they are compute, not moving
        t0 = time.perf_counter()
        upload(e.tensors, e.pool, self.accel)
        self._moving_s += time.perf_counter() - t0
        self._uploads += 1
        self._bytes += e.pool.total

    @staticmethod
    def _drop(e: _Streamed) -> None:
        for t, view in zip(e.tensors, e.pool.views, strict=True):
            t.data = view  # the device copy goes with its last reference

    def reset(self) -> None:
        self._t0, self._moving_s, self._uploads, self._bytes = time.perf_counter(), 0.0, 0, 0

    def stats(self) -> StreamStats:
        return StreamStats(len(self._streamed), self._uploads, self._bytes, self._moving_s,
                           time.perf_counter() - self._t0)  # fmt: skip

    def close(self, *, free_pools: bool = False) -> None:
        """Detach (the streamed layers then run from their pools); `free_pools`: the model is being dropped, so its
        host pools are given back now (pinned memory is not left to the garbage collector)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if free_pools:
            for e in self._streamed:
                e.pool.close()
            self._streamed, self._owned = [], None


def decoder_layers(model: Any) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM (`model.model.layers`), or a clear error."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no model.layers: layer streaming supports decoder-only LMs")
    return layers
