"""Security defaults checked against the running studio over HTTP (`python -m studio.app` in a subprocess).

- the file routes serve the outputs folder but never the models, config (studio.toml) or cache folders, nor
  anything reached with `../`, encoded `..` or a symlink;
- uploads above `max_upload_mb` are refused (the cap comes from the studio.toml in the app's folder);
- share or a non-loopback host without an auth file is refused before anything listens; with an auth file the
  API needs a login;
- exposed (0.0.0.0 with an auth file, reached only through 127.0.0.1): no request field chooses a trust or a server
  path, bodies and uploads are capped, other origins and password guessing are refused, nothing about the API is
  shown before login, one session's chat engine never serves another; start-up cleans crashed runs and temp files;
  SIGTERM closes the studio cleanly.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import subprocess
import sys
import uuid

import pytest

from tests._studio_server import free_port, gradio_call, http_request, login, running_studio, studio_env

ROUTES = ("/gradio_api/file=", "/file=")
CANARIES = {
    "models": ("models/secret.safetensors", b"CANARY-MODELS"),
    "cache": ("data/cache/secret.txt", b"CANARY-CACHE"),
    "config": ("studio.toml", b"CANARY-CONFIG"),
    "workdir": ("notes.txt", b"CANARY-WORKDIR"),
}
PUBLIC = ("data/outputs/public.txt", b"PUBLIC-OUTPUT")


def _request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """Raw HTTP (no client-side path normalisation), returns (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _upload(port: int, size: int):
    boundary = f"----studio{uuid.uuid4().hex}"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="blob.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    body = head + b"x" * size + f"\r\n--{boundary}--\r\n".encode()
    return _request(
        port, "POST", "/gradio_api/upload", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )


def _write_workdir(workdir, toml: bytes) -> None:
    for rel, content in [*CANARIES.values(), PUBLIC]:
        path = workdir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel == "studio.toml":
            content = toml + b"# " + content + b"\n"
        path.write_bytes(content)
    os.symlink(workdir / CANARIES["models"][0], workdir / "data/outputs/link.safetensors")


CRASHED_RUN = "20260101-000000-000000-dead-tinylm"
ORPHAN = "data/outputs/.picture.png.a1b2c3d4.tmp"


def _leave_a_crash_behind(workdir) -> None:
    """What a killed studio leaves: a run record still "running" (its process gone) and a temp file of a save."""
    run = workdir / "data/runs" / CRASHED_RUN
    (run / "checkpoints").mkdir(parents=True)
    record = {"id": CRASHED_RUN, "kind": "tinylm", "config": {}, "seed": 0, "dataset_hash": None, "versions": {},
              "status": "running", "pid": 2**22 + 17, "started": 1.0, "finished": None, "summary": {}, "artifacts": []}  # fmt: skip
    (run / "record.json").write_text(json.dumps(record))
    (run / "metrics.jsonl").write_text('{"step": 10, "time": 5.0, "loss": 2.0}\n')
    (run / "checkpoints" / "step-10.safetensors").write_bytes(b"x" * 64)
    (run / "checkpoints" / ".step-20.safetensors.Zz9_Yy8x.tmp").write_bytes(b"half")
    orphan = workdir / ORPHAN
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"half a picture")
    stale = workdir / "data/uploads/0123abcd/stale.bin"  # an upload from a week ago
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    for p in (orphan, run / "checkpoints" / ".step-20.safetensors.Zz9_Yy8x.tmp", stale):
        os.utime(p, (1_000_000, 1_000_000))


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("secure")
    _write_workdir(workdir, b"max_upload_mb = 1\nmax_body_mb = 1\n")
    _leave_a_crash_behind(workdir)
    with running_studio(workdir) as s:
        yield s


def test_outputs_are_served(studio):
    """Positive control: the route works for the one folder it should serve, so the refusals below mean something."""
    for route in ROUTES[:1]:
        status, body = _request(studio.port, "GET", route + str(studio.workdir / PUBLIC[0]))
        assert (status, body) == (200, PUBLIC[1])


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("what", sorted(CANARIES))
def test_file_route_refuses_protected_files(studio, route, what):
    rel, canary = CANARIES[what]
    status, body = _request(studio.port, "GET", route + str(studio.workdir / rel))
    assert status in (403, 404), (status, body[:200])
    assert canary not in body


