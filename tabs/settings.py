"""Settings tab: every setting with its description, editable, saved to studio.toml atomically; and the /v1 API's
address, auth and queue.

Changes are checked by the same validation as studio.toml (unknown keys and bad values refused with the same
messages). The VRAM and RAM caps apply at once; everything else is saved and flagged "needs a restart". When the
studio is exposed (share, or a non-loopback host) the tab is read-only: a remote user must not choose server paths.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from studio.context import StudioContext, Tab
from tabs._session import bind

log = logging.getLogger(__name__)
CONFIG_FILE = Path("studio.toml")  # the file `launch.py` reads by default, in the folder it starts from

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


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def save_settings(ctx: StudioContext, path: Path, *texts: str) -> str:
    """Validate the edited values, write the changed ones to `path`, apply the live ones; returns a report."""
    import gradio as gr

    from studio.settings import LIVE_KEYS, SettingsError, save_toml, with_changes

    current = ctx.settings
    names = list(type(current).model_fields)
    changes = {k: (t or "").strip() for k, t in zip(names, texts, strict=True)
               if (t or "").strip() != _text(getattr(current, k))}  # fmt: skip
    if not changes:
        return "Nothing changed."
    try:
        new = with_changes(current, changes)
        save_toml(path, new, list(changes))
    except SettingsError as e:
        log.info("settings refused: %s", e)
        raise gr.Error(str(e)) from None
    except OSError as e:
        raise gr.Error(f"Could not write {path}: {e}") from None
    live = [k for k in changes if k in LIVE_KEYS]
    if live:
        ram = new.ram_cap_gb * 2**30 if new.ram_cap_gb else ctx.residency.ram_cap_bytes
        ctx.residency.set_caps(int(new.vram_cap_gb * 2**30) if new.vram_cap_gb else None, int(ram))
    later = [k for k in changes if k not in LIVE_KEYS]
    parts = [f"Saved {', '.join(f'`{k}`' for k in changes)} to `{path.resolve()}`."]
    if live:
        parts.append(f"Applied now: {', '.join(live)}.")
    if later:
        parts.append(f"**Needs a restart:** {', '.join(later)}.")
    parts.append("STUDIO_* environment variables and launch flags still override the file.")
    return " ".join(parts)


def build(ctx: StudioContext, config_file: Path = CONFIG_FILE) -> None:
    import gradio as gr

    s = ctx.settings
    editable = s.is_loopback and not s.share
    gr.Markdown(
        "## Settings\nEdit and press **Save**: values are checked like `studio.toml` (misspelled keys and wrong "
        "types are refused), written to `studio.toml` in the folder the studio started from, and the VRAM/RAM caps "
        "apply at once; other changes take effect after a restart. `STUDIO_<NAME>` environment variables and "
        "`launch.py` flags (`--vram-cap-gb 10`) win over the file. Empty = the default."
        + (
            ""
            if editable
            else "\n\n**Read-only:** the studio is exposed to the network, so settings are not "
            "editable from the browser; edit `studio.toml` on the machine."
        )
    )
    boxes = []
    with gr.Group():
        for name, value, desc in s.field_descriptions():
            boxes.append(gr.Textbox(_text(value), label=name, info=desc, interactive=editable, max_lines=1))
    save = gr.Button("Save", variant="primary", interactive=editable)
    report = gr.Markdown("")
    if editable:
        save.click(bind(save_settings, ctx, config_file), boxes, report)
    snap = ctx.api.snapshot()
    api_md = gr.Markdown(api_markdown(snap))
    gr.Markdown("Recent API requests (newest first): time waiting in the queue and running.")
    requests = gr.Dataframe(request_rows(snap), headers=REQUEST_HEADERS, interactive=False, wrap=True)

    def tick():
        snap = ctx.api.snapshot()
        return api_markdown(snap), request_rows(snap)

    gr.Timer(REFRESH_S).tick(tick, outputs=[api_md, requests], show_progress="hidden", queue=False)


TAB = Tab("Settings", build)
