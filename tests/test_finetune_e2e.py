"""Fine-tune in a real browser (slow): a JSONL file uploaded in the Fine-tune tab trains a SmolLM2 adapter, and the
Chat tab lists it, attaches it and answers with it (differently from the base model)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from backends.finetune.task import write_task
from tests._studio_server import running_studio

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.slow
if not CHROMIUM.exists():
    pytest.skip("Debian's chromium is not installed (/usr/bin/chromium)", allow_module_level=True)
from playwright import sync_api  # noqa: E402 (pinned; after the chromium check)

QUESTION = 'Which Shakespeare play is this line from? "The lady doth protest too much, methinks."'


def _tab(page, title: str):
    page.get_by_role("tab", name=title, exact=True).click()
    return page.get_by_role("tabpanel").locator("visible=true").first


def _ask(panel) -> str:
    before = panel.get_by_test_id("bot").count()
    panel.get_by_placeholder("Type a message and press Enter").fill(QUESTION)
    panel.get_by_role("button", name="Send", exact=True).click()
    reply = panel.get_by_test_id("bot").nth(before)
    reply.wait_for()
    sync_api.expect(panel.get_by_role("button", name="Send", exact=True)).to_be_enabled()
    panel.page.wait_for_timeout(1500)  # the stream's last chunk
    return reply.inner_text().strip()


def _slider(panel, label: str, value: str) -> None:
    box = panel.get_by_label(f"number input for {label}").first
    box.fill(value)
    box.press("Enter")


def _set(panel, label: str, value: str) -> None:
    box = panel.get_by_label(label, exact=True).first
    box.fill(value)
    box.press("Tab")


def test_jsonl_to_an_adapter_answering_in_chat(tmp_path: Path) -> None:
    data = write_task(tmp_path / "my-questions.jsonl", count=40, seed=5)
    with running_studio(tmp_path / "studio") as studio, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.set_default_timeout(300_000)
        page.goto(studio.url)

        chat = _tab(page, "Chat")
        chat.get_by_text("Generation", exact=True).first.click()
        _slider(chat, "Temperature (0 = greedy)", "0")
        _slider(chat, "Max new tokens", "12")
        base_answer = _ask(chat)

        ft = _tab(page, "Fine-tune")
        ft.locator("input[type=file]").first.set_input_files(str(data))
        ft.get_by_text("my-questions.jsonl").first.wait_for()
        _set(ft, "Max length (tokens)", "80")
        ft.get_by_text("Training", exact=True).click()
        _set(ft, "Steps", "10")
        _set(ft, "Batch", "2")
        _set(ft, "Learning rate", "0.002")
        _set(ft, "Adapter name", "e2e-adapter")
        ft.get_by_role("button", name="Check dataset").click()
        ft.get_by_text(re.compile(r"\d+ of 40 records usable")).first.wait_for()
        ft.get_by_role("button", name="Start fine-tune").click()
        ft.get_by_text(re.compile(r"done\*?\*? after 10 steps")).first.wait_for(timeout=1_200_000)
        ft.locator("path[aria-roledescription='line mark']").first.wait_for()
        ft.get_by_text("dev loss").first.wait_for()

        chat = _tab(page, "Chat")
        chat.get_by_text("LoRA adapter", exact=True).click()
        chat.get_by_role("button", name="Refresh", exact=True).click()
        folder = chat.get_by_label("Adapter folder (under the data or models folder)")
        folder.click()
        page.get_by_role("option", name=re.compile("e2e-adapter")).first.click()
        chat.get_by_role("button", name="Attach", exact=True).click()
        chat.get_by_text(
            re.compile(r"Attached adapter|Active: e2e-adapter")
        ).first.wait_for()  # the switch note follows
        adapter_answer = _ask(chat)
        browser.close()
        assert adapter_answer and adapter_answer != base_answer, (base_answer, adapter_answer)
        assert errors == [], errors