@pytest.mark.parametrize(
    "suffix",
    [
        "data/outputs/../../models/secret.safetensors",
        "data/outputs/%2e%2e/%2e%2e/models/secret.safetensors",
        "data/outputs/..%2f..%2fmodels/secret.safetensors",
        "data/outputs/%252e%252e/%252e%252e/models/secret.safetensors",
        "data/outputs/../cache/secret.txt",
        "data/outputs/../../studio.toml",
        "data/outputs/link.safetensors",  # symlink out of outputs into models
        "data/outputs/../../../../../../etc/passwd",
    ],
)
def test_file_route_refuses_escapes(studio, suffix):
    for route in ROUTES:
        status, body = _request(studio.port, "GET", f"{route}{studio.workdir}/{suffix}")
        assert status in (400, 403, 404), (route, suffix, status, body[:200])
        assert b"CANARY" not in body and b"root:" not in body


def test_upload_cap_from_config_is_enforced(studio):
    status, body = _upload(studio.port, 10_000)
    assert status == 200, body[:300]
    status, body = _upload(studio.port, 2 * 2**20)
    assert status == 413, (status, body[:300])
    status, _ = _upload(studio.port, 2**20 + 1024)
    assert status == 413


def test_uploaded_file_can_be_read_back(studio):
    status, body = _upload(studio.port, 1234)
    assert status == 200
    path = json.loads(body)[0]
    status, content = _request(studio.port, "GET", "/gradio_api/file=" + path)
    assert status == 200 and content == b"x" * 1234


