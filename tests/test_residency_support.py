"""Small models and a simulated card for the residency tests (CPU only)."""

from __future__ import annotations

import threading

import torch
from torch import nn

from studio.residency import ResidencyManager
from studio.residency.simulated import FakeProbe, SimulatedAccelerator

MiB = 2**20


class Net(nn.Module):
    """`mib` MiB of fp32 weights in one linear layer plus a buffer and a plain tensor attribute (like YOLO's anchors)."""

    def __init__(self, mib: float) -> None:
        super().__init__()
        self.fc = nn.Linear(256, max(1, int(mib * MiB / 1024)), bias=False)
        self.register_buffer("scale", torch.full((4,), 2.0))
        self.anchors = torch.arange(6.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scale[0] + self.anchors.sum()


class NetLoader:
    def __init__(self, key: str, mib: float, seed: int = 0) -> None:
        self.key, self.mib, self.seed = key, mib, seed
        self.loads, self.releases, self.devices = 0, 0, []
        self._lock = threading.Lock()

    def estimate_bytes(self) -> int:
        return int(self.mib * MiB)

    def load(self, device: str) -> Net:
        with self._lock:
            self.loads += 1
            self.devices.append(device)
        torch.manual_seed(self.seed)
        return Net(self.mib).eval().requires_grad_(False)

    def release(self, obj) -> None:
        with self._lock:
            self.releases += 1


def sim_manager(
    total_mib: float = 100, reserve_mib: float = 0, **kwargs
) -> tuple[ResidencyManager, FakeProbe, SimulatedAccelerator]:
    probe = FakeProbe(int(total_mib * MiB))
    accel = SimulatedAccelerator(probe)
    kwargs.setdefault("wait_timeout_s", 5.0)
    kwargs.setdefault("ram_cap_bytes", 10 * 2**30)
    manager = ResidencyManager(probe=probe, accelerator=accel, reserve_bytes=int(reserve_mib * MiB), **kwargs)
    return manager, probe, accel


def tiers(manager: ResidencyManager) -> dict[str, str]:
    return {m.key: m.tier for m in manager.snapshot().models}


def on_device(accel: SimulatedAccelerator, model: nn.Module) -> bool:
    return all(accel.on_device(t) for t in [*model.parameters(), *model.buffers()])
