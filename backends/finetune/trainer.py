"""A generic, resumable training step loop (used by the text fine-tune here and by the VLM fine-tune).

Nothing in it knows about language models: it takes
- `model`: a torch module; the parameters with `requires_grad` are the ones trained and checkpointed;
- `loss_fn(model, batch) -> (loss, n)`: the mean loss over the `n` units (tokens) the batch trains on;
- `batches`: a `BatchSource` (micro-batch `i` of the whole run is a pure function of `i` and the seed, so a resumed
  run sees exactly the batches the uninterrupted one would have; `ShuffledBatches` shuffles per epoch);
- an optimizer and an LR scheduler (stepped once per optimizer step);
- `LoopHooks`: should_stop (cancel), on_step (live metrics), evaluate (dev set every N steps), export (write extra
  files, e.g. a PEFT adapter, into each checkpoint folder), and a lease factory (the residency manager's
  preemptible training lease: every optimizer step runs inside `lease.step()`).

Invariants:
- One optimizer step = `grad_accum` micro-batches; the loss is the token-weighted mean over all of them.
- A non-finite loss or gradient norm stops the run BEFORE the optimizer step: weights stay as at the last good
  step and the last checkpoint is kept (status "stopped"). With fp16 the gradient scaler's skipped steps are normal.
- An out-of-memory step ends the run as "failed" with the checkpoint kept and a message saying what to lower.
- Checkpoints (`checkpoint/`: trainable.safetensors, state.pt with optimizer, scheduler, scaler and RNG states,
  meta.json) are written through `studio.safety.atomic_folder`: a failed save (disk full) leaves the previous
  checkpoint intact and stops the run with status "failed" and a message saying so.
- Resuming restores parameters, optimizer, scheduler, scaler and RNG, so the loss curve continues exactly as an
  uninterrupted run's (on CPU bit for bit; a test checks it). The saved parameter names must match the model's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from studio.safety import atomic_folder, load_safetensors, load_torch_weights, save_safetensors

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint"


class BatchSource(Protocol):
    def __len__(self) -> int: ...  # micro-batches per epoch
    def batch(self, index: int) -> dict[str, Any]: ...  # micro-batch `index` of the run (0, 1, 2, ... over epochs)


class ShuffledBatches:
    """Items cut into micro-batches, in a new seeded order every epoch; `batch(i)` depends only on (i, seed)."""

    def __init__(self, items: list[Any], batch_size: int, collate: Callable[[list[Any]], dict], seed: int = 0):
        if not items:
            raise ValueError("no training items")
        self.items, self.batch_size, self.collate, self.seed = items, batch_size, collate, seed
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return max(1, len(self.items) // self.batch_size)

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self.items), generator=g).tolist()}
        return self._orders[epoch]

    def batch(self, index: int) -> dict[str, Any]:
        epoch, pos = divmod(index, len(self))
        order = self._order(epoch)
        return self.collate([self.items[i] for i in order[pos * self.batch_size : (pos + 1) * self.batch_size]])


@dataclass(frozen=True)
class LoopConfig:
    max_steps: int
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    log_every: int = 1
    save_every: int = 0  # 0: only at the end / on cancel
    eval_every: int = 0
    amp_dtype: str | None = None  # None (fp32), "bf16" or "fp16" (with a gradient scaler)

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.grad_accum < 1:
            raise ValueError(f"max_steps {self.max_steps} and grad_accum {self.grad_accum} must be >= 1")
        if self.amp_dtype not in (None, "bf16", "fp16"):
            raise ValueError(f"amp_dtype {self.amp_dtype!r}: use None, 'bf16' or 'fp16'")


@dataclass
class StepRecord:
    step: int  # optimizer steps done, 1-based
    loss: float
    lr: float
    tokens: int  # input tokens in this step (all micro-batches)
    seconds: float
    tokens_per_s: float
    eta_s: float
    peak_bytes: int | None  # CUDA peak allocated since the run started


class NullLease:
    """What a trainer gets where there is no residency lease (CPU, tests): no pauses."""

    paused_s = 0.0
    pauses = 0

    def step(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def report(self, **_: Any) -> None:
        pass


@dataclass
class LoopHooks:
    should_stop: Callable[[], bool] = lambda: False
    on_step: Callable[[StepRecord], None] = lambda r: None
    evaluate: Callable[[int], dict[str, float]] | None = None
    export: Callable[[Path, int], None] | None = None  # write more files into a checkpoint folder being built
    lease: Callable[[], contextlib.AbstractContextManager] = lambda: contextlib.nullcontext(NullLease())
    oom_advice: Callable[[], str] = lambda: ""  # the VRAM planner's sentence for this job, with numbers


@dataclass
class LoopResult:
    status: str  # done, cancelled, stopped (non-finite loss), failed (a save failed)
    steps_done: int
    last_checkpoint_step: int | None
    message: str = ""
    history: list[StepRecord] = field(default_factory=list)
    paused_s: float = 0.0
    pauses: int = 0


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class StepLoop:
    def __init__(self, model: Any, loss_fn: Callable, optimizer: Any, scheduler: Any, batches: BatchSource,
                 cfg: LoopConfig, run_dir: Path, hooks: LoopHooks | None = None):  # fmt: skip
        self.model, self.loss_fn, self.optimizer, self.scheduler = model, loss_fn, optimizer, scheduler
        self.batches, self.cfg, self.run_dir, self.hooks = batches, cfg, Path(run_dir), hooks or LoopHooks()
        self.params = trainable(model)
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.device = next(iter(self.params.values())).device
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.amp_dtype == "fp16" else None
        self.step = 0
        self.saved_step: int | None = None

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / CHECKPOINT

    # ---- the loop ------------------------------------------------------------------------------------------
    def run(self) -> LoopResult:
        history: list[StepRecord] = []
        t_start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.model.train()
        with self.hooks.lease() as lease:
            result = self._steps(lease, history, t_start)
            result.paused_s, result.pauses = float(getattr(lease, "paused_s", 0.0)), int(getattr(lease, "pauses", 0))
        result.history = history
        return result

    def _steps(self, lease: Any, history: list[StepRecord], t_start: float) -> LoopResult:
        cfg, first = self.cfg, self.step
        while self.step < cfg.max_steps:
            if self.hooks.should_stop():
                return self._end("cancelled", f"cancelled at step {self.step}")
            t0 = time.perf_counter()
            try:
                with lease.step():
                    loss, tokens, finite = self._optimizer_step()
            except torch.OutOfMemoryError as e:
                return self._out_of_memory(e)
            if not finite:
                kept = f"checkpoint of step {self.saved_step} kept" if self.saved_step else "no checkpoint yet"
                msg = f"non-finite loss or gradient at step {self.step + 1} (loss {loss}); stopped, {kept}"
                log.warning(msg)
                return LoopResult("stopped", self.step, self.saved_step, msg)
            self.step += 1
            rec = self._record(loss, tokens, time.perf_counter() - t0, t_start, first)
            history.append(rec)
            lease.report(step=self.step, loss=loss)
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                self.hooks.on_step(rec)
            if self.hooks.evaluate and cfg.eval_every and self.step % cfg.eval_every == 0:
                self.hooks.evaluate(self.step)
                self.model.train()
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                failed = self._save_or_fail()
                if failed:
                    return failed
        return self._end("done", f"{self.step} steps")

    def _out_of_memory(self, e: Exception) -> LoopResult:
        """A step ran out of GPU memory: drop the gradients, keep the last checkpoint, say what to change."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        kept = f"checkpoint of step {self.saved_step} kept" if self.saved_step else "no checkpoint yet"
        msg = (f"out of GPU memory at step {self.step + 1} ({str(e).splitlines()[0][:160]}); {kept}. "
               "Lower the max length or the batch size, or turn activation offload on.")  # fmt: skip
        advice = self.hooks.oom_advice()
        msg += f" {advice}" if advice else ""
        log.error(msg)
        return LoopResult("failed", self.step, self.saved_step, msg)

    def _end(self, status: str, message: str) -> LoopResult:
        if self.step > 0 and self.saved_step != self.step:
            failed = self._save_or_fail()
            if failed:
                return failed
        return LoopResult(status, self.step, self.saved_step, message)

    def _record(self, loss: float, tokens: int, seconds: float, t_start: float, first: int) -> StepRecord:
        done = self.step - first
        per_step = (time.perf_counter() - t_start) / max(1, done)
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        lr = float(self.optimizer.param_groups[0]["lr"])
        eta = per_step * (self.cfg.max_steps - self.step)
        return StepRecord(self.step, loss, lr, tokens, seconds, tokens / max(seconds, 1e-9), eta, peak)

    def _micro_batches(self) -> list[dict[str, Any]]:
        first = self.step * self.cfg.grad_accum
        return [self.batches.batch(first + k) for k in range(self.cfg.grad_accum)]

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.amp_dtype is None:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.amp_dtype == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _optimizer_step(self) -> tuple[float, int, bool]:
        """Forward/backward over the micro-batches, clip, step. Returns (loss, input tokens, finite)."""
        batches = self._micro_batches()
        weights = [int((b["labels"][:, 1:] != -100).sum()) if "labels" in b else 1 for b in batches]
        total = max(1, sum(weights))
        tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else 0 for b in batches)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for batch, w in zip(batches, weights, strict=True):
            with self._autocast():
                loss, _ = self.loss_fn(self.model, batch)
            value = float(loss.detach())
            if not math.isfinite(value):
                self.optimizer.zero_grad(set_to_none=True)
                return value, tokens, False
            scaled = loss * (w / total)
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += value * w / total
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = list(self.params.values())
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm or float("inf"))
        if not torch.isfinite(norm) and self.scaler is None:
            self.optimizer.zero_grad(set_to_none=True)
            return float("nan"), tokens, False
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        return loss_sum, tokens, True

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def _save_or_fail(self) -> LoopResult | None:
        try:
            self.save()
        except OSError as e:
            kept = f"the checkpoint of step {self.saved_step} is intact" if self.saved_step else "no checkpoint yet"
            msg = f"could not save the checkpoint of step {self.step} ({e.strerror or e}); {kept}"
            log.error(msg)
            return LoopResult("failed", self.step, self.saved_step, msg)
        return None

    def save(self) -> Path:
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }
        tensors = {n: p.detach().to("cpu", copy=True).contiguous() for n, p in self.params.items()}
        with atomic_folder(self.checkpoint_dir) as tmp:
            save_safetensors(tensors, tmp / "trainable.safetensors")
            torch.save(state, tmp / "state.pt")
            (tmp / "meta.json").write_text(json.dumps({"step": self.step, "params": sorted(self.params)}))
            if self.hooks.export:
                self.hooks.export(tmp, self.step)
        self.saved_step = self.step
        log.info("checkpoint of step %d saved in %s", self.step, self.checkpoint_dir)
        return self.checkpoint_dir

    def resume(self, folder: Path) -> int:
        """Load a checkpoint folder written by `save`; returns the step it was taken at."""
        folder = Path(folder)
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if sorted(self.params) != meta["params"]:
            missing = sorted(set(meta["params"]) ^ set(self.params))[:3]
            raise ValueError(f"checkpoint {folder} was made for other trainable parameters (e.g. {missing}): "
                             "resume with the same model, LoRA rank and target modules")  # fmt: skip
        tensors = load_safetensors(folder / "trainable.safetensors")
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(tensors[name].to(p.device, p.dtype))
        state = load_torch_weights(folder / "state.pt")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if state.get("rng_cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        self.step = self.saved_step = int(meta["step"])
        log.info("resumed from %s at step %d", folder, self.step)
        return self.step


def iterate_records(history: list[StepRecord]) -> Iterator[dict[str, Any]]:
    for r in history:
        yield {"step": r.step, "loss": r.loss, "lr": r.lr, "tokens_per_s": r.tokens_per_s}
