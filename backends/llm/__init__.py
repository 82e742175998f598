"""Chat LLMs: the in-process transformers engine (4-bit, CUDA-graph decode, LoRA adapters) or an OpenAI-compatible
server, behind one `LLMBackend`.

Modules: backend (LLMBackend: chat streaming, engine choice, the generation slot, decoders), types (LLMConfig,
ChatUpdate, check_messages), loader (the residency Loader, KV-cache bytes), chat_adapters (the backend's adapter
API), generate (prompt building, sampling, the token stream), fastdecode (static KV cache + CUDA-graph decode step),
models (finding, converting and loading weights), int4 (int4 weights on torch's tinygemm kernel, quantised while
loading), int4_prefill (prompts through bf16 cuBLAS), compact + kernels (the fused int4 decode step: own Llama
forward, Triton glue, one CUDA graph), adapters (PEFT adapters in place), remote (the OpenAI-compatible client and
the hosts it may reach), tools (tool calling: OpenAI tool schemas in, parsed `ToolCall`s out, Hermes/Qwen, Llama 3
and Mistral formats).
"""

from typing import Any

from backends.llm.adapters import (
    AdapterError,
    AdapterState,
    activate,
    check_adapter_folder,
    delete_from,
    load_into,
    loaded_adapters,
)
from backends.llm.backend import LLMBackend, create
from backends.llm.generate import GenerationOptions, GenerationStats, PromptTooLong, StopTextTracker, stream_tokens
from backends.llm.loader import eos_ids, kv_cache_bytes
from backends.llm.models import (
    ModelNotAvailable,
    ModelSource,
    check_model_folder,
    ensure_converted,
    load_causal_lm,
    load_tokenizer,
    resolve_source,
)
from backends.llm.remote import EngineError
from backends.llm.tools import ToolCall, ToolError, ToolsNotSupported, ToolStream, parse_tool_calls
from backends.llm.types import ChatUpdate, LLMConfig, check_messages

__all__ = [  # the last group: building blocks the VLM package reuses (decoders, token stream, adapters in place)
    "AdapterError",
    "AdapterState",
    "ChatUpdate",
    "EngineError",
    "GenerationOptions",
    "GenerationStats",
    "LLMBackend",
    "LLMConfig",
    "ModelNotAvailable",
    "ModelSource",
    "PromptTooLong",
    "StopTextTracker",
    "ToolCall",
    "ToolError",
    "ToolStream",
    "ToolsNotSupported",
    "activate",
    "check_adapter_folder",
    "check_messages",
    "check_model_folder",
    "create",
    "decoder_for",
    "delete_from",
    "ensure_converted",
    "eos_ids",
    "kv_cache_bytes",
    "load_causal_lm",
    "load_into",
    "load_tokenizer",
    "loaded_adapters",
    "parse_tool_calls",
    "resolve_source",
    "stream_tokens",
]  # fmt: skip


def decoder_for(model: Any, needed: int, limit: int, *, fast: bool, previous: Any = None) -> Any:
    """Chat's decoder for a loaded model: on CUDA with `fast` a static KV cache with the decode step in a CUDA graph
    (`previous` is reused when it still fits the same weights), else the eager dynamic-cache one. Imports torch."""
    from backends.llm.fastdecode import EagerDecoder, bucket_len, model_device, static_decoder

    if model_device(model).type != "cuda" or not fast:
        return EagerDecoder(model)
    if previous is not None and getattr(previous, "matches", None) and previous.matches(model, needed):
        return previous
    return static_decoder(model, bucket_len(needed, limit), previous)