def _nothing_listens(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.parametrize("flags", [["--share"], ["--host", "0.0.0.0"]])
def test_exposed_launch_without_auth_is_refused(tmp_path, flags):
    port = free_port()
    cmd = [sys.executable, "-m", "studio.app", *flags, "--port", str(port), "--no-browser"]
    cmd += ["--data-dir", str(tmp_path / "data"), "--models-dir", str(tmp_path / "models")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=studio_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Refusing" in proc.stderr and "--auth-file" in proc.stderr
    assert _nothing_listens(port)


def test_check_launch_safety_directly(tmp_path):
    from studio.app import LaunchRefused, check_launch_safety
    from studio.settings import Settings

    for unsafe in (Settings(share=True), Settings(host="0.0.0.0")):
        with pytest.raises(LaunchRefused, match="without a password"):
            check_launch_safety(unsafe)
    auth = tmp_path / "auth.txt"
    auth.write_text("alice:correct-horse-battery\n")
    assert check_launch_safety(Settings(host="0.0.0.0", auth_file=auth)) == [("alice", "correct-horse-battery")]


# ---- local studio: start-up hygiene, body caps, image and LoRA uploads -------------------------------------------
def test_startup_marks_crashed_runs_interrupted_and_removes_orphan_temps(studio):
    record = json.loads((studio.data_dir / "runs" / CRASHED_RUN / "record.json").read_text())
    assert record["status"] == "interrupted" and record["finished"] == 5.0
    assert record["summary"]["last_checkpoint"] == "checkpoints/step-10.safetensors"
    assert not (studio.workdir / ORPHAN).exists()
    assert not list((studio.data_dir / "runs" / CRASHED_RUN / "checkpoints").glob(".*.tmp"))
    assert (studio.data_dir / "runs" / CRASHED_RUN / "checkpoints" / "step-10.safetensors").is_file()
    assert not (studio.data_dir / "uploads/0123abcd/stale.bin").exists()  # uploads past upload_keep_hours


def _multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, dict]:
    boundary = f"----studio{uuid.uuid4().hex}"
    body = b""
    for name, data in files:
        body += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
    body += f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _upload_files(port: int, files: list[tuple[str, bytes]], headers: dict | None = None):
    body, h = _multipart(files)
    status, _, out = http_request(port, "POST", "/gradio_api/upload", body, {**h, **(headers or {})})
    return status, out


def _file_data(path: str, name: str) -> dict:
    return {"path": path, "orig_name": name, "meta": {"_type": "gradio.FileData"}}


def _send_oversized(port: int, path: str, headers: dict | None = None, declared: int = 150 * 2**20):
    """Declare a 150 MB JSON body but send only its start: the guard must answer 413 without reading it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest("POST", path)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(declared), **(headers or {})}.items():
            conn.putheader(k, v)
        conn.endheaders()
        conn.send(b'{"data": [], "fn_index": 0, "session_hash": "' + b"a" * 65536)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _send_chunked(port: int, path: str, total: int, headers: dict | None = None):
    """A body with no Content-Length (chunked): the guard counts what arrives and cuts it off at the cap."""
    chunks = (b"a" * 65536 for _ in range(total // 65536 + 1))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, body=chunks, headers={"Content-Type": "application/json", **(headers or {})},
                     encode_chunked=True)  # fmt: skip
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (BrokenPipeError, ConnectionResetError):
        return 413, b"(connection closed by the server at the cap)"
    finally:
        conn.close()


def test_json_bodies_are_capped_on_every_route(studio):
    status, body = _send_oversized(studio.port, "/gradio_api/queue/join")
    assert status == 413 and len(body) < 500 and b"aaaa" not in body, (status, body[:200])
    status, body = _send_chunked(studio.port, "/gradio_api/queue/join", 2 * 2**20)
    assert status == 413, (status, body[:200])
    status, _, body = http_request(
        studio.port, "POST", "/gradio_api/queue/join", b"{}", {"Content-Type": "application/json"}
    )
    assert status == 422  # positive control: a small body reaches Gradio, which answers for itself


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no pixel data: only the header is ever read)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("huge.png", _png_header(12000, 12000), "144 megapixels"),
        ("zip.png", b"PK\x03\x04" + b"\0" * 200, "not a readable"),
    ],
)
def test_oversized_and_corrupt_images_get_our_message(studio, name, content, message):
    status, body = _upload_files(studio.port, [(name, content)])
    assert status == 200, body[:200]
    path = json.loads(body)[0]
    args = ["yolov8s-person", _file_data(path, name), 0.25, 0.7, [], 640]
    result, detail = gradio_call(studio.port, "vision_detect", args, session=uuid.uuid4().hex)
    assert result == "error" and message in detail and name in detail, detail


def test_a_lora_upload_is_checked_before_it_is_stored(studio):
    import numpy as np
    from safetensors.numpy import save

    for name, content in [("fake.safetensors", b"\x08\0\0\0\0\0\0\0{}      "),
                          ("weights.safetensors", save({"conv.weight": np.zeros((2, 2), np.float32)}))]:  # fmt: skip
        status, body = _upload_files(studio.port, [(name, content)])
        assert status == 200
        result, detail = gradio_call(studio.port, "add_lora", [_file_data(json.loads(body)[0], name)])
        assert result == "error", detail
    assert not list((studio.data_dir / "outputs" / "loras").glob("*.safetensors"))


# ---- exposed: 0.0.0.0 with an auth file, reached only through 127.0.0.1 ---------------------------------------
USERS = {"alice": "correct-horse-battery", "bob": "staple-battery-horse", "mallory": "not-the-password-1"}


class _EngineStub:
    """An OpenAI-compatible server on 127.0.0.1 that records who called it."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        calls = self.calls = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                calls.append({"auth": self.headers.get("Authorization"), "messages": body["messages"]})
                event = {"choices": [{"delta": {"content": "stub says hi"}, "finish_reason": "stop"}]}
                data = f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def exposed(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("exposed")
    limits = b"max_upload_mb = 1\nmax_body_mb = 1\nupload_quota_mb = 3\nlogin_attempts = 3\n"
    _write_workdir(workdir, limits)
    auth = workdir / "auth.txt"
    auth.write_text("".join(f"{u}:{p}\n" for u, p in USERS.items()))
    stub = _EngineStub()
    with running_studio(workdir, "--host", "0.0.0.0", "--auth-file", str(auth)) as s:
        s.cookies = {u: login(s.port, u, USERS[u]) for u in ("alice", "bob")}
        s.stub = stub
        yield s
    stub.server.shutdown()


def test_exposed_api_needs_login_and_shows_nothing_before_it(exposed):
    port = exposed.port
    for path in ("/config", "/gradio_api/info", "/gradio_api/openapi.json"):
        status, _, body = http_request(port, "GET", path)
        assert status == 401, (path, status, body[:200])
    for path in ("/openapi.json", "/docs", "/redoc", "/gradio_api/docs"):
        status, _, body = http_request(port, "GET", path)
        assert status in (401, 404), (path, status)
        assert b"vision_detect" not in body
    status, _, page = http_request(port, "GET", "/")
    assert status == 200 and b"window.gradio_api_info = null;" in page
    assert b"vision_detect" not in page and b"rag_ingest" not in page and b"named_endpoints" not in page
    status, _, page = http_request(port, "GET", "/", headers={"Cookie": exposed.cookies["alice"]})
    assert status == 200 and b"rag_ingest" in page  # positive control: after login the page is whole


def test_wrong_passwords_back_off(exposed):
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    codes = [
        http_request(exposed.port, "POST", "/login", b"username=mallory&password=guess-%d" % i, form)[0]
        for i in range(12)
    ]
    assert codes[:3] == [400, 400, 400] and codes[-8:] == [429] * 8, codes
    status, headers, body = http_request(exposed.port, "POST", "/login", b"username=mallory&password=x", form)
    assert status == 429 and int(headers["retry-after"]) >= 1 and b"try again" in body
    assert login(exposed.port, "bob", USERS["bob"])  # another user from the same address still gets in


def test_other_origins_cannot_change_state(exposed):
    cookie = {"Cookie": exposed.cookies["alice"]}
    status, body = _upload_files(exposed.port, [("a.txt", b"hello")], {**cookie, "Origin": "http://evil.example"})
    assert status == 403, (status, body[:200])
    status, _, _ = http_request(exposed.port, "POST", "/gradio_api/queue/join", b"{}",
                                {**cookie, "Origin": "null", "Content-Type": "application/json"})  # fmt: skip
    assert status == 403
    own = {**cookie, "Origin": f"http://127.0.0.1:{exposed.port}"}
    assert _upload_files(exposed.port, [("a.txt", b"hello")], own)[0] == 200  # the studio's own page may


def test_exposed_bodies_and_uploads_are_capped_per_request_and_per_user(exposed):
    alice, bob = ({"Cookie": exposed.cookies[u]} for u in ("alice", "bob"))
    assert _send_oversized(exposed.port, "/gradio_api/queue/join", alice)[0] == 413
    part = b"x" * (700 * 1024)  # each file under the 1 MB cap, the request over it
    assert _upload_files(exposed.port, [("a.bin", part), ("b.bin", part)], bob)[0] == 413
    statuses = [_upload_files(exposed.port, [(f"{i}.bin", b"y" * (900 * 1024))], bob)[0] for i in range(4)]
    assert statuses == [200, 200, 200, 413], statuses  # 3 MB quota per user
    status, body = _upload_files(exposed.port, [("q.bin", b"z" * (400 * 1024))], bob)
    assert status == 413 and b"quota" in body
    assert _upload_files(exposed.port, [("mine.bin", b"z" * (900 * 1024))], alice)[0] == 200  # per user


def test_an_uploaded_pickle_is_never_trusted(exposed, tmp_path):
    import pickle

    marker = tmp_path / "pickle-ran"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    # torch's legacy file format (magic number, protocol, sys info, then the object): torch.load(weights_only=False),
    # as Ultralytics calls it, unpickles the object, so this file makes a folder the moment it is loaded.
    info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    payload = b"".join(pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, info)) + pickle.dumps(Evil())
    cookie = exposed.cookies["alice"]
    status, body = _upload_files(exposed.port, [("evil.pt", payload)], {"Cookie": cookie})
    assert status == 200
    uploaded = json.loads(body)[0]
    digest = hashlib.sha256(payload).hexdigest()[:10]
    for args in ([uploaded], [uploaded, True]):  # the old API took (path, "I trust this file")
        result, detail = gradio_call(exposed.port, "vision_add_weights", args, cookie=cookie)
        assert result == "error", detail
    bus = json.loads(_upload_files(exposed.port, [("p.png", _png_header(8, 8))], {"Cookie": cookie})[1])[0]
    for model in (uploaded, f"file-{digest}"):
        args = [model, _file_data(bus, "p.png"), 0.25, 0.7, [], 640]
        assert gradio_call(exposed.port, "vision_detect", args, cookie=cookie)[0] == "error"
    assert not marker.exists()


def test_rag_ingests_only_allowed_folders(exposed):
    bob = exposed.cookies["bob"]
    for folder in (str(exposed.workdir), "/etc", str(exposed.models_dir), str(exposed.data_dir / "cache")):
        result, detail = gradio_call(exposed.port, "rag_ingest", [None, "stolen", folder, None], cookie=bob)
        assert result == "error" and any(m in detail for m in ("not allowed", "not in the list", "outside")), detail
    assert not (exposed.data_dir / "rag" / "manifests" / "stolen.json").exists()


def test_one_sessions_engine_is_its_own(exposed):
    """Alice's engine settings serve only Alice's requests (the shared default stays the in-process model)."""
    alice = exposed.cookies["alice"]
    # wire inputs: chat_add_user (message, history, stop flag, conversation id); chat_respond (history, stop flag,
    # then the 12 engine and generation settings); the gr.State ones are sent as None, the session holds them
    assert (
        gradio_call(exposed.port, "chat_add_user", ["secret plan", None, None, None], cookie=alice, session="A")[0]
        == "ok"
    )
    args = [None, None, "smollm2-135m", "OpenAI-compatible server", exposed.stub.url, "m", "sk-alice", 4096, "", 0.7, 0.95,
            16, 1.0, ""]  # fmt: skip
    result, out = gradio_call(exposed.port, "chat_respond", args, cookie=alice, session="A")
    assert result == "ok" and "stub says hi" in json.dumps(out), out
    assert exposed.stub.calls[-1]["auth"] == "Bearer sk-alice"


@pytest.mark.slow  # ingests with the embedding model and answers with the local chat model: ~15 s alone, more when busy
def test_another_sessions_rag_answer_does_not_reach_the_first_sessions_engine(exposed):
    alice, bob = exposed.cookies["alice"], exposed.cookies["bob"]
    # Alice chats through her own OpenAI-compatible server with her key ...
    assert (
        gradio_call(exposed.port, "chat_add_user", ["secret plan", None, None, None], cookie=alice, session="A")[0]
        == "ok"
    )
    args = [None, None, "smollm2-135m", "OpenAI-compatible server", exposed.stub.url, "m", "sk-alice", 4096, "", 0.7, 0.95,
            16, 1.0, ""]  # fmt: skip
    result, out = gradio_call(exposed.port, "chat_respond", args, cookie=alice, session="A")
    assert result == "ok" and "stub says hi" in json.dumps(out), out
    n = len(exposed.stub.calls)
    assert exposed.stub.calls[-1]["auth"] == "Bearer sk-alice"
    # ... Bob's RAG question (answered by the chat model) must not go to Alice's server or use her key.
    from backends.rag.backend import SAMPLE_NOTES

    result, out = gradio_call(exposed.port, "rag_ingest", [None, "bobs", str(SAMPLE_NOTES.resolve()), None], cookie=bob,
                              session="B")  # fmt: skip
    assert result == "ok" and "done" in json.dumps(out), out
    result, out = gradio_call(exposed.port, "rag_ask", [None, "bobs", "How much water goes into the dough?",
                              "hybrid (vector + BM25)", 2, True, 16], cookie=bob, session="B")  # fmt: skip
    assert result == "ok", out
    assert len(exposed.stub.calls) == n and "dough" not in json.dumps(exposed.stub.calls)


def test_offline_no_chat_request_leaves_the_machine(exposed):
    cookie = exposed.cookies["alice"]
    assert gradio_call(exposed.port, "chat_add_user", ["hi", None, None, None], cookie=cookie, session="C")[0] == "ok"
    args = [None, None, "smollm2-135m", "OpenAI-compatible server", "http://10.255.255.1:8000/v1", "m", "k", 4096, "", 0.7,
            0.95, 16, 1.0, ""]  # fmt: skip
    result, detail = gradio_call(exposed.port, "chat_respond", args, cookie=cookie, session="C", timeout=30)
    assert result == "error" and "no request leaves" in detail, detail


def test_sigterm_closes_the_studio_cleanly(exposed):
    """Last in this module: it stops the shared exposed studio."""
    import signal

    exposed.proc.send_signal(signal.SIGTERM)
    assert exposed.proc.wait(30) == 0, exposed.log()[-2000:]
    assert "closing server" in exposed.log()


# ---- launch.py and the launch checks ----------------------------------------------------------------------------
def test_launch_py_forwards_sigterm_and_waits_for_the_studio(tmp_path):
    import signal
    import textwrap
    import time

    child = tmp_path / "child.py"
    child.write_text(
        textwrap.dedent(f"""
        import signal, sys, time, pathlib
        def save(*_):
            time.sleep(0.5)  # a checkpoint being written
            pathlib.Path({str(tmp_path / "saved")!r}).write_text("ok")
            sys.exit(0)
        signal.signal(signal.SIGTERM, save)
        pathlib.Path({str(tmp_path / "ready")!r}).write_text(str(__import__("os").getpid()))
        while True:
            time.sleep(0.05)
    """)
    )
    code = f"import sys, launch; sys.exit(launch.run_forwarding_signals([sys.executable, {str(child)!r}]))"
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(__file__)))
    deadline = time.monotonic() + 20
    while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    child_pid = int((tmp_path / "ready").read_text())
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(20) == 0
    assert (tmp_path / "saved").read_text() == "ok"  # the child was told, and the parent waited for it
    with pytest.raises(ProcessLookupError):
        os.kill(child_pid, 0)


