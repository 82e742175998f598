"""Image features (cached per image), merged prompt embeddings, and the two generation paths.

Feature path (LLaVA family): the processor expands each image into its placeholder tokens; the vision tower and
projector run once per image (`FeatureCache`, keyed by model, adapter version, image digest and pixel shape, kept
on the CPU), the features are scattered into the token embeddings at the placeholder positions, and the language
model is prefilled with those embeddings by the Chat tab's decoders (backends/llm/fastdecode.py): on CUDA a static
KV cache with the decode step captured in a CUDA graph, on the CPU a dynamic cache. Later turns re-use every image
already seen, so only new images reach the vision tower.

Plain path (every other architecture, and the baseline): the processor's pixels go to `model.generate` each turn
(the model re-encodes every image in the history); tokens stream through a queue from a worker thread and a
stopping criterion reads the cancel flag.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch

from backends.vlm.types import VLMError, VLMStats

log = logging.getLogger(__name__)


def image_token_id(model: Any) -> int:
    cfg = model.config
    tid = getattr(cfg, "image_token_id", None)
    return int(tid if tid is not None else cfg.image_token_index)


class FeatureCache:
    """Projected image features per (model key, adapter version, digest, pixel shape), bounded in bytes (LRU)."""

    def __init__(self, max_bytes: int = 512 * 2**20) -> None:
        self._items: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.max_bytes = max_bytes
        self.hits = self.misses = 0

    def get(self, key: tuple) -> torch.Tensor | None:
        with self._lock:
            t = self._items.get(key)
            if t is not None:
                self._items.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
            return t

    def put(self, key: tuple, features: torch.Tensor) -> None:
        with self._lock:
            self._items[key] = features
            while len(self._items) > 1 and sum(t.numel() * t.element_size() for t in self._items.values()) > (
                self.max_bytes
            ):
                self._items.popitem(last=False)

    def drop_model(self, model_key: str) -> None:
        with self._lock:
            for k in [k for k in self._items if k[0] == model_key]:
                del self._items[k]

    def __len__(self) -> int:
        return len(self._items)


def _flat(features: Any) -> torch.Tensor:
    """get_image_features' result in any transformers release -> (tokens, d)."""
    feats = getattr(features, "pooler_output", features)
    if isinstance(feats, list | tuple):
        return torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
    return feats.reshape(-1, feats.shape[-1])


@torch.no_grad()
def encode_image(model: Any, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None) -> torch.Tensor:
    """Vision tower + projector for ONE image: (tokens, d) in the language model's dtype."""
    cfg = model.config
    kw: dict[str, Any] = {}
    for name in ("vision_feature_layer", "vision_feature_select_strategy"):
        if getattr(cfg, name, None) is not None:
            kw[name] = getattr(cfg, name)
    if image_sizes is not None:
        kw["image_sizes"] = image_sizes
    tower_dtype = next(model.model.vision_tower.parameters()).dtype
    device = model.get_input_embeddings().weight.device
    return _flat(model.get_image_features(pixel_values=pixel_values.to(device, tower_dtype), **kw))


def merged_embeddings(
    model: Any, inputs: dict, digests: list[str], cache: FeatureCache, cache_key: tuple, stats: VLMStats
) -> torch.Tensor:
    """Token embeddings of `inputs["input_ids"]` with each image's (cached) features at its placeholders."""
    ids = inputs["input_ids"]
    embed = model.get_input_embeddings()
    device, dtype = embed.weight.device, embed.weight.dtype
    pixels, sizes = inputs.get("pixel_values"), inputs.get("image_sizes")
    feats = []
    for i, digest in enumerate(digests):
        key = (*cache_key, digest, tuple(pixels[i].shape))
        f = cache.get(key)
        if f is None:
            f = encode_image(model, pixels[i : i + 1], None if sizes is None else sizes[i : i + 1]).to("cpu")
            cache.put(key, f)
            stats.images_encoded += 1
        feats.append(f)
    embeds = embed(ids.to(device))  # (1, T, d)
    mask = ids.to(device) == image_token_id(model)
    n_slots = int(mask.sum())
    if feats:
        merged = torch.cat(feats).to(device, dtype)
        if merged.shape[0] != n_slots:
            raise VLMError(
                f"The prompt has {n_slots} image-token slots but the images gave {merged.shape[0]} features: "
                "the processor and the model disagree (a mismatched processor folder?)."
            )
        embeds = embeds.masked_scatter(mask.unsqueeze(-1), merged)
    stats.image_tokens = n_slots
    return embeds


