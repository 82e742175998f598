"""The simulated card: test doubles for CPU-only machines (tests and `--quick` benchmarks; never production code).

- `FakeProbe`: a programmable card: other processes come and go, our own use comes from a callback.
- `SimulatedAccelerator`: "device" buffers are CPU tensors whose storages it tracks (so it knows exactly which
  tensors are "on the GPU" and how many bytes are live), it raises `torch.OutOfMemoryError` past the FakeProbe
  card's free memory, and it reports its use to that probe.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch

from studio.residency.accel import HostBuffer
from studio.residency.probes import CardReading, ProcessUse


class FakeProbe:
    """A programmable card: `set_process(pid, name, bytes)` / `remove_process(pid)` for other programs; our own use
    comes from `attach_own(fn)` (the simulated accelerator attaches its allocated bytes) plus `own_extra_bytes`."""

    name = "fake"

    def __init__(self, total_bytes: int, card_name: str = "Fake 12 GB card") -> None:
        if total_bytes <= 0:
            raise ValueError(f"total_bytes must be positive, got {total_bytes}")
        self.total_bytes, self.card_name = int(total_bytes), card_name
        self.own_extra_bytes = 0
        self.reads = 0
        self._others: dict[int, ProcessUse] = {}
        self._own_fn: Callable[[], int] = lambda: 0
        self._lock = threading.Lock()

    def attach_own(self, fn: Callable[[], int]) -> None:
        self._own_fn = fn

    def set_process(self, pid: int, name: str, used_bytes: int) -> None:
        with self._lock:
            self._others[pid] = ProcessUse(pid, name, int(used_bytes))

    def remove_process(self, pid: int) -> None:
        with self._lock:
            self._others.pop(pid, None)

    def others_bytes(self) -> int:
        with self._lock:
            return sum(p.used_bytes for p in self._others.values())

    def read(self) -> CardReading | None:
        own = int(self._own_fn()) + self.own_extra_bytes
        with self._lock:
            self.reads += 1
            procs = (*self._others.values(), ProcessUse(os.getpid(), "this studio", own))
        used = min(self.total_bytes, sum(p.used_bytes for p in procs))
        return CardReading(self.card_name, self.total_bytes, used, self.total_bytes - used, procs, True)


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

    def start_copy_in(self, dst: torch.Tensor, src: torch.Tensor, pinned: bool) -> Callable[[], None]:
        dst.copy_(src)

        def wait() -> None:
            self.syncs += 1

        return wait

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
