"""The environment that keeps every library off the network (stdlib only: launch.py imports it too)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "YOLO_OFFLINE": "1",
}
# Always set, online or not: no telemetry, no auto-installs, config written under our data dir.
QUIET_ENV = {
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "YOLO_AUTOINSTALL": "false",
    "PYANNOTE_METRICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "ANONYMIZED_TELEMETRY": "False",  # chromadb
    "TOKENIZERS_PARALLELISM": "false",
}


def hub_reachable(host: str = "huggingface.co", port: int = 443, timeout: float = 1.5) -> bool:
    """One quick TCP connect; False on any failure (no DNS, no route, firewall)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def apply_env(data_dir: Path, *, offline: bool, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Set the quiet (and, if `offline`, the offline) variables without overriding ones the user set."""
    env = os.environ if environ is None else environ
    wanted = dict(QUIET_ENV)
    wanted["YOLO_CONFIG_DIR"] = str(Path(data_dir).resolve() / "cache" / "ultralytics")
    # Uploads and returned files live here; it must stay outside the blocked cache/models folders so that
    # gradio can serve them back to the browser.
    wanted["GRADIO_TEMP_DIR"] = str(Path(data_dir).resolve() / "uploads")
    if offline:
        wanted.update(OFFLINE_ENV)
    for key, value in wanted.items():
        env.setdefault(key, value)
    return wanted
