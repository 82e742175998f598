"""Training: the recipe (optimizer, schedule, precision, batches) and the lab's step loop under the training lease.

The recipe is shared with `studio.bench.tinylm`: nanoGPT's AdamW (decay on matrices only, fused on CUDA), linear
warm-up then cosine to `final_lr`, bf16 autocast where the card has it (fp32 master weights, fp32 loss), batches
drawn on the device from a seeded generator (no host sync per step), gradient clipping at 1.0.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch

from backends.tinylm.model import TinyGPT
from backends.tinylm.types import TrainOptions, TrainResult
from studio.safety import save_safetensors

log = logging.getLogger(__name__)


def amp_dtype(opts: TrainOptions, device: torch.device) -> torch.dtype | None:
    """bf16 on a CUDA card that supports it (auto or bf16), else None (fp32)."""
    if opts.amp == "off" or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else None


def autocast(dtype: torch.dtype | None, device: torch.device):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def make_optimizer(model: torch.nn.Module, opts: TrainOptions, device: torch.device) -> torch.optim.AdamW:
    """nanoGPT's groups: weight decay on 2-D tensors (matmuls, embeddings), none on biases and LayerNorms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": opts.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=opts.lr, betas=(0.9, opts.beta2), fused=fused)


def lr_at(step: int, progress: float, opts: TrainOptions) -> float:
    """Linear warm-up over `warmup_steps`, then cosine from lr to final_lr as `progress` goes 0 -> 1."""
    if step < opts.warmup_steps:
        return opts.lr * (step + 1) / opts.warmup_steps
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))
    return opts.final_lr + (opts.lr - opts.final_lr) * cos


def step_progress(step: int, opts: TrainOptions) -> float:
    return (step - opts.warmup_steps) / max(1, opts.steps - opts.warmup_steps)


class Batches:
    """Random windows of a token stream kept on the device; indices drawn there from a seeded generator."""

    def __init__(self, data: torch.Tensor, block: int, batch: int, device: torch.device, seed: int) -> None:
        if len(data) <= block + 1:
            raise ValueError(f"{len(data)} tokens are too few for a context of {block}; use more text.")
        self.data, self.block, self.batch = data.to(device), block, batch
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.offsets = torch.arange(block + 1, device=device)

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        start = torch.randint(len(self.data) - self.block - 1, (self.batch, 1), generator=self.gen,
                              device=self.data.device)  # fmt: skip
        window = self.data[start + self.offsets]  # (B, block + 1)
        return window[:, :-1], window[:, 1:]


def train_step(model, optim, x, y, dtype, device) -> torch.Tensor:
    """One optimizer step; returns the loss (a device scalar: no host sync here). Non-finite: no update."""
    with autocast(dtype, device):
        _, loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if bool(torch.isfinite(loss)):
        optim.step()
    optim.zero_grad(set_to_none=True)
    return loss.detach()


def train_step_unchecked(model, optim, x, y, dtype, device) -> torch.Tensor:
    """`train_step` without the finite check (which syncs): for benchmarks that check the loss at evaluations."""
    with autocast(dtype, device):
        _, loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optim.step()
    optim.zero_grad(set_to_none=True)
    return loss.detach()


@torch.no_grad()
def evaluate(model: TinyGPT, batches: Batches, n: int, dtype, device) -> float:
    """Mean loss over `n` batches in eval mode (dropout off); the model goes back to train mode."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    for _ in range(n):
        x, y = batches.sample()
        with autocast(dtype, device):
            total += model(x, y)[1].float()
    model.train(was_training)
    return float(total) / n


class LabLoop:
    """The lab's loop: steps under the lease, metrics to the run, a safetensors checkpoint at every evaluation."""

    def __init__(self, job, model: TinyGPT, opts: TrainOptions, run, lease, optim, train_data, val_data) -> None:
        self.job, self.model, self.opts, self.run, self.lease = job, model, opts, run, lease
        self.device = next(model.parameters()).device
        self.dtype = amp_dtype(opts, self.device)
        self.optim = optim  # the one the lease moves when it yields
        block = model.cfg.block_size
        self.train = Batches(train_data, block, opts.batch_size, self.device, opts.seed)
        self.val = Batches(val_data, block, opts.batch_size, self.device, opts.seed + 1)
        self.forward = model
        if opts.compile and self.device.type == "cuda":
            self.forward = torch.compile(model)  # the first steps compile (tens of seconds), later ones run faster
        elif opts.compile:
            job.log("torch.compile is for the GPU: on the CPU its first steps take minutes, so the run goes eager")
        self.log_every = max(1, opts.eval_every // 4)
        self.tokens_per_step = opts.batch_size * block

    def run_steps(self) -> TrainResult:
        opts, result = self.opts, TrainResult(self.run.id, 0, float("inf"), "finished")
        window_loss, window_n, t_mark, step_mark = 0.0, 0, time.perf_counter(), 0
        for step in range(opts.steps):
            if self.job.should_stop():
                result.stopped = "cancelled"
                break
            lr = lr_at(step, step_progress(step, opts), opts)
            for group in self.optim.param_groups:
                group["lr"] = lr
            with self.lease.step():
                x, y = self.train.sample()
                loss = float(train_step(self.forward, self.optim, x, y, self.dtype, self.device))
            if not math.isfinite(loss):
                self.job.log(f"step {step + 1}: loss is {loss}; stopping and keeping the last good checkpoint")
                result.stopped = "nan"
                break
            self.lease.report(step=step + 1, loss=loss)
            result.steps_done, window_loss, window_n = step + 1, window_loss + loss, window_n + 1
            evaluate_now = (step + 1) % opts.eval_every == 0 or step + 1 == opts.steps
            if (step + 1) % self.log_every and not evaluate_now:
                if step % 5 == 0:  # the step count moves between evaluations
                    self.job.set_progress((step + 1) / opts.steps, f"step {step + 1}/{opts.steps}")
                continue
            now = time.perf_counter()
            rate = (step + 1 - step_mark) * self.tokens_per_step / max(now - t_mark, 1e-9)
            point: dict[str, Any] = {"step": step + 1, "train_loss": window_loss / window_n, "lr": lr,
                                     "tokens_per_s": rate}  # fmt: skip
            window_loss, window_n = 0.0, 0
            if evaluate_now:
                self._evaluate_into(point, result)
            self.run.log_metrics(step + 1, **{k: v for k, v in point.items() if k != "step"})
            t_mark, step_mark = time.perf_counter(), step + 1  # evaluation and saving are not training time
        if result.stopped == "cancelled" and result.steps_done:
            save_safetensors(self.model.checkpoint_state(), self.run.dir / "model.safetensors")
        return result

    def _evaluate_into(self, point: dict[str, Any], result: TrainResult) -> None:
        with self.lease.step():
            val = evaluate(self.model, self.val, self.opts.eval_batches, self.dtype, self.device)
        point.update(val_loss=val, val_ppl=math.exp(min(val, 50.0)))
        result.history.append(dict(point))
        result.best_val_loss = min(result.best_val_loss, val)
        save_safetensors(self.model.checkpoint_state(), self.run.dir / "model.safetensors")
        step, steps = point["step"], self.opts.steps
        self.job.set_progress(step / steps, f"step {step}/{steps}, val loss {val:.3f}")
        self.job.log(f"step {step}: train {point['train_loss']:.3f} val {val:.3f} "
                     f"(ppl {point['val_ppl']:.2f}, {point['tokens_per_s']:,.0f} tokens/s)")  # fmt: skip
