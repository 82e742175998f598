"""Token-by-token decoders for transformers causal LMs: a plain one and a fast one built on CUDA graphs.

Both expose `prefill(ids) -> logits` and `step(token) -> logits` (float32, shape (V,)), so the generation loop in
`llm_generate` is the same for every engine.

- `EagerDecoder`: a dynamic KV cache and one ordinary forward per token; exactly what `model.generate` does.
- `StaticDecoder`: a preallocated KV cache of `max_len` slots written at a position held in a device tensor. Each
  decode step reads its inputs from fixed buffers (`ids_buf`, `pos_buf`) and writes its logits into `logits_buf`,
  so on CUDA the whole step (every layer, the 4-bit matmuls, the mask and the cache write) is captured once in a
  `torch.cuda.CUDAGraph` after a warm-up on a side stream and then replayed: one launch per token instead of
  thousands. If capture fails the reason is logged once and the same step runs without the graph.

Prompt reuse (`StaticDecoder`): the decoder remembers which tokens' keys/values fill its first slots (the last
turn's prompt and reply); a prompt that continues the conversation prefills only its new tokens, so the second
turn's time to first token no longer grows with the history. `adopt` carries that prefix into a larger cache.

Invariants of the static path: the attention mask is built inside the step from `pos_buf` (slots > pos are masked),
so stale cache slots never leak; the graph captures the weights' addresses, so `weights_fingerprint` must be
compared before reuse (the residency manager may move the model); warm-up steps recompute the very same cache
slot as the real step, so they are harmless.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

log = logging.getLogger(__name__)


def model_device(model: Any) -> torch.device:
    return model.get_input_embeddings().weight.device


def compute_dtype(model: Any) -> torch.dtype:
    return model.get_input_embeddings().weight.dtype


def weights_fingerprint(model: Any) -> int:
    """Hash of every parameter/buffer address (and 4-bit quant-state address): changes when the model moves."""
    ptrs: list[int] = []
    for p in model.parameters():
        ptrs.append(p.data_ptr())
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            ptrs.append(qs.absmax.data_ptr())
            if getattr(qs, "state2", None) is not None:
                ptrs.append(qs.state2.absmax.data_ptr())
    ptrs.extend(b.data_ptr() for b in model.buffers())
    return hash(tuple(ptrs))


def _cache_kwarg(model: Any) -> str:
    """transformers >= 5.2x calls it `cache`; earlier releases `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class _WriteIndex:
    """Where the next keys/values go: a 1-D long tensor on the model's device, shared by all layers."""

    def __init__(self) -> None:
        self.current: torch.Tensor | None = None
        self.seen = 0


class StaticKVLayer(CacheLayerMixin):
    """One layer's preallocated keys/values, (B, n_kv_heads, max_len, head_dim), written at `index.current`."""

    is_compileable = True
    is_sliding = False
    is_croppable = False

    def __init__(self, max_len: int, index: _WriteIndex) -> None:
        CacheLayerMixin.__init__(self)
        self.max_len = max_len
        self.index = index

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        value_states = key_states if value_states is None else value_states
        b, h = key_states.shape[:2]
        self.device, self.dtype = key_states.device, key_states.dtype
        self.keys = torch.zeros((b, h, self.max_len, key_states.shape[-1]), dtype=key_states.dtype, device=self.device)
        self.values = torch.zeros(
            (b, h, self.max_len, value_states.shape[-1]), dtype=value_states.dtype, device=self.device
        )
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys.index_copy_(2, self.index.current, key_states)  # (B, h, max_len, d)
        self.values.index_copy_(2, self.index.current, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        return self.max_len, 0

    def get_seq_length(self, *args: Any, **kwargs: Any) -> int:
        return self.index.seen

    def get_max_length(self) -> int:
        return self.max_len

    def get_max_cache_shape(self) -> int:
        return self.max_len


class EagerDecoder:
    """Dynamic cache, one ordinary forward per token (the `model.generate` way). Works for every model."""

    name = "eager"

    def __init__(self, model: Any) -> None:
        self.model = model
        self.device = model_device(model)
        self._kw = _cache_kwarg(model)
        self.cache: Any = None

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, embeds: torch.Tensor | None = None, keys: Any = None) -> torch.Tensor:
        """`embeds` (1, n, d), when given, replaces the token embeddings of `ids` (a VLM's merged image features).
        `keys` is accepted like the static decoders' and unused: this one recomputes the whole prompt."""
        try:
            self.cache = DynamicCache(config=self.model.config)
        except TypeError:
            self.cache = DynamicCache()
        inputs = {"input_ids": ids} if embeds is None else {"inputs_embeds": embeds}
        out = self.model(**inputs, use_cache=True, **{self._kw: self.cache})
        return out.logits[0, -1].float()

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=token.view(1, 1), use_cache=True, **{self._kw: self.cache})
        return out.logits[0, -1].float()


class GraphStepDecoder:
    """What the static decoders share: the step's fixed input buffers, a static cache of `max_len` slots, and the
    step captured once as a CUDA graph (`use_graph`, CUDA only) and replayed; `_step_body()` must fill
    `logits_buf` from `ids_buf`/`pos_buf`; `_before_step()` may point caches at `pos_buf`."""

    def _init_step(self, model: Any, max_len: int, use_graph: bool, ids_shape: tuple[int, ...]) -> None:
        self.model, self.max_len = model, max_len
        self.device = model_device(model)
        self.use_graph = use_graph and self.device.type == "cuda"
        self.fingerprint = weights_fingerprint(model)
        self.ids_buf = torch.zeros(ids_shape, dtype=torch.long, device=self.device)
        self.pos_buf = torch.zeros((1,), dtype=torch.long, device=self.device)
        self.slots = torch.arange(max_len, device=self.device)
        self.logits_buf: torch.Tensor | None = None
        self.pos = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_error: str | None = None
        self.capture_s = 0.0
        self.history: list[Any] = []  # what fills slots [0, pos): a key per token (its id, or an image tag)
        self._fed: list[torch.Tensor] = []  # tokens stepped since the last prefill, still on the device
        self.reused = 0  # slots the last prefill did not recompute

    def _known(self) -> list[Any]:
        """`history` with the stepped tokens appended (one host read per turn, not one per token)."""
        if self._fed:
            self.history = self.history + torch.cat(self._fed).tolist()
            self._fed = []
        return self.history[: self.pos]

    def forget(self) -> None:
        """The next prefill starts from scratch (benchmarks timing a first turn; the cache is simply not matched)."""
        self.history, self._fed = [], []

    def _prefix(self, keys: Sequence[Any]) -> int:
        """How many leading slots already hold `keys`; the last token is always recomputed (its logits are needed).
        The cache counts as empty from here until `_filled` (a failing forward leaves nothing to match)."""
        n = 0
        for a, b in zip(self._known(), keys, strict=False):
            if a != b:
                break
            n += 1
        self.history, self.pos = [], 0
        return min(n, len(keys) - 1)

    def _filled(self, n: int, keys: list[Any], reused: int) -> None:
        """A prefill wrote slots [reused, n): the cache now holds `keys`."""
        self.pos, self.history, self.reused = n, keys, reused

    def _step_body(self) -> None:
        raise NotImplementedError

    def _before_step(self) -> None:
        pass

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        if self.pos >= self.max_len:
            raise ValueError(f"the static cache of {self.max_len} slots is full")
        self.ids_buf.copy_(token.view(self.ids_buf.shape))
        self.pos_buf.fill_(self.pos)
        self._before_step()
        if self.use_graph and self.graph is None and self.graph_error is None:
            self.graph, self.graph_error, self.capture_s = capture_graph(self._step_body, self.device)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step_body()
        self._fed.append(token.detach().reshape(-1)[:1].clone())
        self.pos += 1
        return self.logits_buf

    def matches(self, model: Any, needed_len: int, *, fingerprint: int | None = None) -> bool:
        """Reusable for `model` with `needed_len` tokens (same weights at the same addresses, enough slots)?"""
        fp = weights_fingerprint(model) if fingerprint is None else fingerprint
        return model is self.model and fp == self.fingerprint and needed_len <= self.max_len


class StaticDecoder(GraphStepDecoder):
    """transformers' own forward over a static KV cache; with `use_graph` each step is one CUDA-graph replay."""

    def __init__(self, model: Any, max_len: int, *, use_graph: bool) -> None:
        self._init_step(model, max_len, use_graph, (1, 1))
        self.dtype = compute_dtype(model)
        self._kw = _cache_kwarg(model)
        n_layers = model.config.get_text_config().num_hidden_layers
        self.index = _WriteIndex()
        self.cache = Cache(layers=[StaticKVLayer(max_len, self.index) for _ in range(n_layers)])

    @property
    def name(self) -> str:
        if self.graph is not None:
            return "cuda-graph"
        return "static" if self.graph_error is None else "static (graph capture failed)"

    def _mask(self, positions: torch.Tensor) -> torch.Tensor:
        """(1, 1, q, max_len) additive mask: 0 where slot <= position, dtype-min elsewhere."""
        allowed = self.slots.view(1, -1) <= positions.view(-1, 1)
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        neg = torch.full((), torch.finfo(self.dtype).min, dtype=self.dtype, device=self.device)
        return torch.where(allowed, zero, neg).view(1, 1, positions.numel(), self.max_len)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, embeds: torch.Tensor | None = None) -> torch.Tensor:
        self.index.current = positions
        inputs = {"input_ids": ids} if embeds is None else {"inputs_embeds": embeds}
        out = self.model(
            **inputs,
            position_ids=positions.view(1, -1),
            attention_mask=self._mask(positions),
            use_cache=True,
            **{self._kw: self.cache},
        )
        return out.logits[0, -1]

    @torch.no_grad()
    def prefill(
        self, ids: torch.Tensor, embeds: torch.Tensor | None = None, keys: Sequence[Any] | None = None
    ) -> torch.Tensor:
        """`embeds` (1, n, d), when given, replaces the token embeddings of `ids` (a VLM's merged image features);
        `keys` name each position's content (default: the ids; a VLM tags image positions with the image's digest).
        Only the positions after the prefix the cache already holds are computed (module docstring)."""
        n = ids.shape[1]
        if n >= self.max_len:
            raise ValueError(f"prompt of {n} tokens does not fit a static cache of {self.max_len}")
        keys = ids[0].tolist() if keys is None else list(keys)
        p = self._prefix(keys)
        positions = torch.arange(p, n, device=self.device)
        self.index.seen = p
        logits = self._forward(ids[:, p:], positions, None if embeds is None else embeds[:, p:]).float()
        self.index.seen = n
        self._filled(n, keys, p)
        return logits

    @torch.no_grad()
    def adopt(self, previous: StaticDecoder) -> None:
        """Take over `previous`'s cached prefix (same model, smaller cache): the conversation outgrew its slots."""
        known = previous._known()
        for new, old in zip(self.cache.layers, previous.cache.layers, strict=True):
            if not old.is_initialized:
                return
            b, h, _, d = old.keys.shape
            new.device, new.dtype = old.device, old.dtype
            new.keys = torch.zeros((b, h, self.max_len, d), dtype=old.dtype, device=old.device)
            new.values = torch.zeros((b, h, self.max_len, old.values.shape[-1]), dtype=old.dtype, device=old.device)
            new.keys[:, :, : len(known)] = old.keys[:, :, : len(known)]
            new.values[:, :, : len(known)] = old.values[:, :, : len(known)]
            new.is_initialized = True
        self.history, self.pos = known, len(known)

    def _step_body(self) -> None:
        logits = self._forward(self.ids_buf, self.pos_buf)
        if self.logits_buf is None:
            self.logits_buf = torch.empty(logits.shape, dtype=torch.float32, device=self.device)
        self.logits_buf.copy_(logits)

    def _before_step(self) -> None:
        self.index.current = self.pos_buf

    def step(self, token: torch.Tensor) -> torch.Tensor:
        logits = super().step(token)
        self.index.seen = self.pos
        return logits


def static_decoder(model: Any, max_len: int, previous: Any = None) -> StaticDecoder:
    """A new `StaticDecoder`, carrying over `previous`'s cached prompt when it served these very weights."""
    decoder = StaticDecoder(model, max_len, use_graph=True)
    same = isinstance(previous, StaticDecoder) and previous.model is model and previous.max_len <= max_len
    if same and previous.fingerprint == weights_fingerprint(model):
        decoder.adopt(previous)
    return decoder


def capture_graph(body: Any, device: torch.device) -> tuple[torch.cuda.CUDAGraph | None, str | None, float]:
    """Capture `body()` in a CUDA graph after two warm-up runs on a side stream -> (graph, error, seconds).

    Any capture failure is logged once and returned as the error, so the caller keeps decoding without the graph."""
    t0 = time.perf_counter()
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: lazy inits, cuBLAS workspaces, bitsandbytes buffers, Triton compiles
                body()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
    except Exception as e:  # any capture failure: keep decoding, without the graph
        error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log.warning("CUDA graph capture failed; decoding without it. Reason: %s", error)
        torch.cuda.synchronize(device)
        return None, error, 0.0
    seconds = time.perf_counter() - t0
    log.info("captured the decode step in a CUDA graph in %.2f s", seconds)
    return graph, None, seconds


def bucket_len(needed: int, limit: int, quantum: int = 512) -> int:
    """Round a cache length up to a multiple of `quantum` (so one graph serves many prompts), capped at `limit`."""
    return min(limit, -(-needed // quantum) * quantum)