def position_keys(ids: list[int], image_id: int, digests: list[str]) -> list:
    """A key per prompt position for the decoder's prompt reuse: the token id, or (image digest, n) for the n-th
    placeholder of an image, so a cached prefix is reused only where the same images sit at the same places."""
    n_image = sum(1 for t in ids if t == image_id)
    per = n_image // len(digests) if digests and n_image % len(digests) == 0 else 0
    if n_image and not per:  # unknown layout: keys equal to nothing, so nothing after the first image is reused
        return [object() if t == image_id else t for t in ids]
    keys, seen = [], 0
    for t in ids:
        if t == image_id:
            keys.append((digests[seen // per], seen % per))
            seen += 1
        else:
            keys.append(t)
    return keys


class EmbedsPrefill:
    """A decoder whose prefill uses precomputed embeddings, so backends.llm.stream_tokens drives it unchanged."""

    def __init__(self, decoder: Any, embeds: torch.Tensor, keys: list | None = None) -> None:
        self.decoder, self.embeds, self.keys = decoder, embeds, keys
        self.device = decoder.device

    @property
    def name(self) -> str:
        return getattr(self.decoder, "name", type(self.decoder).__name__)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        embeds, self.embeds = self.embeds, None  # freed after use
        return self.decoder.prefill(ids, embeds=embeds, keys=self.keys)

    @property
    def reused(self) -> int:
        return getattr(self.decoder, "reused", 0)

    def forget(self) -> None:
        getattr(self.decoder, "forget", lambda: None)()

    def step(self, token: torch.Tensor) -> torch.Tensor:
        return self.decoder.step(token)


# ---- plain path: model.generate in a worker thread ------------------------------------------------------------------
class _QueueStreamer:
    """transformers streamer: the first `put` is the prompt (skipped), then one token id per call."""

    def __init__(self) -> None:
        self.q: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for t in value.reshape(-1).tolist():
            self.q.put(int(t))

    def end(self) -> None:
        self.q.put(None)


def generate_stream(
    model: Any, tokenizer: Any, inputs: dict, opts: Any, *, eos_ids: set[int], cancel: threading.Event | None,
    stats: VLMStats,
) -> Iterator[tuple[str, str]]:  # fmt: skip
    """Plain `model.generate` (pixels included) streamed as (delta, text); stops within one token of `cancel`."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    from backends.llm import StopTextTracker

    stop_now = threading.Event()

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            return bool(stop_now.is_set() or (cancel is not None and cancel.is_set()))

    streamer, errors = _QueueStreamer(), []
    device = model.get_input_embeddings().weight.device
    kw = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in inputs.items()}
    gen = dict(max_new_tokens=opts.max_new_tokens, do_sample=opts.temperature > 0, streamer=streamer,
               stopping_criteria=StoppingCriteriaList([_Stop()]), repetition_penalty=opts.repetition_penalty,
               pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids or {0}))  # fmt: skip
    if opts.temperature > 0:
        gen.update(temperature=opts.temperature, top_p=opts.top_p)
        if opts.seed is not None:
            torch.manual_seed(opts.seed)

    def work() -> None:
        try:
            with torch.no_grad():
                model.generate(**kw, **gen)
        except Exception as e:  # reported in the caller's thread
            errors.append(e)
        finally:
            streamer.end()

    t0 = time.perf_counter()
    worker = threading.Thread(target=work, name="vlm-generate", daemon=True)
    worker.start()
    tracker, t_first = StopTextTracker(tokenizer, opts.stop), None
    stats.finish_reason = "length"
    try:
        while (tok := streamer.q.get()) is not None:
            t_first = t_first or time.perf_counter()
            stats.new_tokens += 1
            if tok in eos_ids:
                stats.finish_reason = "eos"
                continue
            delta = tracker.add(tok)
            if delta:
                yield delta, tracker.text
            if tracker.stopped:
                stats.finish_reason = "stop_string"
                stop_now.set()
            if cancel is not None and cancel.is_set():
                stats.finish_reason = "cancelled"
    finally:
        stop_now.set()  # a closed browser tab (GeneratorExit) ends the worker too
        worker.join()
    if errors:
        raise errors[0]
    rest = tracker.flush()
    if rest:
        yield rest, tracker.text
    t_end = time.perf_counter()
    stats.ttft_s, stats.total_s, stats.decoder = (t_first or t_end) - t0, t_end - t0, "plain generate"
    if stats.new_tokens > 1 and t_first is not None and t_end > t_first:
        stats.decode_tokens_per_s = (stats.new_tokens - 1) / (t_end - t_first)


# ---- the reply ----------------------------------------------------------------------------------------------------
def get_decoder(backend: Any, key: str, model: Any, needed: int, limit: int, fast: bool) -> Any:
    """The Chat tab's decoders (backends.llm.decoder_for); the static one is kept for the next turn."""
    from backends.llm import decoder_for

    version = backend.adapters[key].version if key in backend.adapters else 0
    previous = backend._decoder if backend._decoder_key == (key, version) else None
    if previous is None:
        backend._decoder = None  # free the old cache and graph before building the new one
    decoder = decoder_for(model, needed, limit, fast=fast, previous=previous)
    if getattr(decoder, "matches", None):
        backend._decoder, backend._decoder_key = decoder, (key, version)
    return decoder


def stream_reply(
    backend: Any, key: str, model: Any, processor: Any, inputs: dict, digests: list[str], opts: Any,
    stats: VLMStats, cancel: threading.Event | None, *, feature_cache: bool, fast: bool, cache_key: tuple, limit: int,
) -> Iterator[tuple[str, str]]:  # fmt: skip
    """(delta, text) pieces of the reply, through the feature path or plain `generate` (module docstring)."""
    from backends.llm import GenerationStats, eos_ids, stream_tokens

    tok = getattr(processor, "tokenizer", processor)
    eos = eos_ids(tok, model)
    ids = inputs["input_ids"]
    stats.prompt_tokens = int(ids.shape[1])
    if not feature_cache:
        stats.images_encoded = len(digests)
        mask = ids == image_token_id(model) if hasattr(model.config, "image_token_id") else None
        stats.image_tokens = int(mask.sum()) if mask is not None else 0
        yield from generate_stream(model, tok, inputs, opts, eos_ids=eos, cancel=cancel, stats=stats)
        return
    try:
        embeds = merged_embeddings(model, inputs, digests, backend.features, cache_key, stats)
        decoder = get_decoder(backend, key, model, stats.prompt_tokens + opts.max_new_tokens, limit, fast)
        gstats = GenerationStats()
        prompt = ids[0].tolist()
        keys = position_keys(prompt, image_token_id(model), digests)
        for piece in stream_tokens(EmbedsPrefill(decoder, embeds, keys), tok, prompt, opts, eos_ids=eos,
                                   cancel=cancel, stats=gstats):  # fmt: skip
            yield piece.delta, piece.text
    except torch.cuda.OutOfMemoryError:
        raise VLMError(
            f"Out of GPU memory ({stats.prompt_tokens} prompt tokens, {stats.image_tokens} of them image tokens): "
            "lower the image max side or max new tokens, or free the GPU in the GPU tab."
        ) from None
    for name in ("new_tokens", "ttft_s", "decode_tokens_per_s", "total_s", "finish_reason", "decoder"):
        setattr(stats, name, getattr(gstats, name))
