"""Measured footprints, kept across restarts, that correct the planner's formulas per model family.

Each measurement is one trustworthy residency lease (no other lease or move overlapped it, see
studio/residency/leasing.py) of a model whose backend declared the job it runs (`VramPlanner.declare`): the
weights the manager measured at load and the working-memory peak of the lease, beside what the formula predicted
for the same model and shape. A family's correction is the median ratio measured / predicted over its last
`WINDOW` measurements, separately for weights and for working memory, clamped to [0.5, 2] (a wild reading cannot
flip a verdict on its own); families are "llm:chat", "llm:lora", "sdxl:image", ... so chat measurements never
correct training. The file is JSON under `<data_dir>/planner/footprints.json`, written atomically (temp file, fsync,
rename); a damaged file is set aside (renamed `.bad`) and the store starts empty, with a warning.
"""

from __future__ import annotations

import json
import logging
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

WINDOW = 20
MAX_ENTRIES = 500
CLAMP = (0.5, 2.0)


@dataclass(frozen=True)
class Footprint:
    family: str  # "llm:chat", "sd15:image_lora", ...
    shape: str  # "llama 32x4096, 8.0B; chat at 2,048 tokens, batch 1, nf4"
    key: str  # residency key
    predicted_weights: int
    measured_weights: int
    predicted_working: int
    measured_working: int
    time: float

    @property
    def weights_ratio(self) -> float | None:
        return (
            self.measured_weights / self.predicted_weights if self.predicted_weights and self.measured_weights else None
        )

    @property
    def working_ratio(self) -> float | None:
        return (
            self.measured_working / self.predicted_working if self.predicted_working and self.measured_working else None
        )


def _clamp(x: float) -> float:
    return min(CLAMP[1], max(CLAMP[0], x))


class FootprintStore:
    """Thread-safe; `path=None` keeps measurements in memory only (tests, benchmarks)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._entries: list[Footprint] = self._load()

    def _load(self) -> list[Footprint]:
        if self.path is None or not self.path.is_file():
            return []
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            return [Footprint(**e) for e in raw["footprints"]][-MAX_ENTRIES:]
        except (OSError, ValueError, KeyError, TypeError) as e:
            bad = self.path.with_suffix(".bad")
            log.warning(
                "footprint store %s is unreadable (%s); set aside as %s, starting empty", self.path, e, bad.name
            )
            self.path.replace(bad)
            return []

    def add(self, fp: Footprint) -> None:
        with self._lock:
            self._entries = [*self._entries, fp][-MAX_ENTRIES:]
        with self._save_lock:  # one writer at a time, and it writes the newest list (no lost measurement)
            with self._lock:
                entries = list(self._entries)
            self._save(entries)

    def _save(self, entries: list[Footprint]) -> None:
        if self.path is None:
            return
        from studio.safety import atomic_write_json

        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            atomic_write_json(
                self.path, {"version": 1, "saved": time.time(), "footprints": [asdict(e) for e in entries]}
            )
        except OSError as e:
            log.warning("could not save measured footprints to %s: %s", self.path, e)

    def entries(self, family: str | None = None) -> list[Footprint]:
        with self._lock:
            return [e for e in self._entries if family is None or e.family == family]

    def correction(self, family: str) -> tuple[float, float, int] | None:
        """(weights factor, working factor, measurements) for `family`, None before its first measurement."""
        recent = self.entries(family)[-WINDOW:]
        if not recent:
            return None
        w = [r for e in recent if (r := e.weights_ratio) is not None]
        k = [r for e in recent if (r := e.working_ratio) is not None]
        fw = _clamp(statistics.median(w)) if w else 1.0
        fk = _clamp(statistics.median(k)) if k else 1.0
        return fw, fk, len(recent)
