"""Small formatting and statistics helpers shared by the core, the tabs and the benchmarks."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def fmt_bytes(n: float | None, missing: str = "?") -> str:
    """Bytes in the largest fitting binary unit, two decimals: '512 B', '3.40 MB', '6.76 GB' (GB = 2**30 bytes)."""
    if n is None:
        return missing
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def quantile(values: list[float], q: float, empty: T = None) -> float | T:
    """Nearest-rank quantile (q in [0, 1]) of the values; `empty` when there are none."""
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))] if s else empty
