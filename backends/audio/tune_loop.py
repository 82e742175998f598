"""The Whisper fine-tuning job itself: model set-up, the step loop under the training lease, checkpoints, export.

See backends/audio/tune.py for the policy (what is tuned how, precision, evaluation, where results go).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from backends.audio.models import TUNED_PREFIX, tuned_root
from backends.audio.tune import (
    TuneConfig,
    TuneResult,
    check_dataset,
    collate,
    config_record,
    encode_once,
    evaluate,
    prefix_ids,
    prepare,
    save_meta,
    steps_for,
    training_lease,
)
from backends.audio.whisper_convert import export_to_ct2

log = logging.getLogger(__name__)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


class WhisperTuner:
    """Submits and runs Whisper fine-tuning jobs (`submit(cfg) -> Job`, or `train(cfg, job)` directly)."""

    def __init__(self, services: Any) -> None:
        self.ctx = services

    def base_folder(self, model_id: str) -> Path:
        """The transformers copy of a catalog Whisper (converted from its CTranslate2 folder once, cached)."""
        from backends.audio.whisper_torch import transformers_folder

        if model_id.startswith(TUNED_PREFIX):
            raise ValueError(f"{model_id!r}: pick a catalog Whisper as the base (tiny.en, base, small, ...)")
        settings = self.ctx.settings
        return transformers_folder(model_id, self.ctx.catalog, settings.cache_dir, settings.models_dir)

    def check(self, cfg: TuneConfig) -> str:
        """Validate data and base before queueing; returns a one-line summary."""
        train, dev = check_dataset(cfg)
        self.ctx.catalog.get(cfg.base_model)
        return f"{len(train)} training and {len(dev)} dev examples"

    def submit(self, cfg: TuneConfig) -> Any:
        self.check(cfg)
        return self.ctx.jobs.submit(
            f"Fine-tune {cfg.base_model} -> {cfg.output_name}", lambda job: self.train(cfg, job)
        )

    def train(self, cfg: TuneConfig, job: Any = None) -> TuneResult:
        import torch

        job = job or _Quiet()
        train_ex, dev_ex = check_dataset(cfg)
        device = self.ctx.residency.device if getattr(self.ctx.residency, "device", "cpu") == "cuda" else "cpu"
        torch.manual_seed(cfg.seed)
        model, processor, lora = self._model(cfg, device)
        prefix = prefix_ids(model, processor, cfg.language)
        job.set_progress(0.0, "computing features")
        train, dev = prepare(train_ex, processor, prefix), prepare(dev_ex, processor, prefix)
        if cfg.freeze_encoder:
            job.set_progress(0.02, "encoding the training audio once (frozen encoder)")
            encode_once(model, train, device)
        run = self.ctx.runs.create("whisper-tune", config_record(cfg, len(train), len(dev)), seed=cfg.seed,
                                   dataset_hash=_dataset_hash(train_ex + dev_ex))  # fmt: skip
        result = TuneResult("running", run.id, 0)
        if dev:
            job.set_progress(0.0, "dev-set WER before tuning")
            result.wer_before, before = evaluate(model, processor, dev, cfg.language, device)
            job.log(f"dev WER before: {result.wer_before:.3f} on {len(dev)} examples")
        optimizer = _optimizer(cfg, model, device)
        step, rng = self._resume(cfg, model, optimizer)
        total = steps_for(cfg, len(train))
        dtype, scaler = _autocast(cfg, device)
        model.train()
        status = "done"
        with training_lease(self.ctx.residency, f"train:whisper:{run.id}", [model], [optimizer], "Whisper") as lease:
            while step < total:
                if job.should_stop():
                    status = "cancelled"
                    break
                batch = [train[i] for i in rng.choice(len(train), min(cfg.batch_size, len(train)), replace=False)]
                with lease.step():
                    loss = _train_step(model, optimizer, scaler, collate(batch, device), dtype, device)
                if not np.isfinite(loss):
                    job.log(f"step {step + 1}: loss is {loss}; stopped, the last checkpoint is kept")
                    status = "failed"
                    break
                step += 1
                run.log_metrics(step, loss=loss)
                lease.report(step=step, loss=loss)
                job.set_progress(0.05 + 0.85 * step / total, f"step {step}/{total} · loss {loss:.3f}")
                if step % cfg.checkpoint_every == 0:
                    _save_checkpoint(Path(run.dir), model, optimizer, step, rng, lora)
        result.steps_done, result.paused_s = step, float(getattr(lease, "paused_s", 0.0))
        if status != "done":
            if status == "cancelled":
                _save_checkpoint(Path(run.dir), model, optimizer, step, rng, lora)
            result.status = status
            run.finish(status, steps=step, wer_before=result.wer_before)
            return result
        if dev:
            job.set_progress(0.92, "dev-set WER after tuning")
            result.wer_after, after = evaluate(model, processor, dev, cfg.language, device)
            result.examples = [{"reference": it["example"].text, "before": b, "after": a}
                               for it, b, a in zip(dev, before, after, strict=True)][:8]  # fmt: skip
            job.log(f"dev WER after: {result.wer_after:.3f} (before {result.wer_before:.3f})")
        job.set_progress(0.95, "exporting to CTranslate2")
        result.model_id = self._export(cfg, model, processor, lora, result)
        result.status = "done"
        run.finish("done", steps=step, wer_before=result.wer_before, wer_after=result.wer_after,
                   model_id=result.model_id, examples=result.examples)  # fmt: skip
        job.set_progress(1.0, f"done: {result.model_id}")
        return result

    def _model(self, cfg: TuneConfig, device: str) -> tuple[Any, Any, bool]:
        return build_model(cfg, self.base_folder(cfg.base_model), device)

    def _resume(self, cfg: TuneConfig, model: Any, optimizer: Any) -> tuple[int, np.random.Generator]:
        rng = np.random.default_rng(cfg.seed)
        if not cfg.resume_run:
            return 0, rng
        from studio.safety import load_safetensors, load_torch_weights

        folder = Path(self.ctx.runs.get(cfg.resume_run).dir) / "checkpoint"
        if not (folder / "state.json").is_file():
            raise FileNotFoundError(f"run {cfg.resume_run} has no checkpoint to resume from")
        weights = load_safetensors(folder / "trainable.safetensors")
        model.load_state_dict(weights, strict=False)
        optimizer.load_state_dict(load_torch_weights(folder / "optimizer.pt"))
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        rng.bit_generator.state = state["rng"]
        log.info("resumed from %s at step %d", cfg.resume_run, state["step"])
        return int(state["step"]), rng

    def _export(self, cfg: TuneConfig, model: Any, processor: Any, lora: bool, result: TuneResult) -> str:
        from studio.safety import atomic_folder

        if lora:
            model = model.merge_and_unload()  # 32-bit merge, then quantise at export
        model.config.use_cache = True
        model.config.apply_spec_augment = False
        target = tuned_root(self.ctx.settings.models_dir) / cfg.output_name
        with atomic_folder(target) as tmp:
            hf = tmp / "hf"
            model.save_pretrained(hf)
            processor.save_pretrained(hf)
            processor.feature_extractor.save_pretrained(hf)
            export_to_ct2(hf, tmp / "ct2", cfg.quantization)
            for f in (tmp / "ct2").iterdir():
                shutil.move(str(f), tmp / f.name)
            (tmp / "ct2").rmdir()
            save_meta(tmp, {"base": cfg.base_model, "run_id": result.run_id, "wer_before": result.wer_before,
                            "wer_after": result.wer_after, "steps": result.steps_done, "created": time.time()})  # fmt: skip
        log.info("exported the tuned Whisper to %s", target)
        return TUNED_PREFIX + cfg.output_name


def build_model(cfg: TuneConfig, base: Path, device: str) -> tuple[Any, Any, bool]:
    """The model as the job trains it (LoRA or full, SpecAugment, checkpointing, frozen encoder), from a
    transformers Whisper folder; returns (model on `device`, processor, whether it is LoRA)."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    processor = WhisperProcessor.from_pretrained(base)
    model = WhisperForConditionalGeneration.from_pretrained(base, dtype="float32")
    lora = cfg.method == "lora" or (cfg.method == "auto" and model.config.d_model >= 1024)
    if cfg.spec_augment:  # Whisper's own SpecAugment: masks log-mel time steps and channels while training
        model.config.apply_spec_augment = True
        model.config.mask_time_prob, model.config.mask_time_length = 0.05, 10
        model.config.mask_feature_prob, model.config.mask_feature_length = 0.05, 10
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.freeze_encoder:
        model.model.encoder.requires_grad_(False)
        model.model.encoder.eval()  # no dropout in a frozen encoder; checkpointing is then for the decoder only
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank,
                                                 target_modules=LORA_TARGETS, lora_dropout=0.05))  # fmt: skip
    return model.to(device), processor, lora


