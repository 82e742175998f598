"""Models tab: the catalog with where each model comes from and whether it is on this machine; download from the
Hugging Face Hub (only when online) with a progress bar, delete downloaded models, and the disk they use.

Downloads run as background jobs (gpu=False): they continue when the browser is closed and show in the Runs tab.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

from studio.catalog import ModelSpec
from studio.context import StudioContext, Tab
from studio.units import fmt_bytes

log = logging.getLogger(__name__)

HEADERS = ["capability", "key", "status", "size", "on disk", "licence", "source", "title", "notes"]
DEMO_LABEL = "untrained demo model"


def offline_reason(ctx: StudioContext) -> str | None:
    """Why downloads are impossible right now, or None when they are allowed."""
    if ctx.settings.offline:
        return "The studio runs with `offline = true` (setting or --offline); restart without it to download."
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return (
            "The studio is offline (HF_HUB_OFFLINE=1: the Hub was unreachable at start-up, or --offline). "
            "Connect to the network and restart the studio to download."
        )
    return None


def status_of(ctx: StudioContext, spec: ModelSpec) -> str:
    if spec.demo:
        return DEMO_LABEL
    return "present" if ctx.catalog.local_path(spec) is not None else "absent"


def catalog_rows(ctx: StudioContext) -> list[list[str]]:
    rows = []
    for spec in ctx.catalog.specs:
        st = status_of(ctx, spec)
        rows.append(
            [
                spec.capability,
                spec.key,
                st,
                fmt_bytes(spec.expected_bytes or None, missing="-"),
                fmt_bytes(ctx.catalog.disk_bytes(spec)) if st == "present" else "-",
                spec.licence,
                spec.source,
                spec.title,
                spec.notes,
            ]
        )
    return rows


def disk_summary(ctx: StudioContext) -> str:
    cat = ctx.catalog
    downloaded = sum(cat.disk_bytes(s) for s in cat.specs if s.hub_id and not s.package)
    packaged = sum(cat.disk_bytes(s) for s in cat.specs if s.package)
    models_dir = ctx.settings.models_dir
    free = shutil.disk_usage(models_dir if models_dir.exists() else models_dir.parent).free
    return (
        f"**Disk used:** downloaded models {fmt_bytes(downloaded)} in `{models_dir}`; "
        f"models shipped by Python packages {fmt_bytes(packaged)}; free space {fmt_bytes(free)}."
    )


def downloadable(ctx: StudioContext) -> list[str]:
    return [s.key for s in ctx.catalog.specs if s.hub_id and not s.package]


def deletable(ctx: StudioContext) -> list[str]:
    return [k for k in downloadable(ctx) if ctx.catalog.local_path(ctx.catalog.get(k)) is not None]


def job_progress_bar(job):
    """A tqdm class for huggingface_hub.snapshot_download that reports bytes done / total into `job`."""
    from tqdm import tqdm

    class _Null:
        def write(self, _s: str) -> None:
            pass

        def flush(self) -> None:
            pass

    class JobTqdm(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            kwargs["file"] = _Null()
            kwargs["disable"] = False
            # snapshot_download keeps two byte bars: bytes written (reported) and network transfer (compressed
            # with Xet, so its total differs; not reported).
            self._bytes = kwargs.get("unit") == "B" and not str(kwargs.get("desc", "")).startswith("Downloading")
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            out = super().update(n)
            if self._bytes and self.total:
                job.set_progress(min(self.n / self.total, 0.99), f"{fmt_bytes(self.n)} of {fmt_bytes(self.total)}")
            elif self.unit != "B" and self.total:
                job.log(f"{self.n}/{self.total} files")
            return out

    return JobTqdm


def start_download(ctx: StudioContext, key: str | None):
    """Submit a download job; raises ValueError with a user-facing message when it cannot start."""
    reason = offline_reason(ctx)
    if reason:
        raise ValueError(reason)
    if not key:
        raise ValueError("Pick a model to download first.")
    spec = ctx.catalog.get(key)
    if not spec.hub_id or spec.package:
        raise ValueError(f"{spec.title} is not downloaded from the Hub (source: {spec.source}).")
    if ctx.catalog.local_path(spec) is not None:
        raise ValueError(f"{spec.title} is already downloaded.")

    def work(job):
        job.log(f"downloading {spec.hub_id} into {ctx.catalog.hub_dir(spec)}")
        path = ctx.catalog.download(spec, progress=job_progress_bar(job))
        job.set_progress(1.0, "downloaded")
        return str(path)

    return ctx.jobs.submit(f"download {spec.key}", work, gpu=False)


def delete_model(ctx: StudioContext, key: str | None) -> str:
    if not key:
        raise ValueError("Pick a downloaded model to delete first.")
    spec = ctx.catalog.get(key)
    size = ctx.catalog.disk_bytes(spec)
    if ctx.catalog.local_path(spec) is None:
        raise ValueError(f"{spec.title} is not downloaded; nothing to delete.")
    ctx.catalog.delete(spec)
    return f"Deleted {spec.title} ({fmt_bytes(size)} freed)."


def build(ctx: StudioContext) -> None:
    import gradio as gr

    gr.Markdown(
        "## Models\nEvery model the studio knows: where it comes from, its size and licence, and whether it is "
        f"on this machine. Models labelled *{DEMO_LABEL}* are small random networks for wiring tests, not real "
        "models."
    )
    table = gr.Dataframe(value=lambda: catalog_rows(ctx), headers=HEADERS, interactive=False, wrap=True)
    disk = gr.Markdown(value=lambda: disk_summary(ctx))
    reason = offline_reason(ctx)
    with gr.Row():
        pick = gr.Dropdown(choices=downloadable(ctx), label="Model from the Hub", scale=2)
        download = gr.Button("Download", variant="primary", interactive=reason is None, scale=1)
        delete = gr.Button("Delete downloaded", variant="stop", scale=1)
        refresh = gr.Button("Refresh", size="sm", scale=0)
    gr.Markdown(f"Downloads are disabled: {reason}" if reason else "Downloads run in the background (see Runs).")
    result = gr.Markdown("")

    def do_download(key: str | None, progress=gr.Progress()):  # noqa: B008 (gradio idiom)
        try:
            job = start_download(ctx, key)
        except (ValueError, KeyError) as e:
            raise gr.Error(str(e).strip("'\"")) from None
        while not job.wait(0.5):
            progress(job.progress, desc=job.message or "starting")
        if job.status != "done":
            raise gr.Error(f"Download of {key} {job.status}: {job.error or job.message}")
        return f"Downloaded {key} into `{job.result}`."

    def do_delete(key: str | None) -> str:
        try:
            return delete_model(ctx, key)
        except (ValueError, KeyError) as e:
            raise gr.Error(str(e).strip("'\"")) from None

    def refreshed():
        return catalog_rows(ctx), disk_summary(ctx)

    download.click(do_download, pick, result, concurrency_limit=2).then(refreshed, None, [table, disk])
    delete.click(do_delete, pick, result).then(refreshed, None, [table, disk])
    refresh.click(refreshed, None, [table, disk])


TAB = Tab("Models", build)
