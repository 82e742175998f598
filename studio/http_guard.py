"""The studio's HTTP guard: one ASGI middleware in front of every Gradio route.

Policy (issue 12: a remote user is untrusted once the studio is exposed):
- every request body is capped: `max_body_mb` on every route, the upload route at `upload_request_bytes` for all its
  files together; a body that lies about its length is cut off at the cap (413, nothing parsed);
- uploads count against a per-user quota (`upload_quota_mb` per `upload_keep_hours`; the user is the login, or the
  client address locally) and uploads older than `upload_keep_hours` are deleted (`clean_uploads`);
- when exposed, state-changing requests (POST, PUT, PATCH, DELETE) from a page of another origin are refused (403):
  a browser always names the page's origin, scripts and the Python client send none;
- wrong passwords back off: after `login_attempts` failures for one user from one address (4x that for one address
  over all users) the login answers 429 for 1 s, doubling per further failure up to 5 minutes;
- before login nothing about the API is visible: the login page's embedded API description is blanked (the
  frontend fetches it after login), and FastAPI's /openapi.json and docs routes are off (see `app_kwargs`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
UPLOAD_PATHS = ("/gradio_api/upload", "/upload")
LOGIN_PATHS = ("/login", "/login/")
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}
MAX_BACKOFF_S = 300.0
_API_INFO = b"window.gradio_api_info = "


def app_kwargs() -> dict[str, Any]:
    """FastAPI options for Gradio's App: no /openapi.json, /docs or /redoc, before login or after."""
    return {"openapi_url": None, "docs_url": None, "redoc_url": None}


@dataclass(frozen=True)
class GuardPolicy:
    max_body_bytes: int
    upload_request_bytes: int
    upload_quota_bytes: int
    quota_window_s: float
    exposed: bool
    login_attempts: int = 5
    share: bool = False

    def __post_init__(self) -> None:
        if min(self.max_body_bytes, self.upload_request_bytes, self.upload_quota_bytes) <= 0:
            raise ValueError("request limits must be positive")

    @classmethod
    def from_settings(cls, s: Any) -> GuardPolicy:
        return cls(
            max_body_bytes=int(s.max_body_mb * 2**20),
            upload_request_bytes=s.upload_request_bytes,
            upload_quota_bytes=int(s.upload_quota_mb * 2**20),
            quota_window_s=s.upload_keep_hours * 3600,
            exposed=s.exposed,
            login_attempts=s.login_attempts,
            share=s.share,
        )


class LoginLimiter:
    """Failures per (address, user) and per address; a lock-out that doubles per failure past the allowance."""

    def __init__(self, attempts: int) -> None:
        self.attempts = attempts
        self._fails: dict[tuple[str, str], int] = {}
        self._until: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def _keys(self, addr: str, user: str) -> list[tuple[tuple[str, str], int]]:
        return [((addr, "user:" + user), self.attempts), ((addr, "*"), 4 * self.attempts)]

    def wait_s(self, addr: str, user: str) -> float:
        now = time.monotonic()
        with self._lock:
            return max(0.0, *(self._until.get(k, 0.0) - now for k, _ in self._keys(addr, user)))

    def record(self, addr: str, user: str, ok: bool) -> None:
        with self._lock:
            for key, allowed in self._keys(addr, user):
                if ok and key[1] != "*":
                    self._fails.pop(key, None)
                    self._until.pop(key, None)
                    continue
                if ok:
                    continue
                n = self._fails[key] = self._fails.get(key, 0) + 1
                if n >= allowed:
                    self._until[key] = time.monotonic() + min(2.0 ** (n - allowed), MAX_BACKOFF_S)


class UploadQuota:
    """Bytes each user uploaded within the window (the same window after which uploads are deleted)."""

    def __init__(self, quota_bytes: int, window_s: float) -> None:
        self.quota, self.window = quota_bytes, window_s
        self._used: dict[str, deque[tuple[float, int]]] = {}
        self._lock = threading.Lock()

    def used(self, user: str) -> int:
        now = time.time()
        with self._lock:
            q = self._used.setdefault(user, deque())
            while q and q[0][0] < now - self.window:
                q.popleft()
            return sum(n for _, n in q)

    def add(self, user: str, n: int) -> None:
        with self._lock:
            self._used.setdefault(user, deque()).append((time.time(), n))