class _Quiet:
    """A job stand-in for direct calls (scripts, tests): no progress, never stops."""

    def set_progress(self, *_: Any) -> None: ...

    def log(self, msg: str) -> None:
        log.info("%s", msg)

    def should_stop(self) -> bool:
        return False


def _dataset_hash(examples: list) -> str:
    import hashlib

    h = hashlib.sha256()
    for ex in sorted(examples, key=lambda e: str(e.audio)):
        h.update(f"{ex.audio.name}\0{ex.text}\0{ex.audio.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def _optimizer(cfg: TuneConfig, model: Any, device: str) -> Any:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    eight_bit = cfg.optimizer == "adamw8bit" or (cfg.optimizer == "auto" and device == "cuda")
    if eight_bit:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)


def _autocast(cfg: TuneConfig, device: str) -> tuple[Any, Any]:
    import torch

    if cfg.precision == "fp32" or (cfg.precision == "auto" and device != "cuda"):
        return (
            None,
            None,
        )  # "auto" on the CPU is fp32; a forced fp16/bf16 autocasts there too (slower, but the same path)
    if cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler(device)


def _train_step(model: Any, optimizer: Any, scaler: Any, batch: tuple, dtype: Any, device: str) -> float:
    import torch

    feats, labels = batch
    with torch.autocast(device_type=device, dtype=dtype or torch.float32, enabled=dtype is not None):
        if feats.shape[1] != model.config.num_mel_bins:  # encoder states (B, 1500, d_model), not (B, mels, frames)
            loss = model(encoder_outputs=(feats.float(),), labels=labels).loss
        else:
            loss = model(input_features=feats, labels=labels).loss
    if not torch.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        return float(loss)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def _save_checkpoint(run_dir: Path, model: Any, optimizer: Any, step: int, rng: np.random.Generator,
                     lora: bool) -> None:  # fmt: skip
    """Trainable weights (safetensors), optimizer state, step and RNG into `<run>/checkpoint/`, atomically."""
    import torch

    from studio.safety import atomic_folder, atomic_write_text, save_safetensors

    trainable = {k: v.detach().cpu().contiguous() for k, v in model.named_parameters() if v.requires_grad}
    if not lora:  # full fine-tune: named_parameters of the tied pair appear once; state_dict keys are what loads
        names = {k for k, p in model.named_parameters() if p.requires_grad}
        trainable = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in names}
    with atomic_folder(run_dir / "checkpoint") as tmp:
        save_safetensors(trainable, tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        atomic_write_text(tmp / "state.json", json.dumps({"step": step, "rng": rng.bit_generator.state}))
    log.info("checkpoint at step %d in %s", step, run_dir / "checkpoint")
