"""One fine-tune run as a background job, in numbered steps (see `FinetuneJob.run`).

Order matters for the user: the dataset is read, checked and tokenized BEFORE the model is loaded (bad data fails
in seconds, with file:line); the base model's dev loss and answers are taken before training; the adapter that the
Chat tab lists is written atomically into the run folder; a cancelled run keeps its last checkpoint and still
writes its adapter; a stopped (non-finite loss) or failed (save error) run's adapter is the last good checkpoint's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from backends.finetune.data import split_dataset
from backends.finetune.evaluate import answers, base_disabled, dev_loss, score, split_prompt
from backends.finetune.format import build_examples, collate, pad_id_of
from backends.finetune.loss import lm_loss
from backends.finetune.model import (
    apply_memory_savers,
    attach_lora,
    load_base,
    make_optimizer,
    make_scheduler,
    precision,
    save_adapter,
)
from backends.finetune.trainer import (
    CHECKPOINT,
    LoopConfig,
    LoopHooks,
    NullLease,
    ShuffledBatches,
    StepLoop,
    StepRecord,
)
from backends.finetune.types import FinetuneConfig, FinetuneResult
from studio.safety import atomic_folder, safe_filename

log = logging.getLogger(__name__)
MAX_EVAL_PROMPTS = 6


class FinetuneJob:
    def __init__(self, services: Any, cfg: FinetuneConfig, base_folder: Path, run: Any, job: Any, live: dict):
        self.s, self.cfg, self.base_folder, self.run_record, self.job, self.live = (
            services,
            cfg,
            base_folder,
            run,
            job,
            live,
        )
        self.device = services.residency.device if hasattr(services.residency, "device") else "cpu"
        self.writer: Any = None

    # ---- the run ---------------------------------------------------------------------------------------------
    def run(self) -> FinetuneResult:
        # 1. data: read, check, tokenize (no GPU yet)
        tokenizer, train, dev, prompts = self._data()
        if self.job.should_stop():
            return self._finish(FinetuneResult(self.run_record.id, "cancelled", 0, None, "cancelled before training"))
        # 2. model: free the card of idle models, load the base, add LoRA and the memory savers
        self.job.set_progress(0.05, "loading the base model")
        with contextlib.suppress(Exception):
            self.s.residency.offload()
        model, loop = self._model_and_loop(tokenizer, train)
        try:
            # 3. before: dev loss and answers of the base model
            before = self._evaluate(model, tokenizer, dev, prompts, "base")
            # 4. train
            self.job.set_progress(0.1, "training")
            if self.cfg.resume_from:
                loop.resume(self._resume_folder())
            result = loop.run()
            # 5. adapter, after-evaluation, record
            adapter = self._write_adapter(model, loop, result.status)
            after = self._evaluate(model, tokenizer, dev, prompts, "adapter")
            metrics = self._summary(before, after, prompts, result, loop)
            return self._finish(FinetuneResult(self.run_record.id, result.status, result.steps_done, adapter,
                                               result.message, metrics))  # fmt: skip
        finally:
            self._release(model, loop)

    def _data(self) -> tuple[Any, list, list, list]:
        from backends.llm import load_tokenizer

        self.job.set_progress(0.01, "checking the dataset")
        convs, dev_convs, report = split_dataset(self.cfg.data)
        tokenizer = load_tokenizer(self.base_folder)
        train = build_examples(tokenizer, convs, self.cfg.data, report)
        dev = build_examples(tokenizer, dev_convs, self.cfg.data) if dev_convs else []
        self.live["report"] = report
        self.job.log(f"dataset: {report.summary()}")
        self.run_record.record["summary"]["dataset"] = report.summary()
        if self.cfg.eval_prompts:
            prompts = [([{"role": "user", "content": p}], None) for p in self.cfg.eval_prompts]
        else:
            prompts = [split_prompt(c) for c in (dev_convs or convs)[:MAX_EVAL_PROMPTS]]
        return tokenizer, train, dev, prompts

    def _model_and_loop(self, tokenizer: Any, train: list) -> tuple[Any, StepLoop]:
        import torch

        opts, data = self.cfg.train, self.cfg.data
        torch.manual_seed(opts.seed)
        base = load_base(self.base_folder, self.device, opts)
        model = attach_lora(base, self.cfg.lora)
        notes = apply_memory_savers(model, opts, self.device, data.max_length)
        amp, how = precision(self.device, opts, data.max_length)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer, opt_name = make_optimizer(params, opts, self.device)
        for line in (f"precision: {how}", f"optimizer: {opt_name}", *notes):
            self.job.log(line)
        self.live["precision"] = how
        batches = ShuffledBatches(train, opts.batch_size, lambda xs: collate(xs, pad_id_of(tokenizer)), seed=opts.seed)
        loop_cfg = LoopConfig(max_steps=opts.max_steps, grad_accum=opts.grad_accum, max_grad_norm=opts.max_grad_norm,
                              log_every=opts.log_every, save_every=opts.save_every, eval_every=opts.eval_every,
                              amp_dtype=amp)  # fmt: skip
        hooks = LoopHooks(should_stop=self.job.should_stop, on_step=self._on_step, lease=lambda: self._lease(model, optimizer),
                          export=lambda folder, step: save_adapter(model, folder / "adapter"),
                          oom_advice=self._oom_advice)  # fmt: skip
        loop = StepLoop(model, lambda m, b: lm_loss(m, b, chunked=opts.chunked_loss), optimizer,
                        make_scheduler(optimizer, opts), batches, loop_cfg, self.run_record.dir, hooks)  # fmt: skip
        self.live["amp"] = amp
        self._open_writers()
        return model, loop

    def _lease(self, model: Any, optimizer: Any) -> contextlib.AbstractContextManager:
        """The residency manager's preemptible training lease when it has one, else a no-op lease."""
        training = getattr(self.s.residency, "training", None)
        if training is None:
            return contextlib.nullcontext(NullLease())
        return training(f"finetune:{self.run_record.id}", modules=[model], optimizers=[optimizer],
                        working_bytes=None, label="Fine-tune")  # fmt: skip

    def _oom_advice(self) -> str:
        """The VRAM planner's advice for this run (its QLoRA formula, corrected by what was measured)."""
        from studio.planner import LoraTrain, VramPlanner, from_config, oom_advice

        t, cfg = self.cfg.train, self.cfg
        try:
            info = from_config(json.loads((self.base_folder / "config.json").read_text(encoding="utf-8")), cfg.model)
            task = LoraTrain(seq=cfg.data.max_length, micro_batch=t.batch_size, rank=cfg.lora.rank,
                             checkpointing=t.gradient_checkpointing, chunked_loss=t.chunked_loss)  # fmt: skip
            planner = getattr(self.s.residency, "vram", None) or VramPlanner()
            return oom_advice(planner.plan(info, task, self.s.residency.capacity_bytes()))
        except (OSError, ValueError, KeyError) as e:
            log.info("no planner advice for this run: %s", e)
            return ""

    # ---- live metrics --------------------------------------------------------------------------------------
    def _on_step(self, r: StepRecord) -> None:
        row = asdict(r)
        self.live.setdefault("history", []).append(row)
        self.run_record.log_metrics(r.step, loss=r.loss, lr=r.lr, tokens_per_s=r.tokens_per_s, peak_bytes=r.peak_bytes)
        if self.writer is not None:
            for k in ("loss", "lr", "tokens_per_s"):
                self.writer.add_scalar(f"train/{k}", row[k], r.step)
        wandb = self.live.get("wandb")
        if wandb is not None:
            wandb.log({"loss": r.loss, "lr": r.lr, "tokens_per_s": r.tokens_per_s}, step=r.step)
        vram = f", VRAM peak {r.peak_bytes / 1e9:.2f} GB" if r.peak_bytes else ""
        self.job.set_progress(0.1 + 0.8 * r.step / self.cfg.train.max_steps,
                              f"step {r.step}/{self.cfg.train.max_steps} · loss {r.loss:.4f} · {r.tokens_per_s:,.0f} tok/s"
                              f" · ETA {r.eta_s:,.0f} s{vram}")  # fmt: skip

    def _open_writers(self) -> None:
        try:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(self.run_record.dir / "tensorboard"))
        except ImportError:
            self.job.log("tensorboardX is not installed: no TensorBoard events")
        self.live["wandb"] = _wandb(self.run_record, self.cfg)

    # ---- evaluation and outputs ----------------------------------------------------------------------------
    def _evaluate(self, model: Any, tokenizer: Any, dev: list, prompts: list, which: str) -> dict:
        self.job.set_progress(0.08 if which == "base" else 0.92, f"evaluating the {which} model on the dev set")
        ctx = base_disabled(model) if which == "base" else contextlib.nullcontext()
        with ctx:
            loss = dev_loss(model, dev, pad_id_of(tokenizer), amp=self.live.get("amp"))
            said = answers(model, tokenizer, [p for p, _ in prompts], self.cfg.eval_max_new_tokens)
        self.job.log(f"{which}: dev loss {loss.get('loss', float('nan')):.4f}" if loss else f"{which}: no dev set")
        if self.writer is not None and loss:
            self.writer.add_scalar(f"dev/loss_{which}", loss["loss"], 0)
        return {"dev": loss, "answers": said}

    def _write_adapter(self, model: Any, loop: StepLoop, status: str) -> Path | None:
        target = self.run_record.dir / safe_filename(self.cfg.output_name, default="adapter")
        ckpt = self.run_record.dir / CHECKPOINT / "adapter"
        try:
            if status in ("done", "cancelled") and loop.step > 0:
                with atomic_folder(target) as tmp:
                    save_adapter(model, tmp, metadata={"base": str(self.base_folder), "steps": str(loop.step)})
            elif ckpt.is_dir():  # stopped / failed: the last good checkpoint is the adapter
                with atomic_folder(target) as tmp:
                    shutil.copytree(ckpt, tmp, dirs_exist_ok=True)
            else:
                return None
        except OSError as e:
            self.job.log(f"could not write the adapter ({e}); the checkpoint folder is unchanged")
            return ckpt if ckpt.is_dir() else None
        self.run_record.add_artifact(target, "adapter")
        return target

    def _summary(self, before: dict, after: dict, prompts: list, result: Any, loop: StepLoop) -> dict:
        refs = [r for _, r in prompts]
        m: dict[str, Any] = {"dev_before": before["dev"], "dev_after": after["dev"], "steps": result.steps_done,
                             "paused_s": result.paused_s, "pauses": result.pauses}  # fmt: skip
        if result.history:
            m["peak_bytes"] = max((r.peak_bytes or 0) for r in result.history) or None
            m["tokens_per_s"] = sum(r.tokens_per_s for r in result.history) / len(result.history)
        if all(r is not None for r in refs):
            m["score_before"], m["score_after"] = score(before["answers"], refs), score(after["answers"], refs)
        m["samples"] = [{"prompt": p[-1]["content"], "reference": r, "base": b, "adapter": a}
                        for (p, r), b, a in zip(prompts, before["answers"], after["answers"], strict=True)]  # fmt: skip
        return m

    def _finish(self, result: FinetuneResult) -> FinetuneResult:
        status = {"done": "done", "cancelled": "cancelled"}.get(result.status, "failed")
        summary = {k: v for k, v in result.metrics.items() if k != "samples"}
        summary.update(status_detail=result.status, message=result.message, steps=result.steps_done,
                       adapter=str(result.adapter) if result.adapter else None)  # fmt: skip
        self.run_record.record["summary"]["samples"] = result.metrics.get("samples", [])
        self.run_record.finish(status, **summary)
        if self.writer is not None:
            self.writer.close()
        if self.live.get("wandb") is not None:
            self.live["wandb"].finish()
        self.live["result"] = result
        self.job.log(f"finished: {result.status} after {result.steps_done} steps. {result.message}")
        return result

    def _resume_folder(self) -> Path:
        folder = self.s.runs.get(self.cfg.resume_from).dir / CHECKPOINT
        if not (folder / "meta.json").is_file():
            raise FileNotFoundError(f"run {self.cfg.resume_from} has no checkpoint to resume from")
        return folder

    def _release(self, model: Any, loop: Any) -> None:
        import gc

        import torch

        loop.optimizer, loop.model, loop.params = None, None, {}
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.live["released"] = time.time()


def _wandb(run: Any, cfg: FinetuneConfig) -> Any:
    """A W&B run when wandb is installed and configured (WANDB_API_KEY or WANDB_MODE=offline), else None."""
    import os

    if not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "offline"):
        return None
    try:
        import wandb
    except ImportError:
        return None
    return wandb.init(project="onecard-studio", name=run.id, dir=str(run.dir), config=asdict(cfg))
