"""Moving torch models between the GPU and a per-model pool of preallocated (pinned) host buffers.

How a model is moved, whatever it is (a plain nn.Module, an ultralytics YOLO, a diffusers pipeline, a
bitsandbytes 4-bit model):
- `tensor_slots(obj)` lists every tensor the model owns, once each, in a fixed order: parameters, buffers, plain
  tensor attributes of modules (ultralytics keeps `anchors`/`strides` there) and the tensors of bitsandbytes
  `QuantState`s (absmax, code, offset, nested absmax/code) that hang off `Params4bit` weights and `Linear4bit`
  modules. Diffusers pipelines are walked through `pipe.components`.
- Each tensor keeps its identity: only its `.data` is swapped. Optimizers, tied weights, peft wrappers and
  quant-state references stay valid.
- Down (GPU -> host): every device tensor is copied with `non_blocking=True` into its slice of the model's
  `PinnedPool` (one flat host buffer, allocated once, reused on every later swap), then one synchronize. A tensor
  unchanged since it was uploaded from this same pool (same object, same address, same version counter, no
  gradient) is not copied: the pool still holds exactly its bytes. Tensors made under `torch.inference_mode()`
  have no version counter: they are replaced by normal copies first (and so always count as changed).
- Up (host -> GPU): ONE allocation of the pool's size on the device and ONE copy of the whole pool, then every
  tensor becomes a view of its slice. That runs at the card's pinned host-to-device bandwidth, on the accelerator's
  side copy stream (`start_copy_in`), so it neither waits for nor blocks the kernels other threads queue meanwhile;
  on a swap-in from RAM the tensors are listed and re-pointed while the copy runs (`upload_pool`).
Assumptions: tensors that are distinct objects do not alias each other's memory (tied weights are the same
Parameter object, as in transformers); in-place edits made through `.data` (legacy style) are invisible to the
version counters, so code that edits weights that way must not rely on the skipped copy (trainable models keep
gradients and are always copied). Gradients are dropped when a model leaves the GPU.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from studio.residency.accel import Accelerator, HostBuffer

log = logging.getLogger(__name__)
ALIGN = 512  # bytes; keeps every slice aligned for any dtype and for vectorised kernels


def model_modules(obj: Any) -> list[nn.Module]:
    """The torch modules that make up `obj` (the module itself, a diffusers pipeline's components, or the modules
    held as attributes of a wrapper object)."""
    if isinstance(obj, nn.Module):
        return [obj]
    components = getattr(obj, "components", None)
    if isinstance(components, dict):
        return [m for m in components.values() if isinstance(m, nn.Module)]
    return [v for v in getattr(obj, "__dict__", {}).values() if isinstance(v, nn.Module)]


def is_torch_model(obj: Any) -> bool:
    return bool(model_modules(obj))


def _quant_state_tensors(qs: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    for value in vars(qs).values():
        if isinstance(value, torch.Tensor):
            yield value
        elif depth < 2 and type(value).__name__ == "QuantState":  # nested statistics (state2)
            yield from _quant_state_tensors(value, depth + 1)


def _module_tensors(m: nn.Module) -> Iterator[torch.Tensor]:
    for p in m._parameters.values():
        if p is None:
            continue
        yield p
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            yield from _quant_state_tensors(qs)
        for attr in ("CB", "SCB"):  # bitsandbytes 8-bit Int8Params
            t = getattr(p, attr, None)
            if isinstance(t, torch.Tensor):
                yield t
    yield from (b for b in m._buffers.values() if b is not None)
    for name, value in vars(m).items():
        if isinstance(value, torch.Tensor) and not name.startswith("_"):
            yield value
        elif name == "quant_state" and value is not None and type(value).__name__ == "QuantState":
            yield from _quant_state_tensors(value)


def tensor_slots(obj: Any) -> list[torch.Tensor]:
    """Every strided, non-meta tensor of the model, each object once, in a deterministic order."""
    seen: set[int] = set()
    out: list[torch.Tensor] = []
    for root in model_modules(obj):
        for m in root.modules():
            for t in _module_tensors(m):
                if id(t) in seen or t.layout != torch.strided or t.is_meta:
                    continue
                seen.add(id(t))
                out.append(t)
    return out


def device_bytes(obj: Any, accel: Accelerator) -> int:
    """Bytes of the model's tensors that live on the accelerator (unique storages)."""
    storages: dict[int, int] = {}
    for t in tensor_slots(obj):
        if accel.on_device(t):
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


