"""The compute device as the residency manager sees it: where fast-tier buffers come from, how memory is counted.

- `CudaAccelerator`: the real GPU. Host buffers are page-locked by registering ordinary memory with
  `cudaHostRegister` (exact size; torch's pinned allocator would round 6.8 GB up to 8 GB), falling back to
  `pin_memory=True`, then to pageable memory with a warning.
- `CpuAccelerator`: no GPU; the CPU is the only compute tier.
The simulated card for tests (a pretend GPU on the CPU) is in studio/residency/simulated.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

log = logging.getLogger(__name__)


@dataclass
class HostBuffer:
    """One flat uint8 host tensor; `pinned` says whether H2D copies from it run at full speed."""

    tensor: torch.Tensor
    pinned: bool
    registered: bool = False

    @property
    def nbytes(self) -> int:
        return self.tensor.numel()

    def close(self) -> None:
        """Unpin (the memory itself is freed when the last view of it goes)."""
        if self.registered:
            self.registered = False
            try:
                torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            except Exception as e:  # pragma: no cover - driver teardown at exit
                log.debug("cudaHostUnregister failed: %s", e)

    def __del__(self) -> None:
        self.close()


def _done() -> None:
    """The wait of a copy that already finished (synchronous devices)."""


ALLOC_CONF = "expandable_segments:True"


def configure_allocator() -> str | None:
    """Configure PyTorch's CUDA caching allocator against fragmentation (expandable segments: freed blocks can be
    reused for larger requests instead of sitting reserved-but-unallocated). Must run before torch initialises CUDA;
    a setting the user made in PYTORCH_CUDA_ALLOC_CONF is kept. Returns the configuration in force (None: unknown)."""
    import os
    import sys

    current = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    if current is None:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = current = ALLOC_CONF
        torch_mod = sys.modules.get("torch")
        if torch_mod is not None and torch_mod.cuda.is_initialized():  # too late for the variable: set it live
            try:
                torch_mod.cuda.memory._set_allocator_settings(ALLOC_CONF)
            except Exception as e:  # pragma: no cover - older torch
                log.info("could not enable expandable segments live (%s)", e)
                return None
    return current


def is_oom_error(exc: BaseException) -> bool:
    """torch's OutOfMemoryError, or another framework's (bitsandbytes, CTranslate2) out-of-memory RuntimeError."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class Accelerator(Protocol):
    kind: str  # "cuda" | "cpu" | "simulated"
    device: str  # torch device of fast-tier tensors; what backends put their inputs on
    load_device: str  # what Loader.load / Loader.to_device receive for the GPU tier
    has_gpu_tier: bool

    def alloc(self, nbytes: int) -> torch.Tensor: ...
    def on_device(self, t: torch.Tensor) -> bool: ...
    def host_buffer(self, nbytes: int) -> HostBuffer: ...
    def synchronize(self) -> None: ...
    def start_copy_in(self, dst: torch.Tensor, src: torch.Tensor, pinned: bool) -> Callable[[], None]: ...
    def empty_cache(self) -> None: ...
    def allocated(self) -> int: ...
    def reserved(self) -> int: ...
    def total_bytes(self) -> int: ...
    def reset_peak(self) -> None: ...
    def peak(self) -> int: ...


class CpuAccelerator:
    kind, device, load_device, has_gpu_tier = "cpu", "cpu", "cpu", False

    def alloc(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def on_device(self, t: torch.Tensor) -> bool:
        return False

    def host_buffer(self, nbytes: int) -> HostBuffer:
        return HostBuffer(torch.empty(nbytes, dtype=torch.uint8), pinned=False)

    def synchronize(self) -> None:
        pass

    def start_copy_in(self, dst: torch.Tensor, src: torch.Tensor, pinned: bool) -> Callable[[], None]:
        dst.copy_(src)
        return _done

    def empty_cache(self) -> None:
        pass

    def allocated(self) -> int:
        return 0

    reserved = allocated
    total_bytes = allocated
    peak = allocated

    def reset_peak(self) -> None:
        pass


class CudaAccelerator:
    kind, has_gpu_tier = "cuda", True

    def __init__(self, index: int = 0) -> None:
        self.index = index
        self.device = self.load_device = "cuda" if index == 0 else f"cuda:{index}"
        self._warned_pageable = False
        self._copy_stream: torch.cuda.Stream | None = None

    def alloc(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def on_device(self, t: torch.Tensor) -> bool:
        return t.is_cuda

    def host_buffer(self, nbytes: int) -> HostBuffer:
        t = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes == 0:
            return HostBuffer(t, pinned=True)
        try:
            err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, 0)
            if int(err) == 0:
                return HostBuffer(t, pinned=True, registered=True)
            log.debug("cudaHostRegister(%d bytes) returned %s; trying pin_memory", nbytes, err)
        except Exception as e:
            log.debug("cudaHostRegister unavailable (%s); trying pin_memory", e)
        try:
            return HostBuffer(torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), pinned=True)
        except RuntimeError as e:
            if not self._warned_pageable:
                log.warning("Could not pin %d bytes of host memory (%s); swaps will be slower", nbytes, e)
                self._warned_pageable = True
            return HostBuffer(t, pinned=False)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.index)

    def start_copy_in(self, dst: torch.Tensor, src: torch.Tensor, pinned: bool) -> Callable[[], None]:
        """Start a host -> device copy on a side stream; the returned function waits for that copy alone. On the
        shared default stream with a device-wide synchronize, a swap-in also waited for every kernel that other
        threads queued meanwhile (a neighbour's forward pass); a non-blocking side stream lets the copy run beside
        them. The side stream first waits for the work queued so far on the current stream: `dst` was just
        allocated there, and its block may have been freed by tensors that queued kernels still read."""
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.index)
        side, current = self._copy_stream, torch.cuda.current_stream(self.index)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            dst.copy_(src, non_blocking=pinned)
            done = torch.cuda.Event()
            done.record(side)
        return done.synchronize

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def allocated(self) -> int:
        return int(torch.cuda.memory_allocated(self.index))

    def reserved(self) -> int:
        return int(torch.cuda.memory_reserved(self.index))

    def total_bytes(self) -> int:
        return int(torch.cuda.get_device_properties(self.index).total_memory)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.index)

    def peak(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.index))
