"""What the chat backend takes and gives (torch-free): the engine configuration, the streamed `ChatUpdate`, and the
check every conversation passes before it reaches a model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from backends.llm.generate import GenerationStats
from backends.llm.remote import OpenAIEngineConfig
from backends.llm.tools import ToolCall

ENGINES = ("transformers", "openai")
ROLES = ("system", "user", "assistant", "tool")
PRECISIONS = ("auto", "int4", "nf4", "16bit")


class GenerationBusy(TimeoutError):
    """Another reply held the one in-process generation slot for too long: an expected wait that ran out (the chat
    tab shows it in one log line; the API answers 503), not a failure of the studio."""


@dataclass(frozen=True)
class LLMConfig:
    engine: str = "transformers"  # or "openai": any OpenAI-compatible server
    model_id: str = "smollm2-135m"  # catalog id or a folder name under models_dir
    base_url: str = ""  # engine "openai": e.g. http://127.0.0.1:11434/v1
    api_model: str = ""  # engine "openai": the server's model name
    api_key: str = field(default="", repr=False)
    max_context_tokens: int = 4096  # also bounds the KV cache, so a long chat can never run out of memory
    fast_decode: bool = True  # CUDA-graph decoding on GPU (falls back by itself when capture fails)
    precision: str = "auto"  # "auto": int4 (sm80+, Llama) or nf4 above ~3B params on CUDA; or force one of PRECISIONS

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine={self.engine!r}: choose one of {ENGINES}.")
        if self.engine == "openai":
            OpenAIEngineConfig(self.base_url, self.api_model, self.api_key)  # validates, with a clear message
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}: choose one of {PRECISIONS}.")
        if not 256 <= self.max_context_tokens <= 131072:
            raise ValueError(f"max_context_tokens={self.max_context_tokens}: use 256 to 131072.")


@dataclass
class ChatUpdate:
    text: str  # the whole reply so far
    delta: str = ""
    note: str = ""  # e.g. what was trimmed; shown by the UI
    done: bool = False
    stats: GenerationStats | None = None
    tool_calls: tuple[ToolCall, ...] = ()  # on the last update, when the model called tools


def check_messages(messages: list[dict[str, Any]], *, continuing: bool = False) -> None:
    """Refuse malformed conversations with a message that names the bad value.

    Besides system/user/assistant text turns, an assistant turn may carry `tool_calls` (content then may be None)
    and a `tool` turn gives a call's result; the conversation ends with the user or a tool result, or with
    `continuing`, with the assistant's unfinished reply, to be continued."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("No messages: type a message first.")
    for i, m in enumerate(messages):
        calls = isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("tool_calls"), list)
        content_ok = isinstance(m, dict) and (isinstance(m.get("content"), str) or (calls and m["content"] is None))
        if not isinstance(m, dict) or m.get("role") not in ROLES or not content_ok:
            raise ValueError(f"Message {i} is malformed ({m!r}): expected {{'role': one of {ROLES}, 'content': str}}.")
        if "\x00" in (m["content"] or ""):
            raise ValueError(f"Message {i} contains a null byte (\\x00); remove it and send again.")
    if continuing:
        if messages[-1]["role"] != "assistant" or not isinstance(messages[-1]["content"], str) or len(messages) < 2:
            raise ValueError("Nothing to continue: the last message is not a reply from the assistant.")
        return
    if messages[-1]["role"] not in ("user", "tool"):
        raise ValueError("The last message must be from the user (or a tool result).")
    if messages[-1]["role"] == "user" and not messages[-1]["content"].strip():
        raise ValueError("The message is empty: type something to send.")
