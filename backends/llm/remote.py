"""Client for any OpenAI-compatible chat-completions server (Ollama, llama.cpp server, vLLM, ...), through the
official `openai` client, streaming.

Token counts come from the server's `usage` (asked for with `stream_options.include_usage`); a server that sends
none is counted in chunks and says so. Cancel closes the stream, which every one of these servers treats as "stop
generating".
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

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


def check_remote_host(s: Any, base_url: str) -> None:
    """The owner decides where chat requests may go (`s` the Settings): `remote_engine_hosts`, and with offline
    only loopback. Raises EngineError naming the host and the setting."""
    from studio.settings import is_loopback_host

    host = (urlparse(base_url).hostname or "").lower()
    offline = s.offline or os.environ.get("HF_HUB_OFFLINE") == "1"
    if offline and not is_loopback_host(host):
        raise EngineError(f"{host!r} is not this machine and the studio runs offline: no request leaves it.")
    if (
        "*" not in s.remote_engine_hosts
        and host not in s.remote_engine_hosts
        and not (is_loopback_host(host) and any(is_loopback_host(h) for h in s.remote_engine_hosts))
    ):
        raise EngineError(
            f"The engine host {host!r} is not allowed; the studio's owner can add it to remote_engine_hosts "
            f"(allowed now: {', '.join(s.remote_engine_hosts) or 'none'})."
        )


@dataclass(frozen=True)
class StreamPiece:
    delta: str = ""
    finish_reason: str | None = None
    completion_tokens: int | None = None  # from the server's usage, on the last piece when it reports one
    prompt_tokens: int | None = None


class OpenAIChatClient:
    def __init__(self, config: OpenAIEngineConfig) -> None:
        self.config = config

    def _request(self, messages: list[dict[str, str]], opts: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.config.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": opts.temperature,
            "top_p": opts.top_p,
            "max_tokens": opts.max_new_tokens,
        }
        if opts.stop:
            body["stop"] = list(opts.stop)
        if opts.seed is not None:
            body["seed"] = opts.seed
        if opts.repetition_penalty != 1.0:
            body["extra_body"] = {"repetition_penalty": opts.repetition_penalty}  # vLLM / llama.cpp extension
        return body

    def stream(
        self, messages: list[dict[str, str]], opts: Any, cancel: threading.Event | None = None
    ) -> Iterator[StreamPiece]:
        """Yield the text deltas as the server streams them; the last piece carries finish reason and usage."""
        import openai

        client = openai.OpenAI(
            base_url=self.config.base_url,
            api_key=self.config.api_key or "unused",  # the client insists on a key; local servers ignore it
            timeout=openai.Timeout(self.config.timeout_s, connect=10.0),
            max_retries=0,
        )
        url = self.config.base_url.rstrip("/") + "/chat/completions"
        finish: str | None = None
        try:
            no_key = {} if self.config.api_key else {"extra_headers": {"Authorization": openai.Omit()}}
            with client.chat.completions.create(**self._request(messages, opts), **no_key) as events:
                for event in events:
                    if cancel is not None and cancel.is_set():
                        yield StreamPiece(finish_reason="cancelled")
                        return
                    for choice in event.choices[:1]:
                        finish = choice.finish_reason or finish
                        if choice.delta.content:
                            yield StreamPiece(choice.delta.content)
                    if event.usage is not None:
                        u = event.usage
                        yield StreamPiece(finish_reason=finish, completion_tokens=u.completion_tokens,
                                          prompt_tokens=u.prompt_tokens)  # fmt: skip
                        return
            yield StreamPiece(finish_reason=finish)
        except openai.APIStatusError as e:
            raise EngineError(f"{url} answered HTTP {e.status_code}: {_detail(e)}") from None
        except openai.APITimeoutError:
            raise EngineError(f"{self.config.base_url} did not answer within {self.config.timeout_s:.0f} s.") from None
        except openai.APIConnectionError as e:
            raise EngineError(
                f"Cannot reach {self.config.base_url} ({e.__cause__ or e}). Is the server running? Check the base URL."
            ) from None
        except openai.APIError as e:  # an error event inside the stream, or a malformed one
            raise EngineError(f"The server reported an error: {e}") from None


def _detail(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        body = body.get("error", body)
        body = body.get("message", body) if isinstance(body, dict) else body
    return str(body or e.message)[:300]
