"""Security defaults checked against the running studio over HTTP (`python -m studio.app` in a subprocess).

- the file routes serve the outputs folder but never the models, config (studio.toml) or cache folders, nor
  anything reached with `../`, encoded `..` or a symlink;
- uploads above `max_upload_mb` are refused (the cap comes from the studio.toml in the app's folder);
- share or a non-loopback host without an auth file is refused before anything listens; with an auth file the
  API needs a login.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import uuid

import pytest

from tests._studio_server import free_port, running_studio, studio_env

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


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("secure")
    for rel, content in [*CANARIES.values(), PUBLIC]:
        path = workdir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel == "studio.toml":
            content = b"max_upload_mb = 1\n# " + content + b"\n"
        path.write_bytes(content)
    os.symlink(workdir / CANARIES["models"][0], workdir / "data/outputs/link.safetensors")
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


def test_public_bind_with_auth_requires_login(tmp_path):
    auth = tmp_path / "auth.txt"
    auth.write_text("alice:correct-horse-battery\n")
    with running_studio(tmp_path / "w", "--host", "0.0.0.0", "--auth-file", str(auth)) as s:
        status, body = _request(s.port, "GET", "/config")
        assert status == 401, (status, body[:200])
        status, _ = _request(s.port, "GET", "/gradio_api/info")
        assert status == 401
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        status, _ = _request(s.port, "POST", "/login", b"username=alice&password=wrong-password", form)
        assert status in (400, 401)
        status, _ = _request(s.port, "POST", "/login", b"username=alice&password=correct-horse-battery", form)
        assert status == 200