@dataclass(frozen=True)
class Slot:
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def plan_layout(tensors: list[torch.Tensor]) -> tuple[tuple[Slot, ...], int]:
    slots, offset = [], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        slots.append(Slot(offset, nbytes, tuple(t.shape), t.dtype))
        offset += -(-nbytes // ALIGN) * ALIGN
    return tuple(slots), offset


def _view(flat: torch.Tensor, slot: Slot) -> torch.Tensor:
    return flat[slot.offset : slot.offset + slot.nbytes].view(slot.dtype).view(slot.shape)


class PinnedPool:
    """One model's host buffer: a slice per tensor slot, kept for the life of the registration and reused on
    every swap (so only the first swap-down pays for page-locking)."""

    def __init__(self, layout: tuple[Slot, ...], total: int, host: HostBuffer) -> None:
        self.layout, self.total, self.host = layout, total, host
        self.views = [_view(host.tensor, s) for s in layout]
        self.synced: list[tuple[int, int, int | None]] | None = None  # (id, data_ptr, version) after the upload
        self.reuses = 0  # swap-downs that reused these buffers

    @property
    def nbytes(self) -> int:
        return self.host.nbytes

    @property
    def pinned(self) -> bool:
        return self.host.pinned

    def holds(self, tensors: list[torch.Tensor]) -> bool:
        """True when `tensors` are, in order, views of this pool's slices (the model sits in this pool)."""
        return len(tensors) == len(self.views) and all(
            t.data_ptr() == v.data_ptr() and t.shape == v.shape and t.dtype == v.dtype
            for t, v in zip(tensors, self.views, strict=True)
        )

    def dirty(self, tensors: list[torch.Tensor]) -> list[bool]:
        """Per tensor: must it be copied back? No only when the device copy is unchanged since it was uploaded from
        this pool (same object, same address, same version counter, no gradient)."""
        if self.synced is None or len(self.synced) != len(tensors):
            return [True] * len(tensors)
        return [
            id(t) != ident or t.data_ptr() != ptr or version is None or _version(t) != version or t.grad is not None
            for t, (ident, ptr, version) in zip(tensors, self.synced, strict=True)
        ]

    def close(self) -> None:
        self.views = []
        self.synced = None
        self.host.close()


@dataclass(frozen=True)
class MoveResult:
    bytes: int  # bytes now resident in the destination tier
    copied: int  # bytes actually copied (0 when a clean swap-down was skipped)
    pool: PinnedPool | None


def _version(t: torch.Tensor) -> int | None:
    """The version counter, or None for inference-mode tensors (they have none, so they always count as changed)."""
    try:
        return t._version
    except RuntimeError:  # inference tensors (and tensors that once were) have no version counter
        return None


def _normalize_inference_tensors(obj: Any) -> None:
    """Buffers and tensor attributes made under `torch.inference_mode()` (ultralytics' anchors after a predict) have
    no version counter and must not get new `.data`; replace each with a normal copy (they are small)."""
    for root in model_modules(obj):
        for m in root.modules():
            for name, b in list(m._buffers.items()):
                if b is not None and _version(b) is None:
                    m._buffers[name] = b.clone()
            for name, v in list(vars(m).items()):
                if isinstance(v, torch.Tensor) and not name.startswith("_") and _version(v) is None:
                    setattr(m, name, v.clone())


def _drop_grads(tensors: list[torch.Tensor]) -> None:
    for t in tensors:
        if getattr(t, "grad", None) is not None:
            t.grad = None


def _bnb_modules() -> Any:
    """bitsandbytes' nn module when something imported it (only a model built with bitsandbytes can need it)."""
    return sys.modules.get("bitsandbytes.nn.modules")


def gpu_only(obj: Any) -> bool:
    """True for a model with bitsandbytes 4-bit weights: run on the CPU they are slow and get repacked in place."""
    Params4bit = getattr(_bnb_modules(), "Params4bit", None)
    if Params4bit is None:
        return False
    return any(isinstance(p, Params4bit) for root in model_modules(obj) for p in root.parameters())


def _fixup_bnb_cpu_packing(obj: Any) -> None:
    """bitsandbytes repacks 4-bit weights for its CPU kernels after a CPU forward; undo that before going to a GPU."""
    bnb = _bnb_modules()
    Params4bit = getattr(bnb, "Params4bit", None)
    inverse = getattr(bnb, "_convert_weight_packed_for_cpu_inverse", None)
    if Params4bit is None or inverse is None:
        return
    for root in model_modules(obj):
        for m in root.modules():
            p = m._parameters.get("weight")
            if isinstance(p, Params4bit) and getattr(p.quant_state, "packing_format_for_cpu", False):
                p.data, p.quant_state = inverse(p.data, p.quant_state)
                if hasattr(m, "quant_state"):
                    m.quant_state = p.quant_state


def park(
    tensors: list[torch.Tensor],
    pool: PinnedPool | None,
    accel: Accelerator,
    new_host: Callable[[int], HostBuffer],
    dirty: list[bool] | None = None,
) -> MoveResult:
    """Device tensors -> host pool, keeping each tensor's identity (only `.data` changes). `new_host(nbytes)`
    allocates a pool buffer when there is none or the layout changed; `dirty[i]` False skips copying tensor i."""
    layout, total = plan_layout(tensors)
    if pool is None or pool.layout != layout:
        if pool is not None:
            log.info("layout changed since the last swap (%d -> %d bytes); new host pool", pool.total, total)
            pool.close()
        pool, dirty = PinnedPool(layout, total, new_host(total)), None
    else:
        pool.reuses += 1
    copied = 0
    for t, view, slot, d in zip(tensors, pool.views, layout, dirty or [True] * len(tensors), strict=True):
        if d:
            view.copy_(t, non_blocking=pool.pinned)
            copied += slot.nbytes
    if copied:
        accel.synchronize()
    for t, view in zip(tensors, pool.views, strict=True):
        t.data = view
    pool.synced = None
    return MoveResult(total, copied, pool)


def adopt(tensors: list[torch.Tensor], pool: PinnedPool | None, new_host: Callable[[int], HostBuffer]) -> PinnedPool:
    """Host tensors -> views of a host pool (copied in once when they are not views of `pool` already)."""
    if pool is not None and pool.holds(tensors):
        return pool
    layout, total = plan_layout(tensors)
    if pool is None or pool.layout != layout:
        if pool is not None:
            pool.close()
        pool = PinnedPool(layout, total, new_host(total))
    for t, view in zip(tensors, pool.views, strict=True):
        view.copy_(t)
        t.data = view
    return pool


def upload(tensors: list[torch.Tensor], pool: PinnedPool, accel: Accelerator) -> MoveResult:
    """Pool -> device: ONE allocation of the pool's size and ONE copy, then every tensor becomes a view of its slice.
    On an allocation failure the tensors stay in the pool (the caller still owns it: nothing is orphaned)."""
    with _copying_in(pool, accel) as flat:
        _point_at(tensors, flat, pool)
    return MoveResult(pool.total, pool.total, pool)


def upload_pool(
    pool: PinnedPool, accel: Accelerator, tensors_of: Callable[[], list[torch.Tensor]]
) -> MoveResult | None:
    """`upload` for a model that already sits in `pool` (a swap-in from RAM): the copy starts first, and the model's
    tensors are listed (`tensors_of`) and pointed at their slices while it runs; that walk is Python over every
    tensor (milliseconds on a large model) and would otherwise come on top of the copy. Nobody reads the model
    before the move returns. None, with nothing changed, when the tensors turn out not to be this pool's views (the
    caller then adopts and uploads them)."""
    with _copying_in(pool, accel) as flat:
        tensors = tensors_of()
        if not pool.holds(tensors):
            return None
        _point_at(tensors, flat, pool)
    return MoveResult(pool.total, pool.total, pool)


@contextlib.contextmanager
def _copying_in(pool: PinnedPool, accel: Accelerator) -> Iterator[torch.Tensor]:
    """The device buffer of `pool`'s size with the pool's bytes on their way into it; on leaving, the copy has
    finished, also when the body raised: the buffer never goes back to the allocator while the copy may still
    write into it."""
    flat = accel.alloc(pool.total)
    wait = accel.start_copy_in(flat, pool.host.tensor[: pool.total], pool.pinned)
    try:
        yield flat
    finally:
        wait()


def _point_at(tensors: list[torch.Tensor], flat: torch.Tensor, pool: PinnedPool) -> None:
    for t, slot in zip(tensors, pool.layout, strict=True):
        t.data = _view(flat, slot)
    pool.synced = [(id(t), t.data_ptr(), _version(t)) for t in tensors]


def move_down(
    obj: Any, pool: PinnedPool | None, accel: Accelerator, new_host: Callable[[int], HostBuffer]
) -> MoveResult:
    """A model's GPU tensors -> its host pool; unchanged tensors are not copied, gradients are dropped."""
    _normalize_inference_tensors(obj)
    tensors = [t for t in tensor_slots(obj) if accel.on_device(t)]
    layout = plan_layout(tensors)[0]
    dirty = pool.dirty(tensors) if pool is not None and pool.layout == layout else None
    _drop_grads(tensors)
    return park(tensors, pool, accel, new_host, dirty)


def host_tensors(obj: Any, accel: Accelerator) -> list[torch.Tensor]:
    """The model's tensors that are in host memory, ready for `adopt` + `upload`."""
    _fixup_bnb_cpu_packing(obj)
    _normalize_inference_tensors(obj)
    return [t for t in tensor_slots(obj) if not accel.on_device(t) and t.device.type == "cpu"]


def move_up(obj: Any, pool: PinnedPool | None, accel: Accelerator, new_host: Callable[[int], HostBuffer]) -> MoveResult:
    """Host -> GPU: adopt the host tensors into a pool if they are not in one yet, then one allocation and one copy.
    (The manager calls `adopt` and `upload` itself, so that a failed upload leaves it holding the pool.)"""
    tensors = host_tensors(obj, accel)
    return upload(tensors, adopt(tensors, pool, new_host), accel)


def naive_move(obj: Any, device: str) -> None:
    """`.to(device)` on every module of the model: the plain baseline the benchmark compares against."""
    for m in model_modules(obj):
        m.to(device)
