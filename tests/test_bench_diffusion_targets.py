"""The diffusion bench's targets (the Image issue's): fit under the cap, at least diffusers' default speed."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")


def test_targets_follow_the_sections_that_ran():
    from studio.bench.diffusion import targets

    report = {"sdxl": {"size": 1024, "studio": {"it_s": 9.0, "peak_vram_gib": 12.5},
                       "diffusers_default": {"it_s": 10.0}},
              "lora_train": {"peak_vram_gib": 3.1}}  # fmt: skip
    got = {t["name"]: (t["value"], t["met"]) for t in targets(report, 12.0)}
    assert got == {
        "SDXL 1024x1024 generation peak VRAM, studio": (12.5, False),
        "SDXL 1024x1024 it/s, studio / diffusers default": (0.9, False),
        "SD1.5 LoRA training (rank 16) peak VRAM": (3.1, True),
    }
    failed = targets({"sd15": {"size": 512, "studio": {"error": "CUDA out of memory"}}}, 12.0)
    assert [(t["value"], t["met"]) for t in failed] == [(None, False), (None, False)]  # an error is not met
    assert targets({"sdxl": {"size": 1024}}, 12.0) == []  # a section that did not run has no targets
