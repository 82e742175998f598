"""Prompt building (with trimming), sampling, stop strings and streaming text for the in-process engine.

Trimming policy (the prompt must leave room for `max_new_tokens` inside the context):
1. drop the oldest turns after the system prompt, one user/assistant exchange at a time;
2. if the system prompt plus the latest user message still do not fit, keep only the END of that message;
3. if the system prompt alone does not fit, refuse with a message (nothing sensible can be generated).
Each trim is reported in a note that the UI shows. Cancel is checked before every decode step, so generation
stops within one token of the flag being set.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where tensors are made, so importing this module (and the tab) stays light
    import torch


class PromptTooLong(ValueError):
    """Even after trimming, the prompt cannot fit the context."""


@dataclass(frozen=True)
class GenerationOptions:
    system_prompt: str = ""
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.95
    max_new_tokens: int = 512
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 5.0:
            raise ValueError(f"temperature={self.temperature}: use a value between 0 (greedy) and 5.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: use a value in (0, 1].")
        if not 1 <= self.max_new_tokens <= 32768:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: use 1 to 32768.")
        if not 0.5 <= self.repetition_penalty <= 3.0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty}: use 1.0 (off) up to 3.")
        if any(not s or "\x00" in s for s in self.stop):
            raise ValueError(f"stop={self.stop!r}: stop strings must be non-empty and free of null bytes.")
        if "\x00" in self.system_prompt:
            raise ValueError("The system prompt contains a null byte (\\x00); remove it.")


# Sampling defaults by model size, like LM Studio's and text-generation-webui's presets: a model under ~1B
# parameters drifts into another language or loops at temperature 0.7 (SmolLM2-135M: French gibberish in about half
# the tries even at 0.2; greedy says "Paris" every time), so it decodes greedily with a repetition penalty and a
# shorter reply; big models keep the usual creative settings.
SIZE_PRESETS = (  # (up to this many billion parameters, temperature, top_p, repetition penalty, max new tokens)
    (1.0, 0.0, 0.9, 1.1, 256),
    (4.0, 0.5, 0.9, 1.1, 512),
    (float("inf"), 0.7, 0.95, 1.05, 1024),
)


def options_for_size(params_b: float | None, **overrides: Any) -> GenerationOptions:
    """Recommended GenerationOptions for a model of `params_b` billion parameters (None: the middle preset)."""
    size = 2.0 if params_b is None else params_b
    _, temp, top_p, rep, max_new = next(p for p in SIZE_PRESETS if size <= p[0])
    values = {"temperature": temp, "top_p": top_p, "repetition_penalty": rep, "max_new_tokens": max_new}
    return GenerationOptions(**(values | overrides))


def params_from_name(name: str) -> float | None:
    """'SmolLM2-135M-Instruct' -> 0.135, 'Llama-3.1-8B' -> 8.0 (billions); None when the name does not say."""
    import re

    found = re.findall(r"(?<![\w.])(\d+(?:\.\d+)?)\s*([mMbB])(?![a-zA-Z])", name.replace("_", "-"))
    if not found:
        return None
    value, unit = found[-1]
    return float(value) / (1000 if unit in "mM" else 1)


@dataclass
class TextDelta:
    delta: str
    text: str  # everything generated so far (after stop-string cutting)
    token_id: int | None = None


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    ttft_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    total_s: float = 0.0
    finish_reason: str = ""  # "eos" | "length" | "stop_string" | "cancelled"
    decoder: str = ""
    load_s: float = 0.0  # before the first token could be computed: conversion, load, move to the GPU
    weights: str = ""  # the model's weight format ("int4", "nf4", "bfloat16", ...), shown in the Chat stats line
    reused_tokens: int = 0  # prompt tokens whose keys/values the decoder already held (the conversation so far)
    notes: list[str] = field(default_factory=list)


# ---- prompt -----------------------------------------------------------------------------------------------------
def render_ids(tokenizer: Any, messages: list[dict[str, Any]], tools: list | None = None, prefix: str = "") -> list:
    """Ids of the chat prompt; `tools` go to the template, `prefix` starts the assistant's reply (prefill)."""
    kwargs = {"tools": tools} if tools else {}
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    return tokenizer(text + prefix, add_special_tokens=False)["input_ids"]


def build_prompt(
    tokenizer: Any, messages: list[dict[str, Any]], budget: int, *, tools: list | None = None, prefix: str = ""
) -> tuple[list[int], str]:
    """Token ids of the chat prompt within `budget` tokens, and a note saying what was trimmed ('' if nothing)."""
    render = functools.partial(render_ids, tools=tools, prefix=prefix)
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system) :]
    ids = render(tokenizer, messages)
    dropped = 0
    while len(ids) > budget and len(turns) > 1:
        turns = turns[1:]
        dropped += 1
        if turns and turns[0]["role"] == "assistant" and len(turns) > 1:
            turns = turns[1:]
            dropped += 1
        ids = render(tokenizer, system + turns)
    notes = [f"Trimmed the {dropped} oldest message(s) to fit the {budget}-token prompt budget."] if dropped else []
    if len(ids) > budget:
        ids, kept = _trim_latest(tokenizer, system, turns[-1], budget, render)
        notes.append(f"Your message was too long: kept only its last {kept} tokens.")
    return ids, " ".join(notes)


