"""What every benchmark shares: the machine and package versions, quantiles, byte formatting, targets, and writing
the JSON + markdown results atomically under studio/bench/results/ (named after the device they ran on).

    from studio.bench.common import Target, machine_info, quantile, write_results
    targets = [Target("decode tok/s", 312.0, 300, "tok/s").as_dict()]
    write_results(out_dir, "llm", result | {"targets": targets}, markdown_text)
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from studio.units import fmt_bytes, quantile

__all__ = ["Target", "fmt_bytes", "machine_info", "quantile", "versions", "write_results"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Target:
    """One target of an issue: `met` when value >= goal (or <= goal with higher_is_better=False)."""

    name: str
    value: float | None
    goal: float
    unit: str
    higher_is_better: bool = True

    @property
    def met(self) -> bool:
        if self.value is None:
            return False
        return self.value >= self.goal if self.higher_is_better else self.value <= self.goal

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["higher_is_better"]
        out["goal"] = f"{'>=' if self.higher_is_better else '<='} {self.goal}"
        out["met"] = self.met
        return out


def versions(*names: str) -> dict[str, str | None]:
    """Installed versions of the given distributions (None when absent), plus Python's."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        return platform.processor() or "unknown"


def gpu_name() -> str | None:
    """The first CUDA device's name, or None (never initialises CUDA unless torch is already imported)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(0)


def device_tag() -> str:
    """'h200', 'rtx-4070-ti', ... or 'cpu': the suffix of result file names."""
    name = gpu_name()
    if not name:
        return "cpu"
    words = name.lower().replace("nvidia", "").replace("geforce", "").split()
    return "-".join(w for w in words if w.isalnum() or "-" in w) or "gpu"


def _command() -> str:
    """How this benchmark was started, as `python -m studio.bench.NAME args` (the module path, not the file's)."""
    if not sys.argv or not sys.argv[0].endswith(".py"):
        return " ".join(sys.argv)
    path = Path(sys.argv[0]).resolve()
    parts = path.with_suffix("").parts
    module = ".".join(parts[parts.index("studio") :]) if "studio" in parts else path.stem
    return " ".join(["python -m", module, *sys.argv[1:]])


def machine_info(*packages: str) -> dict[str, Any]:
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node() or "unknown",
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "gpu": gpu_name(),
        "os": platform.platform(),
        "command": _command(),
        "versions": versions(*packages),
    }


def describe_machine(m: dict[str, Any]) -> str:
    """One line for a results file: host, CPU, GPU, OS and the versions recorded by `machine_info`."""
    gpu = m.get("gpu") or "no GPU used"
    pkgs = ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items() if v)
    return f"{m.get('host')}: {m.get('cores')} cores ({m.get('cpu')}), {gpu}, {m.get('os')}; {pkgs}"


def targets_table(targets: list[dict[str, Any]]) -> str:
    """Markdown table of the `targets` list."""
    rows = ["| target | value | goal | unit | met |", "|---|---|---|---|---|"]
    for t in targets:
        value = "-" if t["value"] is None else f"{t['value']:.4g}" if isinstance(t["value"], float) else t["value"]
        rows.append(f"| {t['name']} | {value} | {t['goal']} | {t['unit']} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(rows)


def write_results(out_dir: Path, name: str, result: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write `<name>-<device>.json` and `.md` atomically; the JSON must carry a top-level `targets` list."""
    from studio.safety import atomic_write_json, atomic_write_text

    if not isinstance(result.get("targets"), list):
        raise ValueError("benchmark results need a top-level 'targets' list (name, value, goal, unit, met)")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{device_tag()}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    atomic_write_json(json_path, result)
    atomic_write_text(md_path, markdown.rstrip() + "\n")
    return json_path, md_path
