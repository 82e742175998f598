"""Before/after evaluation on the dev set: loss, perplexity, greedy answers for fixed prompts, and exact match /
ROUGE-L against the reference answers when those are short.

"Base" is the PeftModel with its adapter disabled (`disable_adapter()`), so base and adapter are the same object
and the same weights apart from LoRA. Loss is the token-weighted mean over the dev examples' labelled tokens (no
logits are kept: the chunked loss), so evaluating never runs out of memory on accumulated logits.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Any

import torch

from backends.finetune.format import Example, collate, render
from backends.finetune.loss import lm_loss

SHORT_REFERENCE_WORDS = 32


@torch.no_grad()
def dev_loss(model: Any, examples: list[Example], pad_id: int, *, batch_size: int = 4, amp: str | None = None) -> dict:
    """{"loss", "perplexity", "tokens"} over `examples` (empty dict when there are none)."""
    if not examples:
        return {}
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    device = next(model.parameters()).device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp or "")
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], pad_id)
        ctx = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with ctx:
            loss, k = lm_loss(model, batch, chunked=True)
        total += float(loss) * k
        n += k
    model.train(was_training)
    mean = total / max(1, n)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": n}


@torch.no_grad()
def answers(model: Any, tokenizer: Any, prompts: list[list[dict[str, str]]], max_new_tokens: int = 48) -> list[str]:
    """Greedy answers, one prompt (a conversation ending in a user turn) at a time."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for conv in prompts:
        ids = tokenizer(render(tokenizer, conv, generation_prompt=True), add_special_tokens=False,
                        return_tensors="pt").input_ids.to(device)  # fmt: skip
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)  # fmt: skip
        out.append(tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).strip())
    model.train(was_training)
    return out


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def exact_match(pred: str, ref: str) -> bool:
    return _words(pred) == _words(ref)


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 over lower-cased words (longest common subsequence)."""
    a, b = _words(pred), _words(ref)
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[-1]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def split_prompt(conv: list[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    """The conversation up to its last assistant turn, and that turn's text (the reference)."""
    last = max(i for i, t in enumerate(conv) if t["role"] == "assistant")
    return conv[:last], conv[last]["content"]


def score(preds: list[str], refs: list[str]) -> dict[str, float] | None:
    """Exact match and ROUGE-L when the references are short (median <= 32 words), else None."""
    lengths = sorted(len(_words(r)) for r in refs)
    if not refs or lengths[len(lengths) // 2] > SHORT_REFERENCE_WORDS:
        return None
    return {
        "exact_match": sum(exact_match(p, r) for p, r in zip(preds, refs, strict=True)) / len(refs),
        "rouge_l": sum(rouge_l(p, r) for p, r in zip(preds, refs, strict=True)) / len(refs),
    }


def base_disabled(model: Any) -> contextlib.AbstractContextManager:
    """The base model's behaviour: the adapter switched off (a plain model is its own base)."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