def _trim_latest(tokenizer: Any, system: list, latest: dict, budget: int, render: Any) -> tuple[list[int], int]:
    overhead = len(render(tokenizer, [*system, {**latest, "content": ""}]))
    if overhead >= budget:
        raise PromptTooLong(
            f"The system prompt alone takes {overhead} tokens, more than the {budget}-token budget: "
            "shorten it, or lower max new tokens."
        )
    content_ids = tokenizer(latest["content"], add_special_tokens=False)["input_ids"]
    keep = budget - overhead
    while keep > 0:
        tail = tokenizer.decode(content_ids[-keep:], skip_special_tokens=True)
        ids = render(tokenizer, [*system, {**latest, "content": tail}])
        if len(ids) <= budget:
            return ids, keep
        keep -= max(1, len(ids) - budget)
    raise PromptTooLong(f"Could not fit the message into {budget} tokens.")


# ---- sampling -----------------------------------------------------------------------------------------------------
def pick_token(
    logits: torch.Tensor, history: torch.Tensor, opts: GenerationOptions, gen: torch.Generator | None
) -> torch.Tensor:
    """Next token id as a (1,) device tensor; `history` (1, n) holds prompt + generated ids (for the penalty)."""
    import torch

    scores = logits.view(1, -1)  # (1, V) float32
    if opts.repetition_penalty != 1.0:
        seen = scores.gather(1, history)
        seen = torch.where(seen < 0, seen * opts.repetition_penalty, seen / opts.repetition_penalty)
        scores = scores.scatter(1, history, seen)
    if opts.temperature == 0.0:
        return scores.argmax(dim=-1)
    scores = scores / opts.temperature
    if opts.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_scores.softmax(dim=-1) >= opts.top_p  # keep the smallest set reaching top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(1, order, sorted_scores)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=gen).view(1)


# ---- text ---------------------------------------------------------------------------------------------------------
class StopTextTracker:
    """Incremental detokenisation with stop strings: emits only text that cannot turn into a stop string."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.emitted = 0
        self.text = ""
        self.stopped = False

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        for s in self.stop:
            at = text.find(s, max(0, self.emitted - len(s)))
            if at >= 0:
                text, self.stopped = text[:at], True
        self.text = text
        safe = len(text) if self.stopped else len(text) - self._held_back(text)
        delta = text[self.emitted : safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return delta

    def _held_back(self, text: str) -> int:
        for k in range(max((len(s) for s in self.stop), default=1) - 1, 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stop):
                return k
        return 0

    def flush(self) -> str:
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta


def stream_tokens(
    decoder: Any,
    tokenizer: Any,
    prompt_ids: list[int],
    opts: GenerationOptions,
    *,
    eos_ids: set[int],
    cancel: threading.Event | None = None,
    stats: GenerationStats | None = None,
) -> Iterator[TextDelta]:
    """Generate with `decoder`; on CUDA the next step is launched before the host reads the current token."""
    import torch

    stats = stats if stats is not None else GenerationStats()
    device = decoder.device
    t0 = time.perf_counter()
    history = torch.zeros((1, len(prompt_ids) + opts.max_new_tokens), dtype=torch.long, device=device)
    history[0, : len(prompt_ids)] = torch.tensor(prompt_ids, dtype=torch.long)
    gen = None
    if opts.seed is not None and opts.temperature > 0:
        gen = torch.Generator(device=device).manual_seed(opts.seed)
    overlap = device.type == "cuda"
    tracker = StopTextTracker(tokenizer, opts.stop)
    stats.prompt_tokens, stats.finish_reason = len(prompt_ids), "length"
    n = len(prompt_ids)
    logits = decoder.prefill(history[:, :n])
    stats.reused_tokens = int(getattr(decoder, "reused", 0))  # the static decoders' prompt reuse
    t_first = None
    for i in range(opts.max_new_tokens):
        tok = pick_token(logits, history[:, :n], opts, gen)
        history[:, n : n + 1] = tok.view(1, 1)
        n += 1
        more = i + 1 < opts.max_new_tokens and not (cancel is not None and cancel.is_set())
        if overlap and more:
            logits = decoder.step(tok)  # queued on the GPU; the host reads `tok` meanwhile
        token_id = int(tok)
        t_first = t_first or time.perf_counter()
        stats.new_tokens = i + 1
        if token_id in eos_ids:
            stats.finish_reason = "eos"
            break
        delta = tracker.add(token_id)
        if delta:
            yield TextDelta(delta, tracker.text, token_id)
        if tracker.stopped:
            stats.finish_reason = "stop_string"
            break
        if cancel is not None and cancel.is_set():
            stats.finish_reason = "cancelled"
            break
        if not overlap and more:
            logits = decoder.step(tok)
    rest = tracker.flush()
    if rest:
        yield TextDelta(rest, tracker.text)
    t_end = time.perf_counter()
    stats.ttft_s = (t_first or t_end) - t0
    stats.total_s = t_end - t0
    if stats.new_tokens > 1 and t_first is not None and t_end > t_first:
        stats.decode_tokens_per_s = (stats.new_tokens - 1) / (t_end - t_first)
    stats.decoder = getattr(decoder, "name", type(decoder).__name__)
