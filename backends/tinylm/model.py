"""The model: a nanoGPT-style decoder with a choice of positions (learned, rotary, ALiBi) and a KV cache.

Invariants the tests hold it to:
- causal: position i's logits depend on tokens 0..i only (`causal_mask` is the one definition; the full-sequence
  path hands the same mask to SDPA as `is_causal=True`, which lets it pick the flash kernel);
- cached == uncached: feeding tokens one at a time (or in chunks) through a `KVCache` gives the logits of one
  full forward pass, for every position encoding;
- rotary and ALiBi models accept any length (their positions are computed, not looked up); a learned table ends at
  `block_size`, and asking for more raises.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from backends.tinylm.types import TinyLMConfig

ROPE_BASE = 10_000.0


def causal_mask(t_q: int, t_k: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(t_q, t_k) bool, True where a query may look: the queries are the last t_q of the t_k positions."""
    rows = torch.arange(t_q, device=device)[:, None] + (t_k - t_q)
    return torch.arange(t_k, device=device)[None, :] <= rows


def alibi_slopes(n_head: int) -> torch.Tensor:
    """Per-head slopes from the ALiBi paper: a geometric series; for a non-power-of-2 count, interleaved extras."""

    def series(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_head).is_integer():
        return torch.tensor(series(n_head))
    low = 2 ** math.floor(math.log2(n_head))
    return torch.tensor(series(low) + series(2 * low)[0::2][: n_head - low])


def alibi_bias(slopes: torch.Tensor, t_q: int, t_k: int) -> torch.Tensor:
    """(nh, t_q, t_k) additive bias: -slope * distance to the key, -inf on keys in the future."""
    rows = torch.arange(t_q, device=slopes.device)[:, None] + (t_k - t_q)
    distance = (rows - torch.arange(t_k, device=slopes.device)[None, :]).float()  # (t_q, t_k), >= 0 where visible
    bias = -slopes.float()[:, None, None] * distance
    return bias.masked_fill(distance < 0, float("-inf"))


def rope_tables(head_size: int, start: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, (length, head_size / 2), for absolute positions start .. start + length - 1."""
    inv = 1.0 / ROPE_BASE ** (torch.arange(0, head_size, 2, device=device, dtype=torch.float32) / head_size)
    angles = torch.arange(start, start + length, device=device, dtype=torch.float32)[:, None] * inv[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, nh, T, hs) pairwise (first half with second half, as in GPT-NeoX / Llama)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class KVCache:
    """Keys and values of every layer so far, (B, nh, T, hs) each; keys are stored already rotated (RoPE).

    With a `capacity` the buffers are allocated once and filled in place (a decode step copies one position, not
    the whole past); without one, each step concatenates."""

    def __init__(self, n_layer: int, capacity: int | None = None) -> None:
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layer
        self.capacity, self.filled = capacity, [0] * n_layer

    @property
    def length(self) -> int:
        return self.filled[0]

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.filled[layer], self.filled[layer] + k.shape[2]
        past = self.layers[layer]
        if self.capacity is None:
            if past is not None:
                k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
            self.layers[layer], self.filled[layer] = (k, v), end
            return k, v
        if end > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} positions; {end} asked")
        if past is None:
            shape = (k.shape[0], k.shape[1], self.capacity, k.shape[3])
            past = self.layers[layer] = (k.new_empty(shape), v.new_empty(shape))
        past[0][:, :, start:end], past[1][:, :, start:end] = k, v
        self.filled[layer] = end
        return past[0][:, :, :end], past[1][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TinyLMConfig) -> None:
        super().__init__()
        self.n_head, self.pos, self.dropout = cfg.n_head, cfg.pos, cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)
        if cfg.pos == "alibi":
            self.register_buffer("slopes", alibi_slopes(cfg.n_head), persistent=False)

    def forward(self, x: torch.Tensor, rope, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.extend(layer, k, v)  # (B, nh, past + T, hs)
        t_k, drop = k.shape[2], self.dropout if self.training else 0.0
        if self.pos == "alibi":
            mask = alibi_bias(self.slopes, T, t_k).to(q.dtype)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        elif t_k == T:  # no past: causal_mask(T, T), which SDPA's is_causal means; flash kernels allowed
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        elif T == 1:  # one new query sees every cached key
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        else:  # a chunk after a past: is_causal would align top-left, so the explicit mask
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(T, t_k, x.device), dropout_p=drop)
        return self.resid_drop(self.proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class Block(nn.Module):
    def __init__(self, cfg: TinyLMConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias),
            nn.GELU(),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor, rope, cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), rope, cache, layer)
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, cfg: TinyLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # weight tying: fewer parameters, better small-data loss
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None):
        T = idx.shape[1]
        past = cache.length if cache is not None else 0
        if self.pos_emb is not None and past + T > self.cfg.block_size:
            raise ValueError(f"learned positions end at {self.cfg.block_size}; got {past + T} tokens")
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(past, past + T, device=idx.device))
        rope = rope_tables(self.cfg.head_size, past, T, idx.device) if self.cfg.pos == "rope" else None
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cache, i)
        logits = self.head(self.ln_f(x))  # (B, T, vocab)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """state_dict without the tied head (safetensors refuses shared tensors; loading re-ties it)."""
        return {k: v for k, v in self.state_dict().items() if k != "head.weight"}

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.8, top_k: int | None = 40,
                 use_cache: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
        """Sample `max_new_tokens` after `idx` (B, T). The window is the last block_size tokens; with the cache,
        a full window is refilled from its last half (so a long sample recomputes every block_size / 2 tokens)."""
        block = self.cfg.block_size
        cache = KVCache(self.cfg.n_layer, block) if use_cache else None
        logits = self(idx[:, -block:], cache=cache)[0][:, -1]
        for i in range(max_new_tokens):
            nxt = pick_next(logits, temperature, top_k, generator)
            idx = torch.cat((idx, nxt), dim=1)
            if i == max_new_tokens - 1:
                break
            if cache is None:
                logits = self(idx[:, -block:])[0][:, -1]
            elif cache.length >= block:
                cache = KVCache(self.cfg.n_layer, block)
                logits = self(idx[:, -(block // 2) :], cache=cache)[0][:, -1]
            else:
                logits = self(nxt, cache=cache)[0][:, -1]
        return idx


def pick_next(logits: torch.Tensor, temperature: float, top_k: int | None, generator=None) -> torch.Tensor:
    """(B, vocab) -> (B, 1): temperature, then top-k, then a multinomial draw."""
    logits = logits.float() / max(temperature, 1e-5)
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
