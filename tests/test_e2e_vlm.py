"""Real browser, VLM tab: upload an image in the multimodal box, ask, and watch the demo model's answer stream in."""

from __future__ import annotations

import shutil
import time

import pytest

from tests import _vlm_support
from tests._studio_server import running_studio
from tests._vlm_support import solid
from tests.test_e2e_browser import _new_page, _open, browser  # noqa: F401  (the module's browser fixture)

tiny_llava_folder = _vlm_support.tiny_llava_folder
llm_ctx, llm, smol_folder = _vlm_support.llm_ctx, _vlm_support.llm, _vlm_support.smol_folder


@pytest.mark.slow
def test_upload_an_image_and_get_a_streamed_answer(tmp_path, browser, tiny_llava_folder):  # noqa: F811
    workdir = tmp_path / "studio"
    shutil.copytree(tiny_llava_folder, workdir / "data" / "cache" / "vlm" / tiny_llava_folder.name)
    image = solid(tmp_path / "red.png", "red", (120, 80))
    with running_studio(workdir) as studio:
        page = _new_page(browser, studio.url)
        panel = _open(page, "VLM")
        panel.get_by_text("untrained demo model").first.wait_for()
        panel.locator("input[type=file]").first.set_input_files(image)
        box = panel.get_by_placeholder("Ask about your images (attach one or more)")
        page.wait_for_timeout(1500)  # the upload finishes and shows its thumbnail
        box.fill("What colour is this picture?")
        box.press("Enter")
        bot = panel.locator("[data-testid='bot']").last
        lengths: list[int] = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if bot.count():
                lengths.append(len(bot.inner_text()))
            if panel.get_by_text("finished:").count():
                break
            page.wait_for_timeout(100)
        assert panel.get_by_text("finished:").count(), studio.log()[-3000:]
        assert lengths and lengths[-1] > 0
        assert len(set(lengths)) >= 2, f"the answer arrived in one piece, not streamed: {lengths[:20]}"
        assert panel.locator("[data-testid='user'] img").count() >= 1  # the uploaded image is in the history

        # a double click on Regenerate: the reply is replaced, never duplicated
        regen = panel.get_by_role("button", name="Regenerate")
        regen.click()
        regen.click()
        _wait_finished(panel, page)
        assert panel.locator("[data-testid='bot']").count() == 1

        # Stop during a reply: it ends as "cancelled" and the image stays in the history
        box.fill("Describe it at length, please.")
        box.press("Enter")
        bot.wait_for()
        page.wait_for_function("() => document.querySelectorAll(\"[data-testid='bot']\").length >= 2")
        panel.get_by_role("button", name="Stop").click()
        panel.get_by_text("finished: cancelled").wait_for(timeout=60_000)
        assert page.errors == [], page.errors
        page.close()


def _wait_finished(panel, page, timeout_s: float = 90) -> None:
    """Until the previous status line has gone (a new reply started) and a new one says 'finished:'."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and panel.get_by_text("finished:").count():
        page.wait_for_timeout(50)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not panel.get_by_text("finished:").count():
        page.wait_for_timeout(200)
    page.wait_for_timeout(1000)  # the second queued regeneration, if any, starts and ends too
    while time.monotonic() < deadline and not panel.get_by_text("finished:").count():
        page.wait_for_timeout(200)
