"""The compute device as the residency manager sees it: where fast-tier buffers come from, how memory is counted.

- `CudaAccelerator`: the real GPU. Host buffers are page-locked by registering ordinary memory with
  `cudaHostRegister` (exact size; torch's pinned allocator would round 6.8 GB up to 8 GB), falling back to
  `pin_memory=True`, then to pageable memory with a warning.
- `CpuAccelerator`: no GPU; the CPU is the only compute tier.
- `SimulatedAccelerator`: for tests on a CPU-only machine. "Device" buffers are CPU tensors whose storages it
  tracks (so it knows exactly which tensors are "on the GPU" and how many bytes are live), it raises
  `torch.OutOfMemoryError` past the FakeProbe card's free memory, and it reports its use to that probe.
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from studio.gpu import FakeProbe

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


class SimulatedAccelerator:
    """A pretend GPU for CPU-only tests; see the module docstring. `context_bytes` plays the CUDA context."""

    kind, device, load_device, has_gpu_tier = "simulated", "cpu", "cuda", True

    def __init__(self, probe: FakeProbe, context_bytes: int = 0) -> None:
        self.probe, self.context_bytes = probe, context_bytes
        self._live: dict[int, int] = {}  # storage data_ptr -> bytes
        self._lock = threading.Lock()
        self._peak = 0
        self.empty_cache_calls = 0
        self.syncs = 0
        self.cached_bytes = 0  # freed blocks a caching allocator would keep (tests set it; empty_cache clears it)
        probe.attach_own(lambda: self.reserved() + self.context_bytes)

    def _forget(self, ptr: int) -> None:
        with self._lock:
            self._live.pop(ptr, None)

    def alloc(self, nbytes: int) -> torch.Tensor:
        limit = self.probe.total_bytes - self.probe.others_bytes() - self.context_bytes - self.cached_bytes
        with self._lock:
            used = sum(self._live.values())
            if used + nbytes > limit:
                raise torch.OutOfMemoryError(
                    f"CUDA out of memory (simulated). Tried to allocate {nbytes} bytes; {max(0, limit - used)} free."
                )
            t = torch.empty(max(nbytes, 1), dtype=torch.uint8)[:nbytes]
            storage = t.untyped_storage()
            self._live[storage.data_ptr()] = nbytes
            self._peak = max(self._peak, used + nbytes)
        weakref.finalize(storage, self._forget, storage.data_ptr())
        return t

    def on_device(self, t: torch.Tensor) -> bool:
        try:
            return t.untyped_storage().data_ptr() in self._live
        except (RuntimeError, NotImplementedError):
            return False

    def host_buffer(self, nbytes: int) -> HostBuffer:
        return HostBuffer(torch.empty(nbytes, dtype=torch.uint8), pinned=False)

    def synchronize(self) -> None:
        self.syncs += 1

    def empty_cache(self) -> None:
        self.empty_cache_calls += 1
        self.cached_bytes = 0

    def allocated(self) -> int:
        with self._lock:
            return sum(self._live.values())

    def reserved(self) -> int:
        return self.allocated() + self.cached_bytes

    def total_bytes(self) -> int:
        return self.probe.total_bytes

    def reset_peak(self) -> None:
        with self._lock:
            self._peak = sum(self._live.values())

    def peak(self) -> int:
        with self._lock:
            return self._peak

    def working_memory(self, nbytes: int) -> Any:
        """Allocate `nbytes` of "GPU" memory, as a model's activations would (raises OutOfMemoryError past free)."""
        return self.alloc(nbytes)
