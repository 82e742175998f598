"""Real browser end to end: `python -m studio.app` in a subprocess, headless Debian chromium driven by Playwright.

Opens every tab, checks that something real is visible in each and that no tab failed to load, selects a run in
the Runs tab (its record and metrics line appear), and saves the README screenshot to assets/screenshot.png.
"""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path

import pytest

from tests._studio_server import REPO, TAB_TITLES, running_studio

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(
        "Debian's chromium is not installed (/usr/bin/chromium); apt-get install chromium", allow_module_level=True
    )
from playwright import sync_api  # noqa: E402 (pinned; after the chromium check)

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TABS = TAB_TITLES
FAILED_MARK = "This tab failed to load"
SCREENSHOT = REPO / "assets" / "screenshot.png"
SCREENSHOT_MAX_BYTES = 300_000


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    from studio.runs import RunStore

    workdir = tmp_path_factory.mktemp("e2e")
    run = RunStore(workdir / "data" / "runs").create("sd_lora", {"rank": 8, "lr": 1e-4}, seed=11)
    for step in range(10):
        run.log_metrics(step, loss=1.0 / (step + 1))
    run.finish("done", final_loss=0.1)
    with running_studio(workdir) as s:
        s.seeded_run = run.id
        yield s


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def _new_page(browser, url: str):
    pg = browser.new_page(viewport={"width": 1280, "height": 800})
    pg.errors = []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.set_default_timeout(20_000)
    pg.goto(url)
    pg.get_by_text("OneCard Studio").first.wait_for()
    return pg


@pytest.fixture(scope="module")
def page(browser, studio):
    pg = _new_page(browser, studio.url)
    yield pg
    pg.close()


def _open(page, title: str):
    page.get_by_role("tab", name=title, exact=True).click()
    panel = page.get_by_role("tabpanel").locator("visible=true").first
    panel.wait_for()
    return panel


def _visible(locator):
    return locator.locator("visible=true").first


def test_every_tab_opens_and_shows_content(page):
    names = [t.strip() for t in page.get_by_role("tab").all_inner_texts()]
    problems = [f"tab {t!r} missing from the page (found {names})" for t in TABS if t not in names]
    for title in (t for t in TABS if t in names):
        panel = _open(page, title)
        text = panel.inner_text()
        if FAILED_MARK in text:
            problems.append(f"tab {title!r}: {text.strip()[:200]}")
        elif len(text.strip()) < 20:
            problems.append(f"tab {title!r} shows almost nothing: {text!r}")
        else:
            _visible(panel.locator("h1, h2, h3, button, table, textarea, input")).wait_for()
    assert not problems, "\n".join(problems)
    assert page.errors == [], page.errors


def test_models_tab_lists_catalog_and_explains_offline(page):
    panel = _open(page, "Models")
    _visible(panel.get_by_text("chat:smollm2-135m")).wait_for()
    _visible(panel.get_by_text("untrained demo model")).wait_for()
    _visible(panel.get_by_text("Downloads are disabled")).wait_for()  # the test app runs offline
    assert panel.get_by_role("button", name="Download", exact=True).is_disabled()
    _visible(panel.get_by_text("Disk used")).wait_for()


def test_runs_tab_shows_record_and_metrics_plot(page, studio):
    panel = _open(page, "Runs")
    _visible(panel.get_by_text("Background jobs")).wait_for()
    _visible(panel.get_by_text(studio.seeded_run)).click()
    _visible(panel.get_by_text('"rank"')).wait_for()
    _visible(panel.get_by_text("final_loss")).wait_for()
    _visible(panel.locator("path[aria-roledescription='line mark']")).wait_for()


def test_screenshot_for_the_readme(page, tmp_path):
    """A screenshot under 300 KB; with STUDIO_UPDATE_SCREENSHOT=1 it replaces assets/screenshot.png (README)."""
    _open(page, "Models")
    png = page.screenshot()
    if len(png) > SCREENSHOT_MAX_BYTES:
        from PIL import Image

        img = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=128)
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=True)
        png = buf.getvalue()
    assert 10_000 < len(png) < SCREENSHOT_MAX_BYTES
    target = SCREENSHOT if os.environ.get("STUDIO_UPDATE_SCREENSHOT") == "1" else tmp_path / "screenshot.png"
    target.parent.mkdir(exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(png)
    shutil.move(tmp, target)


def test_jobs_panel_shows_live_progress_and_cancels(tmp_path, browser):
    """In-process studio with a real background job: the panel refreshes by itself and Cancel stops the job."""
    import threading

    from studio.app import build_context, launch
    from studio.settings import Settings
    from tests._studio_server import free_port

    settings = Settings(
        data_dir=tmp_path / "data", models_dir=tmp_path / "models", port=free_port(), open_browser=False
    )
    ctx = build_context(settings)
    saved = threading.Event()

    def train(job):
        job.set_progress(0.42, "epoch 3/7")
        job.log("loss 0.123")
        while not job.should_stop():
            job.wait(0.02)
        saved.set()
        return "checkpoint"

    demo = launch(ctx, prevent_thread_lock=True)
    job = ctx.jobs.submit("e2e train", train)
    try:
        pg = _new_page(browser, f"http://127.0.0.1:{settings.port}")
        panel = _open(pg, "Runs")
        _visible(panel.get_by_text("epoch 3/7")).wait_for()  # arrives through the gr.Timer refresh
        _visible(panel.get_by_text("42%")).wait_for()
        job_log = panel.get_by_label("Job log")
        sync_api.expect(job_log).to_have_value(re.compile("loss 0.123"))  # log of the auto-selected job
        panel.get_by_role("button", name="Cancel job").click()
        _visible(panel.get_by_text("Asked")).wait_for()
        assert job.wait(10) and saved.is_set()
        assert job.status == "cancelled" and job.result == "checkpoint"
        _visible(panel.get_by_text("cancelled", exact=True)).wait_for()  # status column, by the next refresh
        assert pg.errors == [], pg.errors
        pg.close()
    finally:
        demo.close()
        ctx.jobs.shutdown(timeout=5)
