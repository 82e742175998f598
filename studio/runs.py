"""Run records: one folder per training or evaluation run under `settings.runs_dir`.

    runs/<run id>/record.json     kind, config, seed, package versions, dataset hash, status, times, summary,
                                  artifacts (rewritten atomically on every change)
    runs/<run id>/metrics.jsonl   one JSON object per logged step: {"step": 10, "time": ..., "loss": 0.42}

Run ids sort by creation time (`20250101-120000-123456-ab12`), so listing newest first is a reverse sort.
Package versions come from importlib.metadata: nothing heavy is imported to record them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import secrets
import shutil
import threading
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from studio.safety import UnsafePathError, atomic_write_json, contained_path

log = logging.getLogger(__name__)

RECORD = "record.json"
METRICS = "metrics.jsonl"
ARTIFACTS = "artifacts"
TRACKED_PACKAGES = (
    "torch",
    "torchvision",
    "torchaudio",
    "transformers",
    "diffusers",
    "peft",
    "accelerate",
    "bitsandbytes",
    "ultralytics",
    "faster-whisper",
    "ctranslate2",
    "sentence-transformers",
    "chromadb",
    "gradio",
    "numpy",
    "safetensors",
)
RUN_STATUSES = ("running", "done", "failed", "cancelled", "interrupted")  # interrupted: the process died
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str | None]:
    """Installed versions (None when not installed), read from package metadata without importing anything."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hash_dataset(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 over the sorted relative file names and contents of a file or folder, streamed in chunks.

    Renaming, adding, removing or editing any file changes the hash; the location of the folder does not.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset not found: {path}")
    files = (
        [path] if path.is_file() else sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.as_posix())
    )
    h = hashlib.sha256()
    for f in files:
        rel = f.name if f == path else f.relative_to(path).as_posix()
        h.update(rel.encode("utf-8") + b"\0")
        h.update(str(f.stat().st_size).encode() + b"\0")
        with f.open("rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


def _new_run_id() -> str:
    now = datetime.now(UTC)
    return f"{now:%Y%m%d-%H%M%S-%f}-{secrets.token_hex(2)}"


def _jsonable(value: Any) -> Any:
    """Metrics must be numbers; NaN/inf become None so the file stays valid JSON."""
    if hasattr(value, "item"):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Run:
    """A run in progress or finished; every change is written to disk at once."""

    def __init__(self, run_dir: Path, record: dict[str, Any]) -> None:
        self.dir = run_dir
        self.record = record
        self._lock = threading.Lock()

    @property
    def id(self) -> str:
        return self.record["id"]

    @property
    def kind(self) -> str:
        return self.record["kind"]

    @property
    def status(self) -> str:
        return self.record["status"]

    @property
    def config(self) -> dict[str, Any]:
        return self.record["config"]

    @property
    def artifacts(self) -> list[dict[str, Any]]:
        return self.record["artifacts"]

    def log_metrics(self, step: int, **metrics: Any) -> None:
        """Append one line to metrics.jsonl, e.g. `run.log_metrics(10, loss=0.42, lr=1e-4)`."""
        if not metrics:
            raise ValueError("log_metrics needs at least one metric, e.g. loss=0.42")
        row = {"step": int(step), "time": round(time.time(), 3)}
        row.update({k: _jsonable(v) for k, v in metrics.items()})
        with self._lock, (self.dir / METRICS).open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.dir / METRICS)

    def last_metrics(self) -> dict[str, Any]:
        """The last complete metrics row, read from the end of the file (cheap even for long runs)."""
        return read_last_metrics(self.dir / METRICS)

    def add_artifact(self, path: Path | str, name: str | None = None) -> Path:
        """Record an output of the run. Files outside the run folder are copied into `artifacts/`."""
        src = Path(path)
        if not src.exists():
            raise FileNotFoundError(f"artifact not found: {src}")
        run_root = self.dir.resolve()
        resolved = src.resolve()
        if resolved == run_root or run_root not in resolved.parents:
            dest = contained_path(self.dir / ARTIFACTS, name or src.name)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dest, dirs_exist_ok=True)
            else:
                shutil.copy2(src, dest)
            resolved = dest
        entry = {
            "name": name or src.name,
            "path": resolved.relative_to(run_root).as_posix(),
            "bytes": _size(resolved),
            "added": time.time(),
        }
        with self._lock:
            self.record["artifacts"] = [a for a in self.artifacts if a["name"] != entry["name"]] + [entry]
            self._save()
        return resolved

    def finish(self, status: str = "done", **summary: Any) -> None:
        if status not in RUN_STATUSES or status == "running":
            raise ValueError(f"finish status must be one of done/failed/cancelled, got {status!r}")
        with self._lock:
            self.record["status"] = status
            self.record["finished"] = time.time()
            self.record["summary"].update({k: _jsonable(v) for k, v in summary.items()})
            self._save()
        log.info("run %s finished: %s", self.id, status)

    def _save(self) -> None:
        atomic_write_json(self.dir / RECORD, self.record)

    def __repr__(self) -> str:
        return f"Run({self.id!r}, kind={self.kind!r}, status={self.status!r})"


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl; a torn last line (crash mid-write) is skipped, not fatal."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").split("\n"):  # not splitlines(): U+2028 may sit in a string
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("skipping a torn line in %s", path)
    return rows


