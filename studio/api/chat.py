"""POST /v1/chat/completions and /v1/completions on the studio's LLM backend, streamed (SSE) or not.

Streaming follows the OpenAI chunk shapes: a first delta with the role, content deltas, tool calls as
`{"index", "id", "type", "function": {"name", "arguments": ""}}` then argument fragments with only `index`, a last
chunk with `finish_reason`, with `stream_options.include_usage` a final chunk with empty `choices` and `usage`,
then `data: [DONE]`. The response starts only once the first piece of the reply exists, so errors found before
that (unknown model, no tool template, queue full) come back as plain HTTP errors with their status.
`response_format` json_object / json_schema: the reply is instructed and prefilled with '{', and stops when the
braces balance; the schema itself is not enforced (no constrained decoding yet).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from studio.api.jobs import ApiError, CancellingStream, ClientGone, Job, as_api_error

JSON_INSTRUCTION = "Answer with a single JSON object only, no prose and no code fences."
FINISH = {"eos": "stop", "stop_string": "stop", "cancelled": "stop", "length": "length", "tool_calls": "tool_calls"}
ARG_FRAGMENT = 16  # characters of tool-call arguments per streamed delta


@dataclass
class ChatRequest:
    model: str
    messages: list[dict[str, Any]] | None  # None for /v1/completions
    prompt: str
    options: Any  # GenerationOptions
    stream: bool
    include_usage: bool
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = "auto"
    json_mode: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)


def _number(body: dict, key: str, default: Any, kind: type) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
        raise ApiError(400, f"{key}={value!r}: expected a {kind.__name__}.", param=key)
    return kind(value)


def _text_content(i: int, content: Any) -> str | None:
    """OpenAI content: a string, null, or a list of parts of which only text parts are understood."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ApiError(
                    400, f"messages[{i}]: content part {kind!r} is not supported; send text.", param="messages"
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts.", param="messages")


def _messages(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects.", param="messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object.", param="messages")
        role = "system" if m.get("role") == "developer" else m.get("role")
        msg = {"role": role, "content": _text_content(i, m.get("content"))}
        for key in ("tool_calls", "tool_call_id", "name"):
            if m.get(key) is not None:
                msg[key] = m[key]
        if msg["content"] is None and not msg.get("tool_calls"):
            msg["content"] = ""
        out.append(msg)
    return out


def _options(body: dict) -> Any:
    from backends.llm import GenerationOptions

    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, f"stop={body.get('stop')!r}: give a string or up to 4 strings.", param="stop")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if isinstance(body.get("n"), int) and body["n"] != 1:
        raise ApiError(400, f"n={body['n']}: the studio makes one choice per request; send n=1.", param="n")
    if body.get("logprobs"):
        raise ApiError(400, "logprobs are not served by the studio; leave logprobs unset.", param="logprobs")
    try:
        return GenerationOptions(
            temperature=_number(body, "temperature", 1.0, float),
            top_p=_number(body, "top_p", 1.0, float) or 1.0,
            max_new_tokens=_number({"m": max_tokens}, "m", 512, int),
            stop=tuple(s for s in stop if s),
            seed=_number(body, "seed", None, int),
        )
    except ValueError as e:
        raise ApiError(400, str(e)) from None


def parse(body: Any, *, chat: bool) -> ChatRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is missing: give one of the ids from GET /v1/models.", param="model")
    usage = isinstance(body.get("stream_options"), dict) and bool(body["stream_options"].get("include_usage"))
    req = ChatRequest(model, None, "", _options(body), bool(body.get("stream")), usage)
    if not chat:
        prompt = body.get("prompt")
        prompt = prompt[0] if isinstance(prompt, list) and len(prompt) == 1 else prompt
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt must be a string (or a list of one string).", param="prompt")
        req.prompt = prompt
        return req
    req.messages = _messages(body.get("messages"))
    from backends.llm import check_messages

    try:
        check_messages(req.messages)  # before queueing: a bad conversation is refused at once
    except ValueError as e:
        raise ApiError(400, str(e), param="messages") from None
    req.tools = body.get("tools") or None
    req.tool_choice = body.get("tool_choice") or "auto"
    fmt = body.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if fmt is not None and kind not in ("text", "json_object", "json_schema"):
        raise ApiError(
            400, f"response_format={fmt!r}: use type text, json_object or json_schema.", param="response_format"
        )
    req.json_mode = kind in ("json_object", "json_schema")
    if req.json_mode:
        req.messages = [{"role": "system", "content": JSON_INSTRUCTION}, *req.messages]
        req.kwargs["reply_prefix"] = "{"
    if req.tools:
        req.kwargs.update(tools=req.tools, tool_choice=req.tool_choice)
    return req


def json_end(text: str) -> int | None:
    """Index just past the first complete JSON object or array in `text` (brackets balanced outside strings)."""
    depth, in_str, esc = 0, False, False
    for i, ch in enumerate(text):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


