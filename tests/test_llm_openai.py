"""The OpenAI-compatible engine against a small chat-completions SSE server on 127.0.0.1 (test scaffolding)."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from backends.llm.backend import EngineError, GenerationOptions, LLMBackend, LLMConfig

REPLY = ["The ", "capital ", "of ", "France ", "is ", "Paris", "."]


class _Handler(BaseHTTPRequestHandler):
    requests: ClassVar[list[dict]] = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        if body["model"] == "boom":
            self._send(500, "application/json", b'{"error": {"message": "model exploded"}}')
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        chunks = REPLY * 40 if body["model"] == "slow" else REPLY
        for i, piece in enumerate(chunks):
            last = i == len(chunks) - 1
            event = {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": "stop" if last else None}]}
            try:
                self.wfile.write(b": keep-alive\n\n" if i == 2 else b"")
                self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                return  # the client hung up (cancel)
            if body["model"] == "slow":
                time.sleep(0.02)
        self.wfile.write(b"data: [DONE]\n\n")

    def _send(self, status, ctype, data):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def _backend(ctx, url, model="tiny", key=""):
    return LLMBackend(ctx, LLMConfig(engine="openai", base_url=url, api_model=model, api_key=key))


def test_streams_chunks_from_the_server(ctx, server):
    backend = _backend(ctx, server, key="sk-test")
    opts = GenerationOptions(temperature=0.2, max_new_tokens=50, stop=("\n\n",))
    updates = list(backend.chat([{"role": "user", "content": "Capital of France?"}], opts))
    deltas = [u.delta for u in updates if u.delta]
    assert deltas == REPLY
    assert updates[-1].done and updates[-1].text == "The capital of France is Paris."
    assert updates[-1].stats.finish_reason == "stop"
    sent = _Handler.requests[-1]
    assert sent["path"] == "/v1/chat/completions" and sent["auth"] == "Bearer sk-test"
    assert sent["body"]["stream"] is True and sent["body"]["max_tokens"] == 50 and sent["body"]["stop"] == ["\n\n"]
    assert sent["body"]["messages"][-1] == {"role": "user", "content": "Capital of France?"}


def test_complete_and_system_prompt(ctx, server):
    backend = _backend(ctx, server)
    assert backend.complete([{"role": "user", "content": "hi"}], max_new_tokens=8) == "".join(REPLY)
    list(backend.chat([{"role": "user", "content": "hi"}], GenerationOptions(system_prompt="Be terse.")))
    assert _Handler.requests[-1]["body"]["messages"][0] == {"role": "system", "content": "Be terse."}
    assert _Handler.requests[-1]["auth"] is None


def test_cancel_closes_the_stream(ctx, server):
    backend = _backend(ctx, server, model="slow")
    cancel = threading.Event()
    t0 = time.perf_counter()
    for update in backend.chat([{"role": "user", "content": "long please"}], cancel=cancel):
        if update.delta:
            cancel.set()
        final = update
    assert final.done and final.stats.finish_reason == "cancelled"
    assert final.text == REPLY[0]  # nothing after the chunk that triggered the cancel
    assert time.perf_counter() - t0 < 3  # the full reply would take 280 x 20 ms


def test_server_errors_are_clear(ctx, server):
    with pytest.raises(EngineError, match=r"HTTP 500.*model exploded"):
        _backend(ctx, server, model="boom").complete([{"role": "user", "content": "hi"}])
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(EngineError, match="Cannot reach"):
        _backend(ctx, f"http://127.0.0.1:{port}/v1").complete([{"role": "user", "content": "hi"}])


def test_bad_engine_settings(ctx):
    with pytest.raises(ValueError, match="model is empty"):
        LLMConfig(engine="openai", base_url="http://127.0.0.1:8000/v1", api_model=" ")
    assert "sk-" not in repr(LLMConfig(engine="openai", base_url="http://x:1/v1", api_model="m", api_key="sk-secret"))


def test_a_session_config_never_becomes_the_shared_default(ctx, monkeypatch):
    """The Chat tab passes each session's engine, URL and key per call; the backend default (which RAG and
    post-editing use) stays as it was, so one browser's server and key never serve another's requests."""

    backend = LLMBackend(ctx)
    session = backend.session_config(engine="openai", base_url="http://127.0.0.1:9/v1", api_model="m", api_key="sk-a")
    with pytest.raises(EngineError):  # nothing listens on port 9: the call went where the session said
        list(backend.chat([{"role": "user", "content": "hi"}], config=session))
    assert backend.config.engine == "transformers" and backend.config.base_url == "" and backend.config.api_key == ""
    far = backend.session_config(engine="openai", base_url="http://gpu-box.lan:8000/v1", api_model="m")
    with pytest.raises(EngineError, match=r"not allowed|no request leaves"):
        list(backend.chat([{"role": "user", "content": "hi"}], config=far))
