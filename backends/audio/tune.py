"""Whisper fine-tuning as a background job: your recordings + transcripts in, a faster-whisper model out.

Policy:
- the base is any Whisper in the catalog that is on this machine; its CTranslate2 folder is converted once to
  transformers (`whisper_convert`, cached under `<cache_dir>/whisper-hf/<id>`), so tiny.en and base tune offline.
- tiny / base / small (d_model < 1024) are tuned fully; medium and larger get LoRA (peft, rank `lora_rank` on the
  attention and MLP projections) and are merged back in 32-bit before export. `method` overrides the choice.
- precision "auto": bf16 autocast on CUDA cards that have it, else fp16 autocast with a gradient scaler, fp32 on the
  CPU (a forced fp16/bf16 autocasts on the CPU too); gradient checkpointing on by default; 8-bit AdamW
  (bitsandbytes) on CUDA by default, torch AdamW on the CPU unless adamw8bit is asked for (bitsandbytes runs it there);
  SpecAugment-style time and frequency masks (Whisper's own `apply_spec_augment`) when asked.
- dev-set WER (jiwer, `backends.audio.wer` normaliser) before and after, with example lines side by side.
- every step runs inside the residency manager's preemptible training lease when it exists (`lease.step()`), so
  an interactive request can borrow the card; a cancel saves a checkpoint (trainable weights, optimizer, step, RNG)
  that `resume_run` continues from; a NaN loss stops the run and keeps the last good checkpoint.
- the result is exported with CTranslate2's TransformersConverter (alignment heads carried for word timestamps) to
  `<models_dir>/whisper-tuned/<name>/`, which the Audio tab lists as `tuned:<name>`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from backends.audio.tune_data import DatasetError, Example, load_examples
from backends.audio.wer import wer

log = logging.getLogger(__name__)

METHODS, PRECISIONS, OPTIMIZERS = (
    ("auto", "full", "lora"),
    ("auto", "fp32", "fp16", "bf16"),
    ("auto", "adamw", "adamw8bit"),
)
MAX_CLIP_S = 30.0


@dataclass(frozen=True)
class TuneConfig:
    data_dir: str
    base_model: str = "whisper-tiny.en"
    output_name: str = "my-whisper"
    epochs: float = 3.0
    max_steps: int = 0  # > 0 overrides epochs
    learning_rate: float = 1e-5
    batch_size: int = 8
    method: str = "auto"
    lora_rank: int = 16
    precision: str = "auto"
    gradient_checkpointing: bool = True
    optimizer: str = "auto"
    spec_augment: bool = False
    freeze_encoder: bool = False  # tune the decoder only (vocabulary, names): encoder states computed once
    language: str = "en"
    seed: int = 0
    checkpoint_every: int = 100
    resume_run: str = ""  # a run id whose checkpoint to continue from
    quantization: str = "float16"  # CTranslate2 export; faster-whisper converts to int8 at load on the CPU

    def __post_init__(self) -> None:
        from studio.safety import safe_filename

        if not self.data_dir:
            raise ValueError("data_dir is empty: give the folder with your audio files and transcripts")
        if safe_filename(self.output_name, "") != self.output_name or not self.output_name:
            raise ValueError(f"output name {self.output_name!r}: use letters, digits, '-' and '_' only")
        for name, allowed in (("method", METHODS), ("precision", PRECISIONS), ("optimizer", OPTIMIZERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {allowed}")
        if not (0 < self.epochs <= 100 and 0 <= self.max_steps <= 100_000):
            raise ValueError(f"epochs must be in (0, 100] and max_steps in [0, 100000], got {self.epochs}, "
                             f"{self.max_steps}")  # fmt: skip
        if not 0 < self.learning_rate < 1e-2:
            raise ValueError(f"learning rate {self.learning_rate} is out of range (try 1e-5 full, 1e-4 LoRA)")
        if self.freeze_encoder and self.spec_augment:
            raise ValueError("SpecAugment masks the encoder's input: it does nothing with a frozen encoder")
        if not 1 <= self.batch_size <= 256 or not 1 <= self.lora_rank <= 256 or self.checkpoint_every < 1:
            raise ValueError("batch_size and lora_rank must be 1..256 and checkpoint_every >= 1")


@dataclass
class TuneResult:
    status: str  # done, cancelled, failed
    run_id: str
    steps_done: int
    wer_before: float | None = None
    wer_after: float | None = None
    examples: list[dict[str, str]] = field(default_factory=list)  # reference / before / after, dev lines
    model_id: str | None = None  # "tuned:<name>" once exported
    paused_s: float = 0.0


class _NoLease:
    """Stand-in for `residency.training(...)` where the manager has none (no GPU, or an older manager)."""

    paused_s, pauses = 0.0, 0

    def __enter__(self) -> _NoLease:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def step(self) -> _NoLease:
        return self

    def report(self, **_: Any) -> None:
        return None


def training_lease(residency: Any, key: str, modules: list, optimizers: list, label: str) -> Any:
    training = getattr(residency, "training", None)
    if training is None:
        return _NoLease()
    return training(key, modules=modules, optimizers=optimizers, label=label)


def prepare(ds: list[Example], processor: Any, prefix: list[int]) -> list[dict[str, Any]]:
    """Log-mel features and label ids per example; clips over 30 s are refused with their file named."""
    from backends.audio.pcm import load_pcm

    errors, items = [], []
    eot = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    for ex in ds:
        pcm = load_pcm(ex.audio)
        if pcm.size > MAX_CLIP_S * 16000:
            errors.append(f"{ex.where}: {ex.audio.name} is {pcm.size / 16000:.1f} s long; cut it to <= 30 s")
            continue
        feats = processor.feature_extractor(pcm, sampling_rate=16000, return_tensors="np").input_features[0]
        ids = processor.tokenizer.encode(" " + ex.text.strip(), add_special_tokens=False)
        items.append({"features": feats, "labels": prefix[1:] + ids + [eot], "example": ex})
    if errors:
        raise DatasetError(errors)
    return items


def prefix_ids(model: Any, processor: Any, language: str) -> list[int]:
    """<|startoftranscript|> [<|lang|> <|transcribe|>] <|notimestamps|>: what decoding starts from."""
    tok = processor.tokenizer.convert_tokens_to_ids
    gen = model.generation_config
    ids = [tok("<|startoftranscript|>")]
    if getattr(gen, "is_multilingual", False):
        ids += [tok(f"<|{language}|>"), tok("<|transcribe|>")]
    return [*ids, tok("<|notimestamps|>")]


def encode_once(model: Any, items: list[dict[str, Any]], device: str, batch: int = 8) -> None:
    """With a frozen encoder, its output per example is computed once and kept (as float16) instead of features."""
    import torch

    encoder = model.get_encoder()
    with torch.inference_mode():
        for i in range(0, len(items), batch):
            chunk = items[i : i + batch]
            feats = torch.from_numpy(np.stack([it["features"] for it in chunk])).to(device)
            states = encoder(feats).last_hidden_state.to(torch.float16).cpu().numpy()
            for it, st in zip(chunk, states, strict=True):
                it["encoder"] = st


def collate(items: list[dict[str, Any]], device: str) -> tuple[Any, Any]:
    import torch

    key = "encoder" if "encoder" in items[0] else "features"
    feats = torch.from_numpy(np.stack([it[key] for it in items])).to(device)
    width = max(len(it["labels"]) for it in items)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    for i, it in enumerate(items):
        labels[i, : len(it["labels"])] = torch.tensor(it["labels"])
    return feats, labels.to(device)


def language_kwargs(model: Any, language: str) -> dict[str, str]:
    multilingual = getattr(model.generation_config, "is_multilingual", False)
    return {"language": language, "task": "transcribe"} if multilingual else {}


def decode(model: Any, processor: Any, items: list[dict[str, Any]], language: str, device: str,
           batch: int = 16) -> list[str]:  # fmt: skip
    """Greedy transcripts of `items` with the model as it is now (eval mode for the call)."""
    import torch

    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(items), batch):
            feats, _ = collate(items[i : i + batch], device)
            with torch.inference_mode():
                ids = model.generate(input_features=feats, max_new_tokens=200, num_beams=1, do_sample=False,
                                     **language_kwargs(model, language))  # fmt: skip
            out += [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]
    finally:
        model.train(was_training)
    return out


def evaluate(model, processor, dev, language: str, device: str) -> tuple[float, list[str]]:
    hyps = decode(model, processor, dev, language, device)
    return wer([it["example"].text for it in dev], hyps), hyps


def steps_for(cfg: TuneConfig, n_train: int) -> int:
    return cfg.max_steps or max(1, math.ceil(cfg.epochs * n_train / cfg.batch_size))


def check_dataset(cfg: TuneConfig) -> tuple[list[Example], list[Example]]:
    examples = load_examples(Path(cfg.data_dir))
    train = [e for e in examples if not e.dev]
    dev = [e for e in examples if e.dev]
    if not train:
        raise DatasetError([f"{cfg.data_dir}: every example is in the dev split; mark some as train"])
    return train, dev


def config_record(cfg: TuneConfig, n_train: int, n_dev: int) -> dict[str, Any]:
    return asdict(cfg) | {"train_examples": n_train, "dev_examples": n_dev, "started": time.time()}


def save_meta(folder: Path, meta: dict[str, Any]) -> None:
    from studio.safety import atomic_write_text

    atomic_write_text(folder / "tuned.json", json.dumps(meta, indent=2))
