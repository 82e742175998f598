"""Conversations -> token ids and labels with the model's own chat template; packing; the batch collator.

Assistant-only loss: each assistant turn's span is found by rendering the template on the prefix before it (with
the generation prompt) and on the prefix that includes it; the characters in between (the answer and the
template's end-of-turn marker, so the model learns to stop) carry labels, everything else is -100. This needs a
template whose rendering of a prefix is a prefix of the whole (ChatML, Llama 3, Mistral, Gemma are); otherwise the
message says so and suggests loss on all tokens.

Packing concatenates examples into `max_length` blocks; attention then spans example boundaries (no
padding-free attention without FlashAttention), which is the usual trade for fewer padding tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from backends.finetune.types import DataError, DataOptions, DatasetReport

log = logging.getLogger(__name__)
IGNORE = -100


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer: Any, conv: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    text = render(tokenizer, conv)
    spans = []
    for i, turn in enumerate(conv):
        if turn["role"] != "assistant":
            continue
        before = render(tokenizer, conv[:i], generation_prompt=True)
        upto = render(tokenizer, conv[: i + 1])
        if not (upto.startswith(before) and text.startswith(upto)):
            raise DataError(
                "This model's chat template does not render a conversation prefix as a prefix of the whole, so the "
                "assistant turns cannot be located: train with loss on all tokens."
            )
        spans.append((len(before), len(upto)))
    return text, spans


def tokenize(tokenizer: Any, conv: list[dict[str, str]], loss_on: str = "assistant") -> Example:
    text, spans = assistant_spans(tokenizer, conv) if loss_on == "assistant" else (render(tokenizer, conv), [])
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if loss_on == "all":
        return Example(tuple(ids), tuple(ids))
    labels = [IGNORE] * len(ids)
    for k, (start, end) in enumerate(enc["offset_mapping"]):
        if any(a <= start < b for a, b in spans) and end > start:
            labels[k] = ids[k]
    return Example(tuple(ids), tuple(labels))


def build_examples(tokenizer: Any, convs: list[list[dict[str, str]]], opts: DataOptions, report: DatasetReport | None
                   = None) -> list[Example]:  # fmt: skip
    """Tokenize, then cut or drop examples over `opts.max_length` (counted in the report), then pack if asked."""
    out: list[Example] = []
    overlong = 0
    for conv in convs:
        ex = tokenize(tokenizer, conv, opts.loss_on)
        if len(ex.input_ids) > opts.max_length:
            overlong += 1
            if opts.overlong == "drop":
                continue
            ex = Example(ex.input_ids[: opts.max_length], ex.labels[: opts.max_length])
        if ex.trained_tokens == 0:
            continue  # an answer cut away entirely teaches nothing
        out.append(ex)
    if report is not None:
        report.overlong += overlong
        report.overlong_action = opts.overlong
        report.tokens += sum(len(e.input_ids) for e in out)
        report.max_tokens = max([report.max_tokens, *(len(e.input_ids) for e in out)])
    if not out:
        raise DataError(
            f"No example has an answer left within max length {opts.max_length}: raise the max length or cut less."
        )
    return pack(out, opts.max_length) if opts.packing else out


def pack(examples: list[Example], block: int) -> list[Example]:
    """Greedy packing in order: examples are concatenated into blocks of at most `block` tokens."""
    blocks: list[Example] = []
    ids: list[int] = []
    labels: list[int] = []
    for ex in examples:
        if ids and len(ids) + len(ex.input_ids) > block:
            blocks.append(Example(tuple(ids), tuple(labels)))
            ids, labels = [], []
        ids += ex.input_ids
        labels += ex.labels
    if ids:
        blocks.append(Example(tuple(ids), tuple(labels)))
    return blocks


def collate(examples: list[Example], pad_id: int) -> dict[str, Any]:
    """Right-padded batch: input_ids, attention_mask, labels (-100 on padding), all (B, T) int64."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_id_of(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    return int(pad if pad is not None else 0)
