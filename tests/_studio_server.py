"""Start the real studio (`python -m studio.app`) in a subprocess on a free port, for HTTP and browser tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Every tab the studio must show, in order: the one list the app, HTTP and browser tests check against.
TAB_TITLES = (
    "Chat",
    "RAG",
    "Image",
    "Vision",
    "Audio",
    "VLM",
    "Fine-tune",
    "Tiny LM lab",
    "Models",
    "GPU",
    "Runs",
    "Settings",
)
START_TIMEOUT_S = 90


@dataclass
class Studio:
    url: str
    port: int
    workdir: Path  # the app's current directory (holds studio.toml)
    data_dir: Path
    models_dir: Path
    log_path: Path
    proc: subprocess.Popen

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def studio_env(**extra: str) -> dict[str, str]:
    # Drop our STUDIO_* settings and the test session's tool folders, so the app sets them up as for a user.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("STUDIO_") and k not in {"GRADIO_TEMP_DIR", "YOLO_CONFIG_DIR"}
    }
    env.update(
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        GRADIO_ANALYTICS_ENABLED="False",
    )
    env.update(extra)
    return env


def wait_for_http(url: str, proc: subprocess.Popen, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the studio exited with code {proc.returncode} before serving")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.25)
    raise TimeoutError(f"the studio did not serve {url} within {timeout:.0f} s")


@contextlib.contextmanager
def running_studio(workdir: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[Studio]:
    """Run `python -m studio.app --port P --no-browser --data-dir ... --models-dir ...` with cwd=workdir."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    data_dir, models_dir = workdir / "data", workdir / "models"
    log_path = workdir / "studio.log"
    cmd = [sys.executable, "-m", "studio.app", "--port", str(port), "--no-browser"]
    cmd += ["--data-dir", str(data_dir), "--models-dir", str(models_dir), *args]
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            cmd, cwd=workdir, env=env or studio_env(), stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    studio = Studio(f"http://127.0.0.1:{port}", port, workdir, data_dir, models_dir, log_path, proc)
    try:
        try:
            wait_for_http(studio.url + "/", proc)
        except (RuntimeError, TimeoutError) as e:
            raise RuntimeError(f"{e}\n--- studio log ---\n{studio.log()[-4000:]}") from None
        yield studio
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    """Ctrl+C first (jobs get their chance to save), then kill."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# ---- a minimal Gradio client over raw HTTP (so tests control cookies, Origin and the session) ----------------
def http_request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """Raw HTTP (no client-side path normalisation); returns (status, headers, body)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def login(port: int, user: str, password: str) -> str:
    """Log in through Gradio's /login form; returns the Cookie header to send afterwards."""
    from http.cookies import SimpleCookie

    form = {"Content-Type": "application/x-www-form-urlencoded"}
    body = f"username={user}&password={password}".encode()
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/login", body=body, headers=form)
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"login as {user} failed: HTTP {resp.status}")
        jar = SimpleCookie()
        for value in resp.headers.get_all("set-cookie") or []:
            jar.load(value)
        return "; ".join(f"{k}={m.value}" for k, m in jar.items())
    finally:
        conn.close()


def gradio_call(port: int, api_name: str, data: list, *, cookie: str = "", session: str = "s1", timeout: float = 120):
    """Run one named event like the browser does (queue join + SSE, or /run/predict for unqueued events).

    Returns ("ok", output data) or ("error", message)."""
    import json

    headers = {"Content-Type": "application/json", **({"Cookie": cookie} if cookie else {})}
    status, _, body = http_request(port, "GET", "/config", headers=headers)
    if status != 200:
        raise RuntimeError(f"/config answered {status}")
    deps = json.loads(body)["dependencies"]
    dep = next(d for d in deps if d.get("api_name") == api_name)
    payload = {"data": data, "fn_index": dep["id"], "session_hash": session, "event_data": None, "trigger_id": None}
    if dep.get("queue") is False:
        status, _, body = http_request(port, "POST", "/gradio_api/run/predict", json.dumps(payload).encode(), headers)
        out = json.loads(body)
        return ("ok", out["data"]) if status == 200 and "data" in out else ("error", str(out.get("error", out)))
    status, _, body = http_request(port, "POST", "/gradio_api/queue/join", json.dumps(payload).encode(), headers)
    if status != 200:
        return "error", f"HTTP {status}: {body[:300]!r}"
    return _read_events(port, session, headers, timeout)


def _read_events(port: int, session: str, headers: dict, timeout: float):
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", f"/gradio_api/queue/data?session_hash={session}", headers=headers)
        resp = conn.getresponse()
        for raw in resp:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            msg = json.loads(line[5:])
            if msg.get("msg") == "process_completed":
                out = msg.get("output") or {}
                if msg.get("success") and "data" in out:
                    return "ok", out["data"]
                return "error", str(out.get("error") or out)
        return "error", "the event stream ended without a result"
    finally:
        conn.close()