def read_last_metrics(path: Path, tail_bytes: int = 16384) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open("rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - tail_bytes))
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            return row
    return {}


class RunStore:
    """All runs under one folder."""

    def __init__(self, runs_dir: Path) -> None:
        self.root = Path(runs_dir)

    def create(
        self, kind: str, config: dict[str, Any], *, seed: int | None = None, dataset_hash: str | None = None
    ) -> Run:
        if not kind or not kind.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"run kind must be a short word like 'sd_lora' or 'yolo-train', got {kind!r}")
        self.root.mkdir(parents=True, exist_ok=True)
        run_id = f"{_new_run_id()}-{kind}"
        run_dir = self.root / run_id
        run_dir.mkdir()
        record = {
            "id": run_id,
            "kind": kind,
            "config": json.loads(json.dumps(config, default=str)),
            "seed": seed,
            "dataset_hash": dataset_hash,
            "versions": package_versions(),
            "status": "running",
            "pid": os.getpid(),  # a record left "running" by a dead process is marked interrupted at start-up
            "started": time.time(),
            "finished": None,
            "summary": {},
            "artifacts": [],
        }
        run = Run(run_dir, record)
        run._save()
        (run_dir / METRICS).touch()
        log.info("created run %s", run_id)
        return run

    def get(self, run_id: str) -> Run:
        """Load a run by id; ids from the UI are checked so they cannot name a folder outside runs_dir."""
        try:
            run_dir = contained_path(self.root, run_id)
        except UnsafePathError:
            raise KeyError(f"invalid run id {run_id!r}") from None
        if run_dir == self.root.resolve() or run_dir.parent != self.root.resolve():
            raise KeyError(f"invalid run id {run_id!r}")
        record_path = run_dir / RECORD
        if not record_path.is_file():
            raise KeyError(f"no run {run_id!r} in {self.root}")
        return Run(run_dir, json.loads(record_path.read_text(encoding="utf-8")))

    def list(self) -> list[Run]:
        """Every readable run, newest first (an unreadable record is logged and skipped)."""
        if not self.root.is_dir():
            return []
        runs = []
        for d in sorted(self.root.iterdir(), key=lambda p: p.name, reverse=True):
            if not (d / RECORD).is_file():
                continue
            try:
                runs.append(Run(d, json.loads((d / RECORD).read_text(encoding="utf-8"))))
            except (OSError, json.JSONDecodeError) as e:
                log.warning("skipping unreadable run record %s: %s", d, e)
        return runs

    def metrics(self, run_id: str) -> list[dict[str, Any]]:
        return self.get(run_id).metrics()

    def mark_interrupted(self) -> list[Run]:
        """Runs still "running" whose process is gone (a crash or a kill): mark them "interrupted", with the time
        of their last metrics row and their newest checkpoint file, so the Runs tab never shows them running."""
        marked = []
        for run in self.list():
            pid = run.record.get("pid")
            if run.status != "running" or (pid not in (None, os.getpid()) and _alive(pid)):
                continue
            last = last_checkpoint(run.dir)
            ended = run.last_metrics().get("time") or (run.dir / METRICS).stat().st_mtime
            with run._lock:
                run.record["status"], run.record["finished"] = "interrupted", ended
                run.record["summary"]["last_checkpoint"] = last.relative_to(run.dir).as_posix() if last else None
                run.record["summary"]["note"] = "the studio stopped during this run; resume from the last checkpoint"
                run._save()
            marked.append(run)
        return marked


def _alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, OverflowError):
        return False
    return True


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint file of a run (temp files of interrupted saves are ignored)."""
    files = [
        p for p in Path(run_dir).rglob("*")
        if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES and not p.name.startswith(".")
    ]  # fmt: skip
    return max(files, key=lambda p: p.stat().st_mtime, default=None)
