"""The causal-LM loss without full-vocabulary logits.

`chunked_cross_entropy` takes the final hidden states (B, T, H), keeps only the positions that carry a label, and
applies the output head to `chunk` of them at a time inside an activation checkpoint: the (chunk, V) fp32 logits
exist for one chunk in the forward and are recomputed for that chunk in the backward, so peak memory is one chunk's
logits and their gradient, not (T, V). At Llama-3's V = 128,256 a 24k-token sequence would otherwise need 12 GB of
fp32 logits. The result equals `F.cross_entropy(full_logits, labels, ignore_index=-100)` (mean over labelled tokens).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def _chunk_loss_sum(h: torch.Tensor, y: torch.Tensor, head: Any, softcap: float | None) -> torch.Tensor:
    logits = head(h).float()  # (chunk, V)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, y, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor, head: Any, labels: torch.Tensor, *, chunk: int = 1024, softcap: float | None = None
) -> tuple[torch.Tensor, int]:
    """(mean loss over labelled next tokens, number of labelled tokens). hidden (B, T, H), labels (B, T)."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B*(T-1), H): position t predicts token t+1
    y = labels[:, 1:].reshape(-1).to(hidden.device)
    keep = y != IGNORE
    n = int(keep.sum())
    if n == 0:
        return hidden.sum() * 0.0, 0
    h, y = h[keep], y[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, n, chunk):
        part = (h[i : i + chunk], y[i : i + chunk])
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss_sum, *part, head, softcap, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(*part, head, softcap)
    return total / n, n


def causal_lm(model: Any) -> Any:
    """The transformers *ForCausalLM inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def chunk_for(vocab: int) -> int:
    """Tokens per loss chunk: about 64M logits (256 MB in fp32) at a time."""
    return max(128, (1 << 26) // max(1, vocab))


def lm_loss(model: Any, batch: dict[str, torch.Tensor], *, chunked: bool = True, chunk: int = 0) -> tuple[Any, int]:
    """Next-token loss of a causal LM on a batch (input_ids, attention_mask, labels): (loss, labelled tokens)."""
    from backends.finetune.memory import compute_device

    lm = causal_lm(model)
    device = compute_device(lm)
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    labels = batch["labels"].to(device)
    if not chunked:
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        y = labels[:, 1:].reshape(-1)
        n = int((y != IGNORE).sum())
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), y, ignore_index=IGNORE)
        return loss, n
    decoder = getattr(lm, lm.base_model_prefix)
    hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    head = lm.get_output_embeddings()
    chunk = chunk or chunk_for(head.weight.shape[0])
    return chunked_cross_entropy(hidden, head, labels, chunk=chunk, softcap=softcap)
