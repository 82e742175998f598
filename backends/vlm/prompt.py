"""Processor inputs for a conversation with images, trimmed to the context (no torch at import)."""

from __future__ import annotations

from typing import Any

from backends.vlm.types import ImageOptions, PreparedImage, VLMError

# Processor keyword arguments through which the user's image setting reaches dynamic-resolution models.
_PATCH_AREA = {"qwen2_5_vl": 28 * 28, "qwen2_vl": 28 * 28, "qwen3_vl": 32 * 32}


def processor_kwargs(model_type: str, opts: ImageOptions, processor: Any = None) -> dict[str, Any]:
    if model_type in _PATCH_AREA and opts.max_tokens:
        area = opts.max_tokens * _PATCH_AREA[model_type]  # Qwen's size is in pixels of area: {shortest, longest}
        size = dict(getattr(getattr(processor, "image_processor", None), "size", None) or {})
        return {"size": {"shortest_edge": min(size.get("shortest_edge", area), area), "longest_edge": area}}
    if model_type in ("smolvlm", "idefics3"):
        return {"size": {"longest_edge": opts.max_side}}
    return {}


def to_processor_messages(messages: list[dict[str, Any]], prepared: list[list[PreparedImage]]) -> list[dict]:
    out = []
    for m, imgs in zip(messages, prepared, strict=True):
        content: list[dict[str, Any]] = [{"type": "image", "image": p.image} for p in imgs]
        content.append({"type": "text", "text": m.get("content", "")})
        out.append({"role": m["role"], "content": content})
    return out


def render(processor: Any, messages: list[dict], prepared: list[list[PreparedImage]], kw: dict) -> dict:
    import inspect

    if kw and "processor_kwargs" in inspect.signature(processor.apply_chat_template).parameters:
        kw = {"processor_kwargs": kw}  # transformers >= 5.2x; earlier releases take them as plain kwargs
    return processor.apply_chat_template(to_processor_messages(messages, prepared), add_generation_prompt=True,
                                         tokenize=True, return_dict=True, return_tensors="pt", **kw)  # fmt: skip


def build_inputs(
    processor: Any, messages: list[dict], prepared: list[list[PreparedImage]], opts: ImageOptions, *, budget: int,
    model_type: str = "",
) -> tuple[dict, list[str], int]:  # fmt: skip
    """(processor outputs, image digests in prompt order, messages dropped) with the prompt within `budget`."""
    kw = processor_kwargs(model_type, opts, processor)
    system = 1 if messages and messages[0]["role"] == "system" else 0
    dropped = 0
    while True:
        inputs = dict(render(processor, messages, prepared, kw))
        n = int(inputs["input_ids"].shape[1])
        if n <= budget:
            break
        turns = len(messages) - system
        if turns <= 1:
            n_img = sum(len(p) for p in prepared)
            raise VLMError(
                f"The prompt needs {n} tokens ({n_img} image(s) included) but only {budget} fit with the max new "
                "tokens setting: lower the image max side, send fewer images, or raise the context length."
            )
        k = 2 if turns > 2 and messages[system + 1]["role"] == "assistant" else 1
        messages = messages[:system] + messages[system + k :]
        prepared = prepared[:system] + prepared[system + k :]
        dropped += k
    digests = [p.digest for imgs in prepared for p in imgs]
    return inputs, digests, dropped
