"""The fused decoder for int4 Llama models: a compact forward of its own over the model's tensors (gpt-fast style).

Per layer and token: add+RMSNorm (1 kernel), fused q/k/v int4 matmul (1), rope + KV-cache write (1), attention
over the cache (2: split + combine), o matmul (1), add+RMSNorm (1), fused gate/up matmul (1), silu*mul (1), down
matmul (1): 10 kernels where transformers' forward launches ~30. The ops come from `kernels` (Triton on CUDA
when they pass their self-check, torch elsewhere); on CUDA the whole step is captured in one CUDA graph.

Same interface as `fastdecode.StaticDecoder`: `prefill(ids)` / `step(token)` return float32 logits (V,);
`matches(model, needed)`; `name`; `graph_error`; `capture_s`. The decoder holds references to the model's own
tensors (no copies); its graph captures their addresses, so `matches` compares the weights' fingerprint (the
residency manager may have moved the model). The prefill always starts at position 0 (a chat re-prefills the
whole prompt) and runs the same ops over all prompt tokens at once, with causal attention.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from backends.llm.fastdecode import GraphStepDecoder
from backends.llm.int4 import Int4Linear
from backends.llm.kernels import pick_ops

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Layer:
    in_norm: torch.Tensor
    qkv: Int4Linear
    o: Int4Linear
    post_norm: torch.Tensor
    gate_up: Int4Linear
    down: Int4Linear


def fused_layers(model: Any) -> list[_Layer] | None:
    """The fused int4 modules of every decoder layer, or None if the model is not an int4 Llama (backends.llm.int4)."""
    layers = []
    for block in getattr(getattr(model, "model", None), "layers", []):
        att, mlp = block.self_attn, block.mlp
        mods = (getattr(att, "qkv_proj", None), att.o_proj, getattr(mlp, "gate_up_proj", None), mlp.down_proj)
        if not all(isinstance(m, Int4Linear) for m in mods):
            return None
        layers.append(_Layer(block.input_layernorm.weight, mods[0], mods[1], block.post_attention_layernorm.weight,
                             mods[2], mods[3]))  # fmt: skip
    return layers or None


class FusedInt4Decoder(GraphStepDecoder):
    """Static KV cache of `max_len` slots; the step is the compact forward, captured in a CUDA graph on CUDA."""

    def __init__(self, model: Any, max_len: int, *, use_graph: bool = True) -> None:
        layers = fused_layers(model)
        if layers is None:
            raise ValueError("FusedInt4Decoder needs an int4 Llama model (backends.llm.int4)")
        c = model.config
        self._init_step(model, max_len, use_graph, (1,))
        self.layers = layers
        self.dtype = layers[0].qkv.scales_zeros.dtype
        self.n_heads, self.n_kv = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.eps = c.rms_norm_eps
        self.ops, self.ops_note = pick_ops(self.device, self.dtype)
        kv_shape = (len(layers), self.n_kv, max_len, self.head_dim)
        self.k_cache = torch.zeros(kv_shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(kv_shape, dtype=self.dtype, device=self.device)
        self.cos, self.sin = self._rope_tables(model)

    @property
    def name(self) -> str:
        mode = "cuda-graph" if self.graph is not None else "no graph"
        if self.graph_error:
            mode = "graph capture failed"
        return f"int4 fused ({self.ops.name}, {mode})"

    @torch.no_grad()
    def _rope_tables(self, model: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of every slot from the model's own rotary module (so rope scaling such as llama3 is its own)."""
        rotary = model.model.rotary_emb
        probe = torch.zeros((1, 1, self.head_dim), dtype=self.dtype, device=self.device)
        cos, sin = rotary(probe, self.slots.view(1, -1))
        return cos[0].to(self.dtype).contiguous(), sin[0].to(self.dtype).contiguous()

    # ---- the forward ------------------------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, prefill: bool, start: int = 0) -> torch.Tensor:
        """Hidden state of the last token after the final norm; writes k/v of every token at `pos` (a prefill's
        tokens sit at slots start.. after `start` slots the cache already holds)."""
        ops, m = self.ops, ids.shape[0]
        x = F.embedding(ids, self.model.get_input_embeddings().weight).to(self.dtype)
        delta = None
        for i, layer in enumerate(self.layers):
            x, h = ops.add_rmsnorm(x, delta, layer.in_norm, self.eps)
            q = ops.rope_cache(layer.qkv(h), self.cos, self.sin, pos, self.k_cache[i], self.v_cache[i],
                               self.n_heads, self.n_kv)  # fmt: skip
            a = self._prefill_attention(q, i, m, start) if prefill else ops.attend(
                q, self.k_cache[i], self.v_cache[i], pos, self.slots)  # fmt: skip
            x, h = ops.add_rmsnorm(x, layer.o(a), layer.post_norm, self.eps)
            delta = layer.down(ops.silu_mul(layer.gate_up(h)))
        _, h = ops.add_rmsnorm(x[-1:], delta[-1:], self.model.model.norm.weight, self.eps)
        return h

    def _prefill_attention(self, q: torch.Tensor, layer: int, m: int, start: int = 0) -> torch.Tensor:
        """Causal attention of the prompt's m new tokens (slots start..start+m-1, just written) over slots
        0..start+m-1, grouped kv heads. From slot 0 the flash kernel's own causal mask; after a reused prefix an
        explicit one (SDPA's `is_causal` aligns the top-left corner, which is wrong when the queries are the last
        rows)."""
        rep = self.n_heads // self.n_kv  # kv heads repeated (as transformers does), so the flash kernel applies
        end = start + m
        k = self.k_cache[layer, :, :end].repeat_interleave(rep, 0).unsqueeze(0)
        v = self.v_cache[layer, :, :end].repeat_interleave(rep, 0).unsqueeze(0)
        q = q.transpose(0, 1).unsqueeze(0)
        if start == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            allowed = self.slots[:end].view(1, -1) <= self.slots[start:end].view(-1, 1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return out[0].transpose(0, 1).reshape(m, -1)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(h)[-1]

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, keys: Any = None) -> torch.Tensor:
        """Only the tokens after the prefix the cache already holds are computed (fastdecode's prompt reuse)."""
        n = ids.shape[-1]
        if n >= self.max_len:
            raise ValueError(f"prompt of {n} tokens does not fit a static cache of {self.max_len}")
        flat = ids.reshape(-1)
        keys = flat.tolist() if keys is None else list(keys)
        p = self._prefix(keys)
        logits = self._logits(self._forward(flat[p:], self.slots[p:n], prefill=True, start=p)).float()
        self._filled(n, keys, p)
        return logits

    def _step_body(self) -> None:
        logits = self._logits(self._forward(self.ids_buf, self.pos_buf, prefill=False))
        if self.logits_buf is None:
            self.logits_buf = torch.empty(logits.shape, dtype=torch.float32, device=self.device)
        self.logits_buf.copy_(logits)
