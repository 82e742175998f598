"""A torch Whisper engine (transformers `WhisperForConditionalGeneration`): runs wherever torch runs, any CUDA.

CTranslate2's wheels are built for CUDA 12; on a CUDA 13 machine faster-whisper can only use the CPU. This engine
takes a transformers Whisper folder (converted from the shipped CTranslate2 weights by `whisper_convert`, or a
fine-tuned one) and transcribes windows of 16 kHz audio in batches: log-mel features for the whole batch at once,
fp16 (or bf16) on CUDA, float32 on the CPU, SDPA attention, greedy or beam search, no timestamps. The windows are
what the studio's VAD makes (<= 30 s each), so no long-form chunking is needed here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
MAX_PROMPT_TOKENS = 224  # Whisper keeps at most half its 448 decoder positions for the previous text


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

    def move(self, device: str) -> TorchWhisper:
        """To another device (fp16 on CUDA unless a dtype was forced, float32 on the CPU); returns self."""
        import torch

        if self.opts.dtype == "auto":
            self.dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.opts = replace(self.opts, device=device)
        self.model.to(device=device, dtype=self.dtype)
        return self

    def features(self, windows: list[np.ndarray]) -> Any:
        fe = self.processor.feature_extractor
        feats = fe([np.asarray(w, np.float32) for w in windows], sampling_rate=16000, return_tensors="pt")
        return feats.input_features.to(self.opts.device, self.dtype)

    def generate_kwargs(self, opts: TorchWhisperOptions | None = None) -> dict[str, Any]:
        opts = opts or self.opts
        kwargs: dict[str, Any] = {"num_beams": opts.beam_size, "do_sample": False,
                                  "max_new_tokens": opts.max_new_tokens}  # fmt: skip
        if self.multilingual:
            kwargs["task"] = "transcribe"
            if opts.language:
                kwargs["language"] = opts.language
        return kwargs

    def generate_ids(self, windows: list[np.ndarray], opts: TorchWhisperOptions | None = None, **extra: Any) -> list:
        """Token ids per batch of `batch_size` windows (extra generate() arguments pass through)."""
        import torch

        opts = opts or self.opts
        out = []
        for i in range(0, len(windows), opts.batch_size):
            feats = self.features(windows[i : i + opts.batch_size])
            with torch.inference_mode():
                out.append(self.model.generate(input_features=feats, **(self.generate_kwargs(opts) | extra)))
        return out

    def detect_language(self, window: np.ndarray) -> str:
        """Whisper's language code for one window ('en' for an English-only model)."""
        import torch

        if not self.multilingual:
            return "en"
        with torch.inference_mode():
            token = int(self.model.detect_language(self.features([window]))[0])
        return self.processor.tokenizer.decode([token]).strip("<|>")

    def transcribe(self, windows: list[np.ndarray], prompt: str = "", **overrides: Any) -> list[str]:
        """Text of each window (same order), decoded `batch_size` windows at a time. `overrides` replace options
        for this call (language, beam_size, batch_size); `prompt` is earlier text the decoder is conditioned on
        (Whisper's prompt: `<|startofprev|>` + text before the task tokens), shared by every window of the call."""
        import torch

        opts = replace(self.opts, **overrides) if overrides else self.opts
        extra: dict[str, Any] = {}
        if prompt.strip():
            ids = self.processor.get_prompt_ids(" " + prompt.strip(), return_tensors="pt")
            ids = torch.cat([ids[:1], ids[1:][-(MAX_PROMPT_TOKENS - 1) :]])  # <|startofprev|> + the last tokens
            extra["prompt_ids"] = ids.to(self.opts.device)
            room = self.model.config.max_target_positions - ids.numel() - 5  # start, language, task, no-timestamps
            opts = replace(opts, max_new_tokens=min(opts.max_new_tokens, room))
        texts: list[str] = []
        for ids in self.generate_ids(windows, opts, **extra):
            texts.extend(t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True))
        if prompt.strip():  # transformers returns the prompt in front of each text when prompt_ids are given
            head = prompt.strip()
            texts = [t[len(head) :].strip() if t.startswith(head) else t for t in texts]
        return texts


def transformers_folder(model_id: str, catalog: Any, cache_dir: Path, models_dir: Path) -> Path:
    """The transformers copy of a Whisper model: a tuned model's `hf/` folder, or a catalog model's CTranslate2
    folder converted once (`<cache_dir>/whisper-hf/<id>`, shared with the fine-tuning job)."""
    from backends.audio.models import TUNED_PREFIX, ModelMissing, tuned_root, whisper_dir
    from backends.audio.whisper_convert import ct2_to_transformers

    if model_id.startswith(TUNED_PREFIX):
        from studio.safety import contained_path

        hf = contained_path(tuned_root(models_dir), model_id.removeprefix(TUNED_PREFIX)) / "hf"
        if not (hf / "config.json").is_file():
            raise ModelMissing(f"fine-tuned model {model_id!r} has no transformers copy (expected {hf})")
        return hf
    spec = catalog.get(model_id)
    if spec.capability != "asr":
        raise ValueError(f"{model_id!r} is a {spec.capability} model, not a Whisper (asr) model")
    out = Path(cache_dir) / "whisper-hf" / spec.id
    if not (out / "model.safetensors").is_file():
        ct2_to_transformers(whisper_dir(spec, catalog, cache_dir), out)
    return out


class TorchWhisperLoader:
    """Residency Loader of the torch engine for one Whisper model ("asr-torch:<id>"): moves with `.to()`."""

    def __init__(self, model_id: str, catalog: Any, cache_dir: Path, models_dir: Path) -> None:
        self.model_id, self.key = model_id, f"asr-torch:{model_id}"
        self._where = (catalog, Path(cache_dir), Path(models_dir))

    def model_dir(self) -> Path:
        return transformers_folder(self.model_id, *self._where)

    def estimate_bytes(self) -> int:
        files = list(self.model_dir().glob("*.safetensors"))
        return max(64 * 2**20, sum(f.stat().st_size for f in files))  # fp32 files; fp16 on a GPU + activations

    def load(self, device: str) -> TorchWhisper:
        return TorchWhisper(self.model_dir(), TorchWhisperOptions(device=device))

    def to_device(self, obj: TorchWhisper, device: str) -> TorchWhisper:
        return obj.move(device)

    def release(self, obj: TorchWhisper) -> None:
        """Nothing beyond the reference the manager drops: torch frees the tensors with the object."""
