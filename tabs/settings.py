"""Settings tab: every setting with its description, editable; saved to studio.toml atomically.

Changes are checked by the same validation as studio.toml (unknown keys and bad values refused with the same
messages). The VRAM and RAM caps apply at once; everything else is saved and flagged "needs a restart". When the
studio is exposed (share, or a non-loopback host) the tab is read-only: a remote user must not choose server paths.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from studio.context import StudioContext, Tab
from tabs._session import bind

log = logging.getLogger(__name__)
CONFIG_FILE = Path("studio.toml")  # the file `launch.py` reads by default, in the folder it starts from


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


TAB = Tab("Settings", build)
