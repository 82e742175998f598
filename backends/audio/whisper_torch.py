"""A torch Whisper engine (transformers `WhisperForConditionalGeneration`): runs wherever torch runs, any CUDA.

CTranslate2's wheels are built for CUDA 12; on a CUDA 13 machine faster-whisper can only use the CPU. This engine
takes a transformers Whisper folder (converted from the shipped CTranslate2 weights by `whisper_convert`, or a
fine-tuned one) and transcribes windows of 16 kHz audio in batches: log-mel features for the whole batch at once,
fp16 (or bf16) on CUDA, float32 on the CPU, SDPA attention, greedy or beam search, no timestamps. The windows are
what the studio's VAD makes (<= 30 s each), so no long-form chunking is needed here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TorchWhisperOptions:
    device: str = "cpu"
    dtype: str = "auto"  # "auto": float16 on CUDA, float32 on the CPU; or "float32", "float16", "bfloat16"
    batch_size: int = 8
    beam_size: int = 1
    language: str | None = "en"  # None: detected by the model (multilingual models only)
    max_new_tokens: int = 440  # Whisper's 448 positions less the prompt

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"dtype {self.dtype!r}: use auto, float32, float16 or bfloat16")
        if not 1 <= self.batch_size <= 256:
            raise ValueError(f"batch_size must be 1..256, got {self.batch_size}")
        if not 1 <= self.beam_size <= 10:
            raise ValueError(f"beam_size must be 1..10, got {self.beam_size}")


class TorchWhisper:
    """Load once, then `transcribe(list_of_windows) -> list_of_texts`."""

    def __init__(self, model_dir: Path | str, opts: TorchWhisperOptions | None = None, model: Any = None) -> None:
        import torch
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.opts = opts = opts or TorchWhisperOptions()
        dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(opts.dtype)
        if dtype is None:
            dtype = torch.float16 if opts.device.startswith("cuda") else torch.float32
        self.dtype = dtype
        self.processor = WhisperProcessor.from_pretrained(str(model_dir))
        if model is None:
            model = WhisperForConditionalGeneration.from_pretrained(str(model_dir), dtype=dtype,
                                                                    attn_implementation="sdpa")  # fmt: skip
        self.model = model.to(device=opts.device, dtype=dtype).eval()
        self.multilingual = bool(getattr(self.model.generation_config, "is_multilingual", False))
        log.info("torch Whisper from %s on %s (%s)", model_dir, opts.device, dtype)

    def features(self, windows: list[np.ndarray]) -> Any:
        fe = self.processor.feature_extractor
        feats = fe([np.asarray(w, np.float32) for w in windows], sampling_rate=16000, return_tensors="pt")
        return feats.input_features.to(self.opts.device, self.dtype)

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"num_beams": self.opts.beam_size, "do_sample": False,
                                  "max_new_tokens": self.opts.max_new_tokens}  # fmt: skip
        if self.multilingual:
            kwargs["task"] = "transcribe"
            if self.opts.language:
                kwargs["language"] = self.opts.language
        return kwargs

    def generate_ids(self, windows: list[np.ndarray], **extra: Any) -> list[Any]:
        """Token ids per batch of `batch_size` windows (extra generate() arguments pass through)."""
        import torch

        out = []
        for i in range(0, len(windows), self.opts.batch_size):
            feats = self.features(windows[i : i + self.opts.batch_size])
            with torch.inference_mode():
                out.append(self.model.generate(input_features=feats, **(self.generate_kwargs() | extra)))
        return out

    def transcribe(self, windows: list[np.ndarray]) -> list[str]:
        """Text of each window (same order), decoded `batch_size` windows at a time."""
        texts: list[str] = []
        for ids in self.generate_ids(windows):
            texts.extend(t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True))
        return texts
