"""Ultralytics set-up shared by detection, training and export: offline settings, a local font, PIL left alone."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Any

_env_lock = threading.Lock()


def prepare_ultralytics(settings: Any) -> None:
    """Offline env, quiet settings and a local plotting font; idempotent, call before importing ultralytics."""
    with _env_lock:
        os.environ.setdefault("YOLO_OFFLINE", "1")  # we never let Ultralytics fetch; the Models tab downloads
        os.environ.setdefault("YOLO_AUTOINSTALL", "false")
        os.environ.setdefault("YOLO_CONFIG_DIR", str(Path(settings.cache_dir).resolve() / "ultralytics"))
        from ultralytics.utils import SETTINGS, USER_CONFIG_DIR

        wanted = {k: False for k in ("sync", "clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb")}
        wanted["weights_dir"] = str(Path(settings.cache_dir).resolve() / "ultralytics-weights")
        wanted["runs_dir"] = str(Path(settings.cache_dir).resolve() / "ultralytics-runs")
        if any(SETTINGS.get(k) != v for k, v in wanted.items()):
            SETTINGS.update(wanted)
        _install_font(Path(USER_CONFIG_DIR))
        _restore_pil_open()


def _restore_pil_open() -> None:
    """Ultralytics replaces PIL.Image.open process-wide with a wrapper that, on a file PIL cannot identify, tries to
    install pi-heif; offline that raises ModuleNotFoundError instead of UnidentifiedImageError, which breaks the clear
    "not a readable image" messages of every other tab. Put PIL's own function back (HEIC input is not supported)."""
    from PIL import Image
    from ultralytics.utils import patches  # importing it applies the patch once; undo it right away

    original = getattr(patches, "_image_open", None)
    if original is not None and Image.open is not original:
        Image.open = original


def _install_font(config_dir: Path) -> None:
    """Ultralytics downloads Arial.ttf for plot labels; give it DejaVu Sans (shipped by matplotlib) instead."""
    try:
        import matplotlib
    except ImportError:  # no plotting possible either, so nothing would ask for the font
        return
    src = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        dest = config_dir / name
        if not dest.exists() and src.is_file():
            config_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)


def model_device(model: Any) -> str:
    """The device the residency manager put the YOLO object on ("cuda:0", "cpu")."""
    return str(next(model.model.parameters()).device)
