"""Client for any OpenAI-compatible chat-completions server (Ollama, llama.cpp server, vLLM, ...), streaming over SSE.

The request is `POST {base_url}/chat/completions` with `"stream": true`; the server answers `data: {json}` lines
whose `choices[0].delta.content` carry the text, ending with `data: [DONE]`. Cancel closes the connection, which
every one of these servers treats as "stop generating".
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import httpx

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The remote engine could not be reached or answered with an error; the message says which and why."""


@dataclass(frozen=True)
class OpenAIEngineConfig:
    base_url: str
    model: str
    api_key: str = ""
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        url = urlparse(self.base_url)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise ValueError(
                f"base_url={self.base_url!r}: give the server's address, e.g. http://127.0.0.1:11434/v1 (Ollama) "
                "or http://127.0.0.1:8000/v1 (vLLM)."
            )
        if not self.model.strip():
            raise ValueError("model is empty: give the model name the server knows (e.g. llama3.1:8b).")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s={self.timeout_s}: must be positive.")

    def __repr__(self) -> str:  # never print the key
        return f"OpenAIEngineConfig(base_url={self.base_url!r}, model={self.model!r})"


class OpenAIChatClient:
    def __init__(self, config: OpenAIEngineConfig) -> None:
        self.config = config

    def _request(self, messages: list[dict[str, str]], opts: Any, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.config.model,
            "messages": messages,
            "stream": stream,
            "temperature": opts.temperature,
            "top_p": opts.top_p,
            "max_tokens": opts.max_new_tokens,
        }
        if opts.stop:
            body["stop"] = list(opts.stop)
        if opts.repetition_penalty != 1.0:
            body["repetition_penalty"] = opts.repetition_penalty  # vLLM / llama.cpp extension
        if opts.seed is not None:
            body["seed"] = opts.seed
        return body

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        return headers

    def stream(
        self, messages: list[dict[str, str]], opts: Any, cancel: threading.Event | None = None
    ) -> Iterator[tuple[str, str | None]]:
        """Yield (text delta, finish_reason or None) as the server streams them."""
        url = self.config.base_url.rstrip("/") + "/chat/completions"
        timeout = httpx.Timeout(self.config.timeout_s, connect=10.0)
        try:
            with (
                httpx.Client(timeout=timeout) as client,
                client.stream("POST", url, json=self._request(messages, opts, True), headers=self._headers()) as r,
            ):
                if r.status_code != 200:
                    detail = r.read().decode("utf-8", "replace")[:300]
                    raise EngineError(f"{url} answered HTTP {r.status_code}: {detail}")
                for line in r.iter_lines():
                    if cancel is not None and cancel.is_set():
                        yield "", "cancelled"
                        return
                    parsed = _parse_sse_line(line)
                    if parsed is None:
                        continue
                    if parsed == "[DONE]":
                        return
                    yield parsed
        except httpx.ConnectError as e:
            raise EngineError(
                f"Cannot reach {self.config.base_url} ({e}). Is the server running? Check the base URL."
            ) from None
        except httpx.TimeoutException:
            raise EngineError(f"{self.config.base_url} did not answer within {self.config.timeout_s:.0f} s.") from None


def _parse_sse_line(line: str) -> tuple[str, str | None] | str | None:
    if not line.startswith("data:"):
        return None  # comments (":"), "event:", blank keep-alive lines
    payload = line[5:].strip()
    if payload == "[DONE]":
        return "[DONE]"
    try:
        data = json.loads(payload)
    except json.JSONDecodeError:
        raise EngineError(f"The server sent a malformed event: {payload[:120]!r}") from None
    if "error" in data:
        raise EngineError(f"The server reported an error: {data['error']}")
    choices = data.get("choices") or []
    if not choices:
        return None
    choice = choices[0]
    delta = (choice.get("delta") or {}).get("content") or ""
    return delta, choice.get("finish_reason")
