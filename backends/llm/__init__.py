"""Chat LLMs: the in-process transformers engine (4-bit, CUDA-graph decode, LoRA adapters) or an OpenAI-compatible
server, behind one `LLMBackend`.

Modules: backend (LLMBackend: chat streaming, engine choice, adapters), generate (prompt building, sampling, the
token stream), fastdecode (static KV cache + CUDA-graph decode step), models (finding, converting and loading
weights), adapters (PEFT adapters in place), remote (the OpenAI-compatible client).
"""

from backends.llm.adapters import AdapterError
from backends.llm.backend import ChatUpdate, LLMBackend, LLMConfig, create
from backends.llm.generate import GenerationOptions, GenerationStats, PromptTooLong
from backends.llm.models import ModelNotAvailable
from backends.llm.remote import EngineError

__all__ = [
    "AdapterError", "ChatUpdate", "EngineError", "GenerationOptions", "GenerationStats", "LLMBackend", "LLMConfig",
    "ModelNotAvailable", "PromptTooLong", "create",
]  # fmt: skip