# ---- running ------------------------------------------------------------------------------------------------------
def make_work(backend: Any, req: ChatRequest, rec: Any) -> Callable:
    """The thread's work: drive the backend generator, emit deltas, return the final update (tokens counted in
    `rec` as they come, so a cancelled request's record says how far it got)."""

    def work(cancel: threading.Event, emit: Callable[[Any], None]) -> Any:
        stop = threading.Event()  # the backend's flag: the client left, or a JSON answer is complete
        if req.messages is not None:
            updates = backend.chat(req.messages, req.options, cancel=stop, model=req.model, **req.kwargs)
        else:
            updates = backend.complete_text(req.prompt, req.options, cancel=stop, model=req.model)
        final = None
        for u in updates:
            if cancel.is_set():
                stop.set()
            if u.delta:
                rec.tokens += 1
                emit(u.delta)
            if req.json_mode and json_end(u.text) is not None:
                stop.set()
            if u.done:
                final = u
                rec.tokens = usage(u)["completion_tokens"]
        return final

    return work


def finish_reason(final: Any, json_mode: bool) -> str:
    return FINISH.get(final.stats.finish_reason if final.stats else "", "stop")


def usage(final: Any) -> dict[str, int]:
    s = final.stats
    prompt = s.prompt_tokens if s else 0
    completion = (s.new_tokens - (s.finish_reason == "eos")) if s else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _message(final: Any, text: str) -> dict[str, Any]:
    calls = [c.to_openai() for c in final.tool_calls]
    msg: dict[str, Any] = {"role": "assistant", "content": text if (text or not calls) else None, "refusal": None}
    if calls:
        msg["tool_calls"] = calls
    return msg


class Reply:
    """Builds the response bodies of one request (ids and timestamps shared by all its chunks)."""

    def __init__(self, req: ChatRequest) -> None:
        self.req = req
        self.chat = req.messages is not None
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.req.model,
                "system_fingerprint": None}  # fmt: skip

    def whole(self, final: Any, text: str) -> dict[str, Any]:
        reason = finish_reason(final, self.req.json_mode)
        if self.chat:
            choice = {"index": 0, "message": _message(final, text), "logprobs": None, "finish_reason": reason}
            body = self._base("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            body = self._base("text_completion")
        return {**body, "choices": [choice], "usage": usage(final)}

    def chunk(self, delta: dict[str, Any] | str | None, reason: str | None = None) -> str:
        if self.chat:
            choice = {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": reason}
            body = self._base("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": reason}
            body = self._base("text_completion")
        body["choices"] = [choice]
        if self.req.include_usage:
            body["usage"] = None
        return _sse(body)

    def content(self, text: str) -> str:
        return self.chunk({"content": text} if self.chat else text)

    def tool_chunks(self, calls: tuple) -> list[str]:
        out = []
        for i, call in enumerate(calls):
            head = {"index": i, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
            out.append(self.chunk({"tool_calls": [head]}))
            for at in range(0, len(call.arguments), ARG_FRAGMENT):
                frag = call.arguments[at : at + ARG_FRAGMENT]
                out.append(self.chunk({"tool_calls": [{"index": i, "function": {"arguments": frag}}]}))
        return out

    def closing(self, final: Any) -> list[str]:
        out = [*self.tool_chunks(final.tool_calls), self.chunk(None, finish_reason(final, self.req.json_mode))]
        if self.req.include_usage:
            out.append(_sse({**self._base("chat.completion.chunk" if self.chat else "text_completion"),
                             "choices": [], "usage": usage(final)}))  # fmt: skip
        return [*out, "data: [DONE]\n\n"]


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def respond(request: Any, job: Job, req: ChatRequest) -> Any:
    """Run the job; answer one JSON body, or an SSE stream once the first piece exists."""
    from starlette.responses import JSONResponse

    reply = Reply(req)
    job.start()
    if not req.stream:
        final = await job.result(request)
        return JSONResponse(reply.whole(final, _reply_text(final, req)))
    first = await job.next(request)
    if first[0] == "error":
        raise as_api_error(first[1])
    if first[0] == "cancelled":
        raise ClientGone
    return CancellingStream(_events(request, job, reply, first), job)


def _reply_text(final: Any, req: ChatRequest) -> str:
    """The reply's content: without tool-call markup, and a JSON answer cut where its object closes."""
    if final.tool_calls:
        from backends.llm import parse_tool_calls

        return parse_tool_calls(final.text)[0]
    if req.json_mode:
        end = json_end(final.text)
        return final.text[:end] if end else final.text
    return final.text


async def _events(request: Any, job: Job, reply: Reply, first: tuple[str, Any]) -> AsyncIterator[str]:
    """The SSE events of a streamed reply: one event per delta, but the events already queued when the client's
    socket is ready go out in one write (a model faster than the pipe does not pay one send per token)."""
    if reply.chat:
        yield reply.chunk({"role": "assistant", "content": ""})
    item: tuple[str, Any] | None = first
    while True:
        out: list[str] = []
        while item is not None:
            kind, value = item
            if kind == "item":
                out.append(reply.content(value))
            elif kind == "done":
                yield "".join([*out, *reply.closing(value)])
                return
            else:  # an error (answered in the stream) or cancelled
                if kind == "error":
                    out.append(_sse(as_api_error(value).body()))
                yield "".join(out)
                return
            item = job.next_nowait()
        yield "".join(out)
        try:
            item = await job.next(request)
        except ClientGone:
            return
