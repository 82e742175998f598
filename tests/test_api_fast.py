"""The /v1 layer on its own, fast: the real routes, auth, queue and SSE shapes on a real HTTP server (uvicorn in a
thread) and the openai client, with a stand-in chat backend so no model loads. The same routes against the whole
studio with real models: tests/test_api.py and tests/test_api_tools.py (slow)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from backends.llm import GenerationStats, ToolStream
from studio.api.state import ApiState
from studio.settings import Settings
from tests._studio_server import free_port

openai = pytest.importorskip("openai")

KEY = "sk-fast-0123456789abcdef"
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


class StandInLLM:
    """Streams the words of `script` (one per 10 ms, honouring cancel); holds before the first while `gate` is clear."""

    def __init__(self) -> None:
        from backends.llm import LLMConfig

        self.config = LLMConfig()
        self.script = "one two three"
        self.gate = threading.Event()
        self.gate.set()
        self.cancelled: list[int] = []

    def chat(self, messages, options, *, cancel, model=None, tools=None, tool_choice="auto", reply_prefix=""):
        from backends.llm import ChatUpdate

        self.gate.wait(30)
        stream = ToolStream() if tools else None
        words = self.script.split(" ")
        end = "eos" if len(words) <= options.max_new_tokens else "length"
        stats, text = GenerationStats(prompt_tokens=len(messages), finish_reason=end), ""
        for i, word in enumerate(words[: options.max_new_tokens]):
            if cancel.is_set():
                stats.finish_reason = "cancelled"
                self.cancelled.append(i)
                break
            piece = word if i == 0 else " " + word
            text += piece
            stats.new_tokens = i + 1
            shown = stream.feed(piece) if stream else piece
            if shown:
                yield ChatUpdate(text, shown)
            time.sleep(0.01)
        calls = ()
        if stream:
            _, found = stream.finish()
            calls = tuple(found)
            stats.finish_reason = "tool_calls" if calls else stats.finish_reason
        stats.new_tokens += stats.finish_reason == "eos"
        yield ChatUpdate(text, done=True, stats=stats, tool_calls=calls)


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    import uvicorn
    from fastapi import FastAPI

    from studio import api as studio_api
    from studio.app import build_context

    root = tmp_path_factory.mktemp("api-fast")
    (root / "keys.txt").write_text(f"{KEY}\n")
    settings = Settings(data_dir=root / "data", models_dir=root / "models", open_browser=False, port=free_port(),
                        api_keys_file=root / "keys.txt", api_keys_on_loopback=True, api_max_queue=1)  # fmt: skip
    ctx = build_context(settings)
    llm = StandInLLM()
    ctx.backends._built["llm"] = llm
    app = FastAPI()
    studio_api.mount(app, ctx)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{settings.port}/v1"
    yield url, llm, ctx
    server.should_exit = True
    thread.join(10)
    ctx.jobs.shutdown(timeout=10)


@pytest.fixture
def client(api):
    api[1].script, api[1].cancelled[:] = "one two three", []
    return openai.OpenAI(base_url=api[0], api_key=KEY, max_retries=0, timeout=30)


def test_keys_required_and_never_echoed(api, client):
    url = api[0]
    assert next(m.id for m in client.models.list() if m.capability == "chat") == "smollm2-135m"
    for headers in ({}, {"Authorization": "Bearer sk-wrong-0123456789abcdef"}, {"Authorization": KEY}):
        r = httpx.get(url + "/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert "sk-wrong" not in r.text


def test_exposure_rules():
    local = ApiState(Settings())
    assert not local.auth_required and not local.closed_reason
    exposed = ApiState(Settings(host="0.0.0.0"))
    assert exposed.auth_required and "api_keys_file" in exposed.closed_reason  # no keys: the API stays closed
    assert ApiState(Settings(share=True)).auth_required


def test_plain_and_streamed_chat_shapes(client):
    r = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"stream_options": None, "whatever": [1, 2]})  # fmt: skip
    assert r.choices[0].message.content == "one two three" and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 3 and r.object == "chat.completion"
    chunks = list(client.chat.completions.create(model="smollm2-135m", stream=True, max_tokens=2,
                                                 stream_options={"include_usage": True},
                                                 messages=[{"role": "developer", "content": "be brief"},
                                                           {"role": "user", "content": [{"type": "text", "text": "hi"}]}]))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "one two"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 2


def test_stream_helper_gets_tool_calls_in_openai_shape(api, client):
    api[
        1
    ].script = 'Let me look. <tool_call>{"name": "get_weather", "arguments": {"city": "Lima", "unit": "c"}}</tool_call>'
    with client.chat.completions.stream(model="smollm2-135m", tools=[WEATHER],
                                        messages=[{"role": "user", "content": "Lima?"}]) as s:  # fmt: skip
        events = list(s)
        final = s.get_final_completion()
    msg = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls" and msg.content.strip() == "Let me look."
    assert msg.tool_calls[0].function.name == "get_weather"
    assert msg.tool_calls[0].function.arguments == '{"city": "Lima", "unit": "c"}'
    deltas = [e for e in events if e.type == "chunk" and e.chunk.choices and e.chunk.choices[0].delta.tool_calls]
    first, rest = deltas[0].chunk.choices[0].delta.tool_calls[0], deltas[1:]
    assert first.index == 0 and first.id and first.type == "function" and first.function.arguments == ""
    assert rest and all(d.chunk.choices[0].delta.tool_calls[0].id is None for d in rest)


def test_bad_requests_are_400_with_the_reason(api, client):
    url, auth = api[0], {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(url + "/chat/completions", headers=auth, content=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    cases = [
        ({"model": "smollm2-135m", "messages": []}, "messages"),
        ({"model": "smollm2-135m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "image_url"),
        ({"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "n": 2}, "n=2"),
        ({"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "stop": [1]}, "stop"),
        ({"model": "smollm2-135m", "messages": [{"role": "user", "content": "a\x00b"}]}, "null byte"),
    ]
    for body, needle in cases:
        r = httpx.post(url + "/chat/completions", headers=auth, json=body)
        assert r.status_code == 400 and needle in r.json()["error"]["message"], (body, r.text)
    r = httpx.post(url + "/chat/completions", headers=auth, json={"model": "gpt-4o", "messages": []})
    assert r.status_code in (400, 404)


def test_queue_bound_503_then_disconnect_cancels(api, client):
    url, llm, ctx = api
    llm.script = " ".join(f"w{i}" for i in range(400))
    llm.gate.clear()  # the first request holds its slot until released

    def hold() -> None:  # a client that reads three chunks, then goes away mid-stream
        stream = client.chat.completions.create(model="smollm2-135m", stream=True,
                                                messages=[{"role": "user", "content": "go"}])  # fmt: skip
        it = iter(stream)
        for _ in range(3):
            next(it)
        stream.close()

    holder = threading.Thread(target=hold)
    holder.start()
    second: dict = {}
    t = threading.Thread(target=lambda: second.update(r=httpx.post(
        url + "/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
        json={"model": "smollm2-135m", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]})))  # fmt: skip
    deadline = time.monotonic() + 10
    while ctx.api.queue_lengths()["chat"]["running"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    t.start()
    while ctx.api.queue_lengths()["chat"]["waiting"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 503 and int(e.value.response.headers["retry-after"]) >= 1
    llm.gate.set()
    holder.join(30)
    t.join(30)
    assert second["r"].status_code == 200  # the waiting request ran next
    assert llm.cancelled and llm.cancelled[0] < 400  # the stream stopped early
    snap = ctx.api.snapshot()
    assert snap["queues"]["chat"] == {"running": 0, "waiting": 0}
    statuses = [r["status"] for r in snap["recent"]]
    assert "refused" in statuses and "cancelled" in statuses


def test_settings_tab_shows_address_auth_and_requests(api, client):
    from tabs.settings import api_markdown, request_rows

    client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "hi"}])
    snap = api[2].api.snapshot()
    text = api_markdown(snap)
    assert api[0] in text and "required" in text and "chat: 0 running, 0 waiting" in text
    row = request_rows(snap)[0]
    assert row[1:4] == ["chat", "smollm2-135m", "ok"] and row[4].endswith(("ms", "s"))
    assert KEY not in text and all(KEY not in str(r) for r in request_rows(snap))
    closed = api_markdown(ApiState(Settings(host="0.0.0.0")).snapshot())
    assert "Closed" in closed and "api_keys_file" in closed


def test_a_call_marker_split_over_tokens_is_never_shown():
    """Models emit `<tool_call>` as several tokens ('<', 'tool', '_', 'call', '>'): none of it may leak as content
    (a held-back tail longer than the text once sliced from the wrong end and showed '<tool_c')."""
    for pieces in (["<", "tool", "_", "call", ">", '\n{"name": "f", "arguments": {}}\n</tool_call>'],
                   ["Sure. ", "<", "tool", "_", "call", ">", '{"name": "f", "arguments": {"a": 1}}</tool_call>'],
                   ["[", "TOOL", "_CALLS", "] ", '[{"name": "f", "arguments": {}}]']):  # fmt: skip
        stream = ToolStream()
        shown = "".join(stream.feed(p) for p in pieces)
        rest, calls = stream.finish()
        assert "<" not in shown and "TOOL" not in shown and calls and calls[0].name == "f", (pieces, shown)
        assert (shown + rest).strip() in ("", "Sure.")
    stream = ToolStream()
    assert "".join(stream.feed(p) for p in ["a <", "b"]) == "a <b"  # a '<' that is no marker is shown in the end


def test_a_key_file_saved_by_notepad_gives_the_same_keys(tmp_path):
    """A UTF-8 BOM (Notepad's default) used to become part of the first key, which then never matched."""
    from studio.api.state import ApiConfigError, read_keys

    key, path = "sk-notepad-0123456789abcdef", tmp_path / "keys.txt"
    path.write_bytes(b"\xef\xbb\xbf" + key.encode() + b"\r\n# a comment\r\n")
    assert read_keys(path) == (key,)
    path.write_text(key + "\n", encoding="utf-16")  # "Unicode" in Notepad: UTF-16 with its BOM
    assert read_keys(path) == (key,)
    path.write_bytes(b"sk-caf\xe9-0123456789abcdef\n")  # latin-1: refused with the line, not mangled
    with pytest.raises(ApiConfigError, match=r"keys\.txt:1: not UTF-8"):
        read_keys(path)
