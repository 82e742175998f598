"""Shared fixtures. Every test runs offline: the variables are set before any library is imported."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from studio.offline import OFFLINE_ENV, QUIET_ENV

_session_dir = Path(tempfile.mkdtemp(prefix="studio-tests-"))
for _k, _v in {**QUIET_ENV, **OFFLINE_ENV}.items():
    os.environ.setdefault(_k, _v)
os.environ.setdefault("YOLO_CONFIG_DIR", str(_session_dir / "ultralytics"))
os.environ.setdefault("GRADIO_TEMP_DIR", str(_session_dir / "gradio"))

import pytest  # noqa: E402

from studio.settings import Settings  # noqa: E402


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", models_dir=tmp_path / "models", open_browser=False)


@pytest.fixture
def ctx(settings: Settings):
    """A StudioContext on this machine (CPU here and in CI) with the real residency manager."""
    from studio.app import build_context

    context = build_context(settings)
    yield context
    context.jobs.shutdown(timeout=10)


@pytest.fixture(scope="session")
def shared_cache_dir() -> Path:
    """A cache folder shared by the whole test session (converted models etc.), so slow conversions run once."""
    path = _session_dir / "cache"
    path.mkdir(parents=True, exist_ok=True)
    return path
