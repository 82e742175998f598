"""Settings tab: every setting with its current value and description, and the /v1 API's address, auth and queue."""

from __future__ import annotations

import time
from typing import Any

from studio.context import StudioContext, Tab

REFRESH_S = 2.0
REQUEST_HEADERS = ["time", "route", "model", "status", "wait", "run", "tokens/items", "detail"]


def _secs(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.1f} s"


def api_markdown(snap: dict[str, Any]) -> str:
    """Address, auth and queue lengths of the OpenAI-compatible API (keys are never shown)."""
    if not snap["enabled"]:
        reason = snap["closed_reason"] or "turned off (api_enabled = false)"
        return f"### OpenAI-compatible API\n**Closed:** {reason}"
    queues = " · ".join(f"{n}: {q['running']} running, {q['waiting']} waiting" for n, q in snap["queues"].items())
    address = snap["address"] or "(starts with the server)"
    return (
        f"### OpenAI-compatible API\nBase URL **`{address}`** · API key: **{snap['auth']}** · queue bound "
        f"{snap['max_waiting']} waiting per kind\n\n{queues}"
    )


def request_rows(snap: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in snap["recent"]:
        when = time.strftime("%H:%M:%S", time.localtime(r["arrived"]))
        rows.append([when, r["route"], r["model"], r["status"], _secs(r["wait_s"]), _secs(r["run_s"]),
                     str(r["tokens"]), r["detail"]])  # fmt: skip
    return rows


def build(ctx: StudioContext) -> None:
    import gradio as gr

    rows = [
        [name, "" if value is None else str(value), desc] for name, value, desc in ctx.settings.field_descriptions()
    ]
    gr.Markdown(
        "## Settings\nSet them in `studio.toml` (in the folder you launch from), as `STUDIO_<NAME>` environment "
        "variables, or as `launch.py` flags (`--vram-cap-gb 10`); later sources win. Misspelled keys are refused "
        "with a suggestion. The VRAM cap can also be changed live in the GPU tab."
    )
    gr.Dataframe(rows, headers=["setting", "value", "description"], interactive=False, wrap=True)
    snap = ctx.api.snapshot()
    api_md = gr.Markdown(api_markdown(snap))
    gr.Markdown("Recent API requests (newest first): time waiting in the queue and running.")
    requests = gr.Dataframe(request_rows(snap), headers=REQUEST_HEADERS, interactive=False, wrap=True)

    def tick():
        s = ctx.api.snapshot()
        return api_markdown(s), request_rows(s)

    gr.Timer(REFRESH_S).tick(tick, outputs=[api_md, requests], show_progress="hidden", queue=False)


TAB = Tab("Settings", build)
