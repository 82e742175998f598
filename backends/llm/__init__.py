"""Chat LLMs: the in-process transformers engine (4-bit, CUDA-graph decode, LoRA adapters) or an OpenAI-compatible
server, behind one `LLMBackend`.

Modules: backend (LLMBackend: chat streaming, engine choice, adapters), generate (prompt building, sampling, the
token stream), fastdecode (static KV cache + CUDA-graph decode step), models (finding, converting and loading
weights), adapters (PEFT adapters in place), remote (the OpenAI-compatible client), tools (tool calling: OpenAI tool
schemas in, parsed `ToolCall`s out, Hermes/Qwen, Llama 3 and Mistral formats).
"""

from backends.llm.adapters import AdapterError
from backends.llm.backend import ChatUpdate, LLMBackend, LLMConfig, check_messages, create
from backends.llm.generate import GenerationOptions, GenerationStats, PromptTooLong
from backends.llm.models import ModelNotAvailable
from backends.llm.remote import EngineError
from backends.llm.tools import ToolCall, ToolError, ToolsNotSupported, ToolStream, parse_tool_calls

__all__ = [
    "AdapterError", "ChatUpdate", "EngineError", "GenerationOptions", "GenerationStats", "LLMBackend", "LLMConfig",
    "ModelNotAvailable", "PromptTooLong", "ToolCall", "ToolError", "ToolStream", "ToolsNotSupported",
    "check_messages", "create", "parse_tool_calls",
]  # fmt: skip
