"""The studio's OpenAI-compatible API: /v1 routes on the same server and port as the UI (see server.py).

    api.mount(app, ctx)   # studio/app.py: on the guarded Gradio app, before launch

`mount(app, ctx)` adds the routes to any FastAPI app; `ctx.api` (an ApiState) holds the queues, the keys and the
recent-request log that the Settings tab shows.
"""

from __future__ import annotations

import logging
from typing import Any

from studio.api.state import ApiConfigError, ApiState, QueueFull, read_keys

__all__ = ["ApiConfigError", "ApiState", "QueueFull", "check_settings", "mount", "read_keys"]

log = logging.getLogger(__name__)


def check_settings(settings: Any) -> None:
    """Refuse a key file that cannot be read, before anything starts (raises ApiConfigError)."""
    if settings.api_enabled and settings.api_keys_file is not None:
        read_keys(settings.api_keys_file)


def mount(app: Any, ctx: Any) -> ApiState:
    """Add the /v1 routes to `app` (a FastAPI app); returns the API's state."""
    from studio.api.server import router

    state: ApiState = ctx.api
    app.include_router(router(ctx, state))
    s = ctx.settings
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
    state.address = f"http://{host}:{s.port}/v1"
    if state.closed_reason:
        log.warning("OpenAI-compatible API closed: %s", state.closed_reason)
    else:
        auth = "API key required" if state.auth_required else "no API key needed on loopback"
        log.info("OpenAI-compatible API on %s (%s)", state.address, auth)
    return state
