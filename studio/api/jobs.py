"""One API request's work on its own thread, bridged to the event loop; errors in the OpenAI shape.

Why a thread per request: backend generators hold locks and residency leases for their whole run, so every step
must run on the thread that started it (a thread pool would hand steps to different threads). The thread first
waits for its lane's slot (studio/api/state.py), then runs `work(cancel, emit)`; `emit` hands items to the event
loop. A client that disconnects sets `cancel`: a waiting request leaves the queue, a running one stops within one
token (or window, or diffusion step) and its leases end, which frees the GPU.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import JSONResponse, StreamingResponse

from studio.api.state import ApiState, QueueFull, RequestRecord

log = logging.getLogger(__name__)

Work = Callable[[threading.Event, Callable[[Any], None]], Any]


class ApiError(Exception):
    """An error answered in the OpenAI shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    @property
    def kind(self) -> str:
        if self.status == 401:
            return "authentication_error"
        if self.status == 404:
            return "not_found_error"
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ClientGone(Exception):
    """The client closed the connection; nothing is sent back."""


def as_api_error(e: BaseException) -> ApiError:
    """Map a backend exception to an HTTP status: user mistakes 400, missing models 404, busy 503, remote 502."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, QueueFull):
        return ApiError(503, str(e), code="queue_full", headers={"Retry-After": str(e.retry_after_s)})
    name = type(e).__name__
    if name in ("ModelNotAvailable", "ModelMissing"):
        return ApiError(404, str(e), code="model_not_found")
    if name == "ToolsNotSupported":
        return ApiError(400, str(e), code="tools_not_supported", param="tools")
    if name == "GenerationBusy":  # another reply held the generation slot for minutes
        return ApiError(503, str(e), code="busy", headers={"Retry-After": "30"})
    if name == "EngineError":
        return ApiError(502, str(e), code="engine_error")
    if isinstance(e, ValueError):
        return ApiError(400, str(e))
    log.error("API request failed: %s: %s", name, e, exc_info=e)
    return ApiError(500, f"The studio failed on this request ({name}: {e}); see the studio's log.")


class Job:
    def __init__(self, state: ApiState, rec: RequestRecord, work: Work) -> None:
        self.state, self.rec, self.work = state, rec, work
        self.cancel = threading.Event()
        self._loop = asyncio.get_running_loop()
        self._items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._thread = threading.Thread(target=self._run, name=f"api-{rec.route}-{rec.id}", daemon=True)

    def start(self) -> Job:
        self._thread.start()
        return self

    def _put(self, item: tuple[str, Any]) -> None:
        try:
            self._loop.call_soon_threadsafe(self._items.put_nowait, item)
        except RuntimeError:  # the event loop is closed (server shutting down)
            self.cancel.set()

    def _run(self) -> None:
        try:
            with self.state.slot(self.rec, self.cancel) as go:
                if not go:
                    self._put(("cancelled", None))
                    return
                try:
                    result = self.work(self.cancel, lambda item: self._put(("item", item)))
                except BaseException as e:
                    self.rec.status, self.rec.detail = "error", f"{type(e).__name__}: {e}"[:200]
                    raise
            self._put(("done", result))
        except Exception as e:
            self._put(("error", e))

    def next_nowait(self) -> tuple[str, Any] | None:
        """The next (kind, value) if one is already queued, else None (no waiting, no task)."""
        try:
            return self._items.get_nowait()
        except asyncio.QueueEmpty:
            return None

    async def next(self, request: Any) -> tuple[str, Any]:
        """The next (kind, value): 'item', 'done', 'error' or 'cancelled'; polls for a client that went away."""
        ready = self.next_nowait()  # fast path: a queued item needs no wait_for task
        if ready is not None:
            return ready
        while True:
            try:
                return await asyncio.wait_for(self._items.get(), 0.25)
            except TimeoutError:
                if await request.is_disconnected():
                    self.cancel.set()
                    raise ClientGone from None

    async def result(self, request: Any) -> Any:
        """Run to the end (items are dropped; the work returns what the response needs)."""
        while True:
            kind, value = await self.next(request)
            if kind == "done":
                return value
            if kind == "error":
                raise as_api_error(value)
            if kind == "cancelled":
                raise ClientGone


class CancellingStream(StreamingResponse):
    """A streaming response whose job is cancelled however the response ends (finished, failed, disconnected)."""

    def __init__(self, content: AsyncIterator[str], job: Job) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._job.cancel.set()