def clean_uploads(folder: Path, max_age_s: float) -> int:
    """Delete files under the upload folder older than `max_age_s`, then the folders they leave empty."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    cutoff, removed = time.time() - max_age_s, 0
    for p in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        try:
            if p.is_symlink() or p.is_file():
                if p.lstat().st_mtime < cutoff:
                    p.unlink()
                    removed += 1
            elif p.is_dir() and not any(p.iterdir()):
                p.rmdir()
        except OSError:
            continue
    if removed:
        log.info("deleted %d uploads older than %.0f h from %s", removed, max_age_s / 3600, folder)
    return removed


def start_upload_cleaner(folder: Path, max_age_s: float, every_s: float = 600.0) -> threading.Event:
    """Clean now and then every `every_s` in a daemon thread; set the returned event to stop it."""
    stop = threading.Event()

    def loop() -> None:
        while True:
            clean_uploads(folder, max_age_s)
            if stop.wait(every_s):
                return

    threading.Thread(target=loop, name="upload-cleaner", daemon=True).start()
    return stop


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


async def _reply(send: Send, status: int, detail: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class HttpGuard:
    """ASGI middleware applying GuardPolicy; `gradio_app` (Gradio's App) tells who is logged in."""

    def __init__(self, app: Any, policy: GuardPolicy, gradio_app: Any = None) -> None:
        self.app, self.policy, self.gradio_app = app, policy, gradio_app
        self.logins = LoginLimiter(policy.login_attempts)
        self.quota = UploadQuota(policy.upload_quota_bytes, policy.quota_window_s)

    # ---- who is asking
    def _user(self, scope: Scope, headers: dict[str, str]) -> str | None:
        g = self.gradio_app
        if g is None or getattr(g, "auth", None) is None:
            return None
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:
            return None
        for name in (f"access-token-{g.cookie_id}", f"access-token-unsecure-{g.cookie_id}"):
            token = cookie[name].value if name in cookie else None
            if token and token in g.tokens:
                return g.tokens[token]
        return None

    def _auth_on(self) -> bool:
        return self.gradio_app is not None and getattr(self.gradio_app, "auth", None) is not None

    def _cross_origin(self, headers: dict[str, str]) -> bool:
        origin = headers.get("origin")
        if origin is None:
            return headers.get("sec-fetch-site") == "cross-site"
        host = urlsplit(origin).netloc.lower()
        if not host:
            return True  # "null": a sandboxed frame or a file:// page
        if self.policy.share and host.endswith(".gradio.live"):
            return False
        own = {headers.get("host", "").lower(), *headers.get("x-forwarded-host", "").lower().split(",")}
        return host not in {h.strip() for h in own if h.strip()}  # behind a proxy the page's host is forwarded

    # ---- ASGI entry
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers, method, path = _headers(scope), scope["method"], scope["path"]
        if self.policy.exposed and method in STATE_CHANGING and self._cross_origin(headers):
            log.warning("refused %s %s from origin %r", method, path, headers.get("origin"))
            await _reply(send, 403, "Requests from other sites are refused; open the studio's own page.")
            return
        if method == "POST" and path in LOGIN_PATHS and self._auth_on():
            await self._login(scope, receive, send)
            return
        upload = path in UPLOAD_PATHS
        limit = self.policy.upload_request_bytes if upload else self.policy.max_body_bytes
        try:
            length = int(headers.get("content-length", "0") or 0)
        except ValueError:
            await _reply(send, 400, "Invalid Content-Length.")
            return
        if length > limit:
            await _reply(send, 413, f"Request of {length / 2**20:.1f} MB is over the {limit / 2**20:.1f} MB limit.")
            return
        user = None
        if upload:
            user = self._user(scope, headers) or "addr:" + (scope.get("client") or ("?",))[0]
            used = self.quota.used(user)
            if used + length > self.policy.upload_quota_bytes:
                q = self.policy.upload_quota_bytes / 2**20
                await _reply(send, 413, f"Upload quota reached ({used / 2**20:.0f} of {q:.0f} MB); try again later.")
                return
        if method in ("GET", "HEAD") and path == "/" and self._auth_on() and self._user(scope, headers) is None:
            await self.app(scope, receive, _BlankApiInfo(send))
            return
        await self._capped(scope, receive, send, limit, user)

    async def _capped(self, scope: Scope, receive: Receive, send: Send, limit: int, upload_user: str | None) -> None:
        """Pass the request on, cutting the body off at `limit`; count a successful upload against the quota."""
        seen, over, started, status = 0, False, False, 0

        async def capped_receive() -> dict[str, Any]:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def watched_send(message: dict[str, Any]) -> None:
            nonlocal started, status
            if over and not started:
                return  # the app's own answer to a cut-off body ("error parsing the body") is replaced by ours
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
            await send(message)

        try:
            await self.app(scope, capped_receive, watched_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            await _reply(send, 413, f"Request body is over the {limit / 2**20:.1f} MB limit.")
        if upload_user is not None and status == 200 and not over:
            self.quota.add(upload_user, seen)

    async def _login(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > 65536:
                await _reply(send, 413, "Login form too large.")
                return
            if not message.get("more_body"):
                break
        user = (parse_qs(body.decode("utf-8", "replace")).get("username") or [""])[0].strip()
        addr = (scope.get("client") or ("?",))[0]
        wait = self.logins.wait_s(addr, user)
        if wait > 0:
            await _reply(send, 429, f"Too many wrong passwords: try again in {wait:.0f} s.",
                         [(b"retry-after", str(max(1, round(wait))).encode())])  # fmt: skip
            return
        status = 0
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return {"type": "http.disconnect"}
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def watched(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, replay, watched)
        self.logins.record(addr, user, ok=status == 200)
        if status != 200:
            log.warning("wrong password for %r from %s", user, addr)


class _BlankApiInfo:
    """Wraps `send` for the login page: replaces the embedded API description by `null` (fetched after login)."""

    def __init__(self, send: Send) -> None:
        self.send, self.start, self.chunks = send, None, []

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.start = message
            return
        if message["type"] != "http.response.body":
            await self.send(message)
            return
        self.chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return
        body = blank_api_info(b"".join(self.chunks))
        start = dict(self.start or {"type": "http.response.start", "status": 200, "headers": []})
        start["headers"] = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        start["headers"].append((b"content-length", str(len(body)).encode()))
        await self.send(start)
        await self.send({"type": "http.response.body", "body": body})


def blank_api_info(html: bytes) -> bytes:
    """`window.gradio_api_info = {...};</script>` -> `window.gradio_api_info = null;</script>`."""
    start = html.find(_API_INFO)
    if start < 0:
        return html
    end = html.find(b";</script>", start)
    return html if end < 0 else html[: start + len(_API_INFO)] + b"null" + html[end:]
