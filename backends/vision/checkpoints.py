"""Ultralytics training hooks the studio needs: atomic checkpoints, a resumable copy when a run is stopped, and an
AMP check that never downloads.

- Ultralytics writes last.pt/best.pt with `path.write_bytes(...)` every epoch and rewrites them with torch.save at
  the end (strip_optimizer); both go through a temp file + fsync + rename here.
- strip_optimizer also drops the optimizer state from last.pt, so a stopped run could not be resumed. When a stop
  was requested, the epoch's full last.pt is copied to resume.pt first (`keep_resumable`); a crashed or killed run
  never reached the strip, so its last.pt resumes as it is.
- Ultralytics' check_amp loads yolo26n.pt (a download) to compare fp32 and fp16 predictions. `offline_check_amp`
  compares the trainer's own model instead: a copy in eval mode, fp32 vs autocast on a fixed random image.
"""

from __future__ import annotations

import copy
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from studio.safety import atomic_path, atomic_write_bytes

log = logging.getLogger(__name__)
RESUME_NAME = "resume.pt"


class AtomicPath(type(Path())):  # type: ignore[misc]
    """A Path whose write_bytes is atomic: Ultralytics writes last.pt/best.pt with `path.write_bytes(...)`."""

    def write_bytes(self, data: bytes) -> int:  # type: ignore[override]
        atomic_write_bytes(Path(self), data)
        return len(data)


def atomic_checkpoints(trainer: Any) -> None:
    """on_train_start: every epoch's last.pt / best.pt goes through a temp file + fsync + rename."""
    trainer.last, trainer.best = AtomicPath(trainer.last), AtomicPath(trainer.best)


def install_atomic_strip() -> None:
    """Ultralytics' final strip_optimizer rewrites last.pt/best.pt with torch.save in place; wrap it (once) so it
    writes a temp file beside the target and renames it over, like every other checkpoint the studio lists."""
    import ultralytics.engine.trainer as trainer_module

    original = trainer_module.strip_optimizer
    if getattr(original, "studio_atomic", False):
        return

    def strip_optimizer(f: Any = "best.pt", s: str = "", updates: dict | None = None) -> Any:
        target = Path(s or f)
        with atomic_path(target) as tmp:
            result = original(f, str(tmp), updates=updates)
        log.info("checkpoint %s written atomically (%d bytes)", target, target.stat().st_size)
        return result

    strip_optimizer.studio_atomic = True  # type: ignore[attr-defined]
    trainer_module.strip_optimizer = strip_optimizer


def keep_resumable(should_stop: Callable[[], bool]) -> Callable[[Any], None]:
    """on_model_save: once a stop is requested, copy the epoch's full last.pt (optimizer included) to resume.pt."""

    def on_model_save(trainer: Any) -> None:
        last = Path(trainer.last)
        if should_stop() and last.is_file():
            with atomic_path(last.with_name(RESUME_NAME)) as tmp:
                shutil.copyfile(last, tmp)

    return on_model_save


def resume_checkpoint(weights_dir: Path, status: str) -> Path | None:
    """The checkpoint a run resumes from: resume.pt (a stopped run), else last.pt of a run that failed or was
    interrupted (it never reached the strip); a finished or stopped run's last.pt has no optimizer state left."""
    if (weights_dir / RESUME_NAME).is_file():
        return weights_dir / RESUME_NAME
    last = weights_dir / "last.pt"
    return last if status in ("failed", "interrupted") and last.is_file() else None


def offline_check_amp(model: Any) -> bool:
    """True if autocast fp16 gives the same raw outputs as fp32 on this model and device (never downloads)."""
    import torch

    device = next(model.parameters()).device
    if device.type != "cuda":
        return False
    probe = copy.deepcopy(model).eval()
    x = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0)).to(device)
    try:
        with torch.no_grad():
            a = _first(probe(x)).float()
            with torch.autocast("cuda", dtype=torch.float16):
                b = _first(probe(x)).float()
    except Exception as e:  # a model that cannot run under autocast trains in fp32
        log.warning("AMP check failed (%s): training in fp32", e)
        return False
    finally:
        del probe
    ok = bool(torch.isfinite(b).all()) and float((a - b).abs().max()) <= 0.02 * float(a.abs().max()) + 0.05
    log.info("AMP check on the trained model itself: %s", "passed" if ok else "failed, training in fp32")
    return ok


def _first(out: Any) -> Any:
    while isinstance(out, tuple | list):
        out = out[0]
    return out


def install_offline_amp_check() -> None:
    """Make Ultralytics' trainer use `offline_check_amp` (idempotent)."""
    import ultralytics.engine.trainer as trainer_module

    trainer_module.check_amp = offline_check_amp