def test_loopback_check_and_auth_file_encoding(tmp_path):
    from studio.app import LaunchRefused, check_launch_safety
    from studio.settings import Settings

    for host in ("127.0.0.1.evil.com", "localhost.evil.com", "1.2.3.4", "0.0.0.0"):
        assert not Settings(host=host).is_loopback
        with pytest.raises(LaunchRefused, match="without a password"):
            check_launch_safety(Settings(host=host))
    assert all(Settings(host=h).is_loopback for h in ("127.0.0.1", "127.1.2.3", "localhost", "::1"))
    latin = tmp_path / "auth.txt"
    latin.write_bytes("jos\xe9:correct-horse-battery\n".encode("latin-1"))
    with pytest.raises(LaunchRefused, match="not UTF-8"):
        check_launch_safety(Settings(host="0.0.0.0", auth_file=latin))


def test_guard_pieces_directly():
    from studio.http_guard import GuardPolicy, HttpGuard, LoginLimiter, blank_api_info, clean_uploads

    html = b'<script>window.gradio_api_info = {"named_endpoints": {"/x": {}}};</script><p>ok</p>'
    assert blank_api_info(html) == b"<script>window.gradio_api_info = null;</script><p>ok</p>"
    limiter = LoginLimiter(attempts=2)
    for _ in range(2):
        limiter.record("1.2.3.4", "eve", ok=False)
    assert limiter.wait_s("1.2.3.4", "eve") > 0 and limiter.wait_s("1.2.3.4", "alice") == 0
    assert limiter.wait_s("5.6.7.8", "eve") == 0
    guard = HttpGuard(None, GuardPolicy(1, 1, 1, 1.0, exposed=True))
    page = {"host": "studio.lan:7860"}
    assert not guard._cross_origin({**page, "origin": "http://studio.lan:7860"})
    assert guard._cross_origin({**page, "origin": "http://evil.example"})
    assert guard._cross_origin({**page, "origin": "null"}) and guard._cross_origin(
        {**page, "sec-fetch-site": "cross-site"}
    )
    assert not guard._cross_origin(
        {"host": "127.0.0.1:7860", "x-forwarded-host": "studio.lan", "origin": "https://studio.lan"}
    )
    assert clean_uploads(__import__("pathlib").Path("/nonexistent-folder"), 1.0) == 0
