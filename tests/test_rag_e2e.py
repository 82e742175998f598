"""RAG tab in a real browser: ingest the sample notes, ask a question, read the cited passage, then run an evaluation
from an uploaded question set and read its scores (slow: a whole studio with the real embedding model)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._studio_server import running_studio

CHROMIUM = Path("/usr/bin/chromium")
QUESTIONS = Path(__file__).resolve().parent.parent / "backends" / "rag" / "questions" / "sample-notes.jsonl"
pytestmark = pytest.mark.slow
if not CHROMIUM.exists():
    pytest.skip("Debian's chromium is not installed (/usr/bin/chromium)", allow_module_level=True)
from playwright import sync_api  # noqa: E402 (pinned; after the chromium check)


def test_rag_tab_ingests_and_answers_with_citations(tmp_path: Path) -> None:
    with running_studio(tmp_path / "studio") as studio, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.set_default_timeout(120_000)
        page.goto(studio.url)
        page.get_by_role("tab", name="RAG", exact=True).click()
        panel = page.get_by_role("tabpanel").locator("visible=true").first
        panel.get_by_text("no reranker installed: ranking by hybrid score").first.wait_for()
        panel.get_by_label("New knowledge base").fill("e2e-notes")
        panel.get_by_role("button", name="Ingest", exact=True).click()
        panel.get_by_text("4 indexed").first.wait_for()
        panel.get_by_text("**e2e-notes**: 4 files").or_(panel.get_by_text("e2e-notes: 4 files")).first.wait_for()
        panel.get_by_label("Write an answer with the chat model").uncheck()
        panel.get_by_label("Question").fill("How much water goes into the dough?")
        panel.get_by_role("button", name="Ask", exact=True).click()
        panel.get_by_text("notes/sourdough.md:8-16").first.wait_for()
        panel.get_by_text("350 g water").first.wait_for()
        panel.get_by_text("Evaluate: score retrieval and answers on a question set").first.click()
        panel.locator("input[type=file]").last.set_input_files(str(QUESTIONS))
        panel.get_by_role("button", name="Run evaluation", exact=True).click()
        panel.get_by_text("Saved as run").first.wait_for()
        panel.get_by_text("6 questions").first.wait_for()
        assert panel.get_by_text("abstention on unanswerable 1.000").count() >= 1
        browser.close()
        assert errors == [], errors
