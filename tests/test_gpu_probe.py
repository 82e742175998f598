"""GPU memory probes: NVML through a stand-in pynvml, NVML missing, torch fallback, no GPU, the fake card."""

from __future__ import annotations

import os
import sys
import types

import pytest

from studio.residency import probes as gpu
from studio.residency.probes import NoGpuProbe, NvmlProbe, detect_probe
from studio.residency.simulated import FakeProbe

GiB = 2**30


def _fake_pynvml(*, missing_library: bool = False, per_process: bool = True) -> types.ModuleType:
    mod = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    class NVMLError_LibraryNotFound(NVMLError):
        pass

    def init():
        if missing_library:
            raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")

    def proc(pid, used):
        return types.SimpleNamespace(pid=pid, usedGpuMemory=used if per_process else None)

    mod.NVMLError, mod.NVMLError_LibraryNotFound = NVMLError, NVMLError_LibraryNotFound
    mod.nvmlInit = init
    mod.nvmlDeviceGetHandleByIndex = lambda i: f"handle{i}"
    mod.nvmlDeviceGetHandleByUUID = lambda u: "handle0"
    mod.nvmlDeviceGetName = lambda h: b"NVIDIA GeForce RTX 4070 Ti"
    mod.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=12 * GiB, used=5 * GiB, free=7 * GiB)
    mod.nvmlDeviceGetComputeRunningProcesses = lambda h: [proc(os.getpid(), 3 * GiB), proc(999, GiB)]
    mod.nvmlDeviceGetGraphicsRunningProcesses = lambda h: [proc(1234, GiB)]
    mod.nvmlSystemGetProcessName = lambda pid: {999: b"/usr/bin/ollama", 1234: b"C:\\game.exe"}.get(pid, b"python")
    return mod


def test_nvml_probe_reads_card_and_processes(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml())
    reading = NvmlProbe().read()
    assert reading.name == "NVIDIA GeForce RTX 4070 Ti"
    assert (reading.total_bytes, reading.used_bytes, reading.free_bytes) == (12 * GiB, 5 * GiB, 7 * GiB)
    assert reading.per_process and reading.process(os.getpid()).used_bytes == 3 * GiB
    assert {p.pid: p.name for p in reading.processes}[999] == "ollama"


def test_nvml_without_per_process_memory_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(per_process=False))
    reading = NvmlProbe().read()
    assert not reading.per_process and reading.used_bytes == 5 * GiB


def test_nvml_library_missing_falls_back(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(missing_library=True))
    monkeypatch.setattr(gpu, "TorchProbe", _raising_torch_probe)
    with caplog.at_level("INFO", logger="studio.residency.probes"):
        probe = detect_probe()
    assert isinstance(probe, NoGpuProbe) and probe.read() is None
    assert "NVMLError_LibraryNotFound" in caplog.text


def test_nvml_missing_uses_torch_readings_when_cuda_is_there(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(missing_library=True))

    class FakeTorchProbe:
        name = "torch"

        def __init__(self, index: int = 0) -> None:
            pass

    monkeypatch.setattr(gpu, "TorchProbe", FakeTorchProbe)
    assert detect_probe().name == "torch"


def _raising_torch_probe(index: int = 0):
    raise RuntimeError("torch sees no CUDA device")


def test_residency_manager_on_a_machine_without_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(missing_library=True))
    from studio.residency import ResidencyManager

    manager = ResidencyManager("cpu")
    assert manager.snapshot().card is None and manager.snapshot().probe == "none"


def test_fake_probe_processes_come_and_go():
    probe = FakeProbe(12 * GiB)
    probe.attach_own(lambda: 2 * GiB)
    probe.set_process(7, "browser", GiB)
    r = probe.read()
    assert (r.used_bytes, r.free_bytes) == (3 * GiB, 9 * GiB) and r.per_process
    probe.remove_process(7)
    assert probe.read().used_bytes == 2 * GiB
    with pytest.raises(ValueError):
        FakeProbe(0)
