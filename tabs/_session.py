"""Small helpers the tabs share: per-session stop flags kept in gr.State, and handlers bound to their backend.

Per-session state lives in `gr.State` (Gradio drops it when the browser tab goes away), never in module dicts
keyed by session hash that grow forever.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any


class StopFlag(threading.Event):
    """A cooperative stop flag that can be the initial value of a gr.State (Gradio deep-copies that per session)."""

    def __deepcopy__(self, memo: dict) -> StopFlag:
        return StopFlag()


def bind(fn: Callable[..., Any], *args: Any) -> Callable[..., Any]:
    """functools.partial that keeps the handler's name (tests and logs find it), not its full signature."""
    bound = functools.partial(fn, *args)
    bound.__name__ = fn.__name__  # type: ignore[attr-defined]
    return bound


def stop_flag_state() -> Any:
    import gradio as gr

    return gr.State(StopFlag())


def on_page_load(fn: Callable[..., Any], inputs: Any = None, outputs: Any = None, **kwargs: Any) -> None:
    """Run `fn` every time a browser opens or reloads the page (the root Blocks' load event)."""
    import gradio as gr

    root = gr.context.Context.root_block
    if root is not None:
        root.load(fn, inputs, outputs, **kwargs)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def job_status(job: Any) -> str:
    """'**running** · 37% · step 370/1000 · 45 s elapsed · ~1 min 17 s left' for a background job."""
    text = f"**{job.status}** · {job.progress:.0%}" + (f" · {job.message}" if job.message else "")
    if job.status == "queued":
        text += " · waiting for the GPU job ahead of it"
    elif job.status == "running":
        ran = job.elapsed()
        text += f" · {_clock(ran)} elapsed"
        if 0.01 <= job.progress < 1.0 and ran > 2:
            text += f" · ~{_clock(ran * (1 - job.progress) / job.progress)} left"
    return text + (f"\n\n**Error:** {job.error}" if job.error else "")


def started_note(job: Any) -> str:
    """What Train said: queued, started, or (a double click, a second tab: `submit(unique=...)` hands back the run
    already under way) running for a while and followed rather than started twice."""
    if job.status == "queued":
        return f"Queued **{job.name}** ({job.id})."
    ran = job.elapsed()
    if job.status == "running" and ran < 2.0:
        return f"Started **{job.name}** ({job.id})."
    return f"**{job.name}** ({job.id}) is already {job.status} ({_clock(ran)}): following it (one run, not two)."


def choices_update(choices: list[tuple[str, str]], current: str | None, default: str | None = None) -> Any:
    """A Dropdown's list as it is now, keeping the pick; else `default`, else the first (None when empty)."""
    import gradio as gr

    ids = [i for _, i in choices]
    value = next((v for v in (current, default) if v in ids), ids[0] if ids else None)
    return gr.update(choices=choices, value=value)


def newest_first(lines: list[str], n: int = 50) -> str:
    """Log lines for a Textbox, newest on top (the box shows its beginning)."""
    return "\n".join(reversed(lines[-n:]))


def waiting_note(ctx: Any, tab: str) -> Any:
    """For a queue=False listener next to a queued event: what the request waits for, or no change when free."""
    import gradio as gr

    from studio.waiting import explain_wait

    return explain_wait(ctx, ctx.queues.queue_id(tab)) or gr.skip()
