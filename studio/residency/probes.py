"""Live GPU memory readings for the residency manager and the GPU tab.

A `MemoryProbe` answers `read() -> CardReading | None` (None: there is no GPU to read):
- `NvmlProbe`: nvidia-ml-py. Card total/used/free and, where the driver gives it (not in every container), the
  memory of each process on the card, so other programs (a game, Ollama, a browser) are seen by name.
- `TorchProbe`: `torch.cuda.mem_get_info`; card-wide figures only. Used when NVML is missing (no libnvidia-ml,
  e.g. some WSL and container setups).
- `NoGpuProbe`: a machine without a GPU.
`detect_probe()` tries them in that order and says once which one it picked.
`ContextGauge` turns readings into our own CUDA context's size (what NVML sees of this process beyond PyTorch's
reserved bytes), robust to readings that race a move.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)
GiB = 2**30


@dataclass(frozen=True)
class ProcessUse:
    pid: int
    name: str
    used_bytes: int


@dataclass(frozen=True)
class CardReading:
    name: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    processes: tuple[ProcessUse, ...] = ()
    per_process: bool = False  # True when `processes` has every process, with its memory
    time: float = field(default_factory=time.time)

    def process(self, pid: int) -> ProcessUse | None:
        return next((p for p in self.processes if p.pid == pid), None)


class ContextGauge:
    """Our CUDA context: NVML's memory for this process less what PyTorch has reserved.

    One reading alone is not to be trusted: the NVML call and PyTorch's counter are read at different instants, and
    a model moved off the card between them (another thread's swap, a training lease giving way) leaves NVML
    showing gigabytes that PyTorch no longer holds; counted as context they shrink the budget, and a model that fits
    goes to the CPU. So a sample is kept only when PyTorch's reserved bytes were the same just before and just after
    the NVML call, and the value is the smallest sample of the last `window_s` seconds: a transient is forgotten,
    while memory that stays (a library allocating outside PyTorch) is counted once it has lasted the window.
    None until a usable sample exists (the caller then takes the reading as it is)."""

    def __init__(self, window_s: float = 10.0, clock=time.monotonic) -> None:
        self.window_s, self._clock = window_s, clock
        self._samples: deque[tuple[float, int]] = deque()
        self.raw_max = 0  # largest single-reading figure seen (for diagnostics)
        self.rejected = 0  # readings a move straddled

    def observe(self, reading: CardReading | None, pid: int, reserved_before: int, reserved_after: int) -> None:
        own = reading.process(pid) if reading is not None and reading.per_process else None
        if own is None:
            return
        if reserved_before != reserved_after:
            self.rejected += 1
            return
        ctx = max(0, own.used_bytes - reserved_after)
        self.raw_max = max(self.raw_max, ctx)
        now = self._clock()
        self._samples.append((now, ctx))
        while len(self._samples) > 1 and self._samples[0][0] < now - self.window_s:
            self._samples.popleft()

    @property
    def value(self) -> int | None:
        return min(c for _, c in self._samples) if self._samples else None


class MemoryProbe(Protocol):
    name: str

    def read(self) -> CardReading | None: ...


class NoGpuProbe:
    name = "none"

    def read(self) -> CardReading | None:
        return None


class NvmlProbe:
    """NVML readings for the card torch calls `cuda:<index>` (matched by UUID, so CUDA_VISIBLE_DEVICES is honoured)."""

    name = "nvml"

    def __init__(self, index: int = 0) -> None:
        import pynvml  # nvidia-ml-py; raises NVMLError_LibraryNotFound without the driver library

        self._nvml = pynvml
        pynvml.nvmlInit()
        self._handle = self._find_handle(index)
        raw = pynvml.nvmlDeviceGetName(self._handle)
        self.card_name = raw.decode() if isinstance(raw, bytes) else str(raw)
        self._names: dict[int, str] = {}

    def _find_handle(self, index: int):
        nv = self._nvml
        try:
            import torch

            if torch.cuda.is_available():
                uuid = str(torch.cuda.get_device_properties(index).uuid)
                return nv.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        except Exception as e:  # older drivers, MIG, odd UUID formats: the index is right in the common case
            log.debug("NVML handle by UUID failed (%s); using index %d", e, index)
        return nv.nvmlDeviceGetHandleByIndex(index)

    def _process_name(self, pid: int) -> str:
        if pid not in self._names:
            try:
                raw = self._nvml.nvmlSystemGetProcessName(pid)
                self._names[pid] = os.path.basename(raw.decode() if isinstance(raw, bytes) else str(raw))
            except Exception:
                self._names[pid] = f"pid {pid}"
        return self._names[pid]

    def _processes(self) -> tuple[tuple[ProcessUse, ...], bool]:
        nv, seen, complete = self._nvml, {}, True
        for query in (nv.nvmlDeviceGetComputeRunningProcesses, nv.nvmlDeviceGetGraphicsRunningProcesses):
            try:
                for p in query(self._handle):
                    used = getattr(p, "usedGpuMemory", None)
                    if used is None:  # "not available" (Windows WDDM, some containers)
                        complete = False
                        used = 0
                    seen[p.pid] = max(seen.get(p.pid, 0), int(used))
            except nv.NVMLError:
                complete = False
        procs = tuple(ProcessUse(pid, self._process_name(pid), used) for pid, used in sorted(seen.items()))
        return procs, complete

    def read(self) -> CardReading | None:
        mem = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        procs, complete = self._processes()
        return CardReading(self.card_name, int(mem.total), int(mem.used), int(mem.free), procs, complete)


class TorchProbe:
    name = "torch"

    def __init__(self, index: int = 0) -> None:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device")
        self._torch, self._index = torch, index
        self.card_name = torch.cuda.get_device_name(index)

    def read(self) -> CardReading | None:
        free, total = self._torch.cuda.mem_get_info(self._index)
        return CardReading(self.card_name, int(total), int(total - free), int(free))


def detect_probe(index: int = 0) -> MemoryProbe:
    """NVML if the driver library is there, else torch.cuda, else no GPU. Logs which one once."""
    try:
        probe: MemoryProbe = NvmlProbe(index)
        log.info("GPU readings from NVML: %s", probe.card_name)  # type: ignore[attr-defined]
        return probe
    except ImportError:
        reason = "nvidia-ml-py is not installed"
    except Exception as e:  # pynvml.NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
        reason = f"{type(e).__name__}: {e}"
    try:
        probe = TorchProbe(index)
        log.info("NVML unavailable (%s); GPU readings from torch.cuda.mem_get_info", reason)
        return probe
    except Exception as e:
        log.info("No GPU (%s; torch: %s): the CPU is the only tier", reason, e)
        return NoGpuProbe()
