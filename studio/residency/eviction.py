"""Which idle models leave a tier when room is needed.

`GreedyDualSize` (the studio's policy) is GreedyDual-Size-Frequency (Cao & Irani 1997; Cherkasova 1998):
    priority(m) = L_at_last_use(m) + F(m) * reload_seconds(m) / bytes(m)
- reload_seconds is measured: the time the model last took to come back to the GPU from the tier it would drop
  to (pinned RAM -> GPU for a GPU eviction, disk -> GPU when its pool would not fit in RAM, disk -> RAM for a RAM
  eviction). Before a measurement exists it is estimated from the bytes (10 GB/s from RAM, 1 GB/s from disk).
- cost per byte, not cost: a model that is cheap to bring back per byte it frees goes first.
- F is the use count decayed with a 5-minute half-life, so a burst of chat an hour ago does not pin the LLM.
- L ("inflation") rises to the priority of each victim, so a model that has not been used for a while falls
  behind models used since: recency without a separate clock.
Victims are taken lowest priority first until enough bytes are free, then any victim whose eviction turns out not
to be needed (the others already free enough) is spared, highest priority first.
`LeastRecentlyUsed` orders by last use only; the benchmark compares the two.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

HALF_LIFE_S = 300.0
RAM_BW_GUESS = 10e9  # bytes/s before the first measured swap-in
DISK_BW_GUESS = 1e9  # bytes/s before the first measured load


@dataclass
class Candidate:
    key: str
    bytes: int
    reload_s: float
    freq: float
    last_use: float  # monotonic seconds
    base: float  # L when it was last used


def decayed(freq: float, since_s: float) -> float:
    return freq * math.pow(0.5, max(0.0, since_s) / HALF_LIFE_S)


class GreedyDualSize:
    name = "gds"

    def __init__(self) -> None:
        self.inflation = 0.0

    def priority(self, c: Candidate, now: float) -> float:
        f = max(1.0, decayed(c.freq, now - c.last_use))
        return c.base + f * c.reload_s / max(c.bytes, 1) * 1e9  # seconds per GB keeps the numbers readable

    def on_evict(self, c: Candidate, now: float) -> None:
        self.inflation = max(self.inflation, self.priority(c, now))


class LeastRecentlyUsed:
    name = "lru"
    inflation = 0.0

    def priority(self, c: Candidate, now: float) -> float:
        return c.last_use

    def on_evict(self, c: Candidate, now: float) -> None:
        pass


def choose_victims(
    candidates: Sequence[Candidate], need_bytes: int, policy: GreedyDualSize | LeastRecentlyUsed, now: float
) -> list[Candidate] | None:
    """Lowest-priority candidates freeing at least `need_bytes`; None when even all of them are not enough."""
    if need_bytes <= 0:
        return []
    ranked = sorted(candidates, key=lambda c: policy.priority(c, now))
    chosen, freed = [], 0
    for c in ranked:
        if freed >= need_bytes:
            break
        chosen.append(c)
        freed += c.bytes
    if freed < need_bytes:
        return None
    for c in sorted(chosen, key=lambda c: policy.priority(c, now), reverse=True):
        if freed - c.bytes >= need_bytes:
            chosen.remove(c)
            freed -= c.bytes
    return chosen
