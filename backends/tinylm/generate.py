"""Sampling (with or without the KV cache, timed) and perplexity at longer contexts than the model trained on."""

from __future__ import annotations

import math
import time

import torch
from torch.nn import functional as F

from backends.tinylm.model import TinyGPT
from backends.tinylm.types import ExtrapolationPoint, SampleResult

EXTRAPOLATION_FACTORS = (1, 2, 4)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def sample_ids(model: TinyGPT, ids: list[int], max_new_tokens: int, temperature: float, top_k: int | None,
               use_cache: bool, seed: int | None = None) -> tuple[list[int], float]:  # fmt: skip
    """(all ids, seconds spent generating): the prompt's ids followed by `max_new_tokens` sampled ones."""
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    _sync(device)
    t0 = time.perf_counter()
    out = model.generate(idx, max_new_tokens, temperature, top_k, use_cache=use_cache, generator=gen)
    _sync(device)
    return out[0].tolist(), time.perf_counter() - t0


def sample_text(model: TinyGPT, tok, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None,
                use_cache: bool, seed: int | None) -> SampleResult:  # fmt: skip
    ids = tok.encode(prompt)
    out, seconds = sample_ids(model, ids, max_new_tokens, temperature, top_k, use_cache, seed)
    return SampleResult(tok.decode(out), max_new_tokens, seconds, use_cache)


@torch.no_grad()
def window_loss(model: TinyGPT, data: torch.Tensor, context: int, max_tokens: int, batch: int = 8,
                dtype: torch.dtype | None = None) -> tuple[float, int]:  # fmt: skip
    """Mean next-token loss over non-overlapping windows of `context` tokens covering the first `max_tokens`
    tokens of `data` (the same tokens for every context that divides it), and how many tokens were scored."""
    device = next(model.parameters()).device
    n_windows = min(max_tokens, len(data) - 1) // context
    if n_windows == 0:
        raise ValueError(f"{len(data)} tokens are too few to score a context of {context}.")
    model.eval()
    total, count = 0.0, 0
    for first in range(0, n_windows, batch):
        rows = range(first, min(n_windows, first + batch))
        x = torch.stack([data[r * context : (r + 1) * context] for r in rows]).to(device)
        y = torch.stack([data[r * context + 1 : (r + 1) * context + 1] for r in rows]).to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(x)[0]
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum"))
        count += y.numel()
    return total / count, count


def extrapolation(model: TinyGPT, data: torch.Tensor, max_tokens: int, factors=EXTRAPOLATION_FACTORS,
                  dtype: torch.dtype | None = None) -> list[ExtrapolationPoint]:  # fmt: skip
    """Loss at 1x, 2x, 4x the training context on the same held-out tokens; a learned table cannot go past 1x."""
    block = model.cfg.block_size
    span = (min(max_tokens, len(data) - 1) // (block * max(factors))) * block * max(factors)
    if span == 0:
        raise ValueError(f"{len(data)} held-out tokens are too few for {max(factors)}x a context of {block}.")
    points = []
    for f in factors:
        if model.cfg.pos == "learned" and f > 1:
            points.append(ExtrapolationPoint(f, f * block, None, 0))
            continue
        loss, n = window_loss(model, data, f * block, span, batch=max(1, 8 // f), dtype=dtype)
        points.append(ExtrapolationPoint(f, f * block, loss, n))
    return points


def describe(points: list[ExtrapolationPoint]) -> str:
    parts = []
    for p in points:
        shown = "n/a (no learned positions past the table)" if p.loss is None else f"{math.exp(p.loss):.2f}"
        parts.append(f"{p.factor}x ({p.context} tokens): {shown}")
    return "; ".join(parts)
