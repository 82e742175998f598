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

pytest_plugins = ["tests.ci_skips"]


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


@pytest.fixture(scope="module")
def diffusion_ctx(tmp_path_factory, shared_cache_dir):
    """One studio context per module with the tiny demo pipelines (built once per session, copied in)."""
    import shutil

    from backends.image.tiny import ensure_tiny_pipeline
    from studio.app import build_context

    root = tmp_path_factory.mktemp("diffusion")
    settings = Settings(data_dir=root / "data", models_dir=root / "models", open_browser=False)
    context = build_context(settings)
    for model in ("tiny-sd-demo", "tiny-sdxl-demo"):
        src = ensure_tiny_pipeline(shared_cache_dir, model)
        shutil.copytree(src, settings.cache_dir / "diffusion" / src.name)
    yield context
    context.jobs.shutdown(timeout=10)
