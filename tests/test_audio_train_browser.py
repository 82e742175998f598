"""The Audio tab's "Fine-tune Whisper" section in a real browser, as a user does it (slow: a launched studio, a
short fine-tune of the real tiny.en, its export to CTranslate2 and a transcription with the result).

Headless Debian chromium driven by Playwright against `python -m studio.app`: point the section at a folder of
espeak-ng clips with a .txt beside each, train one epoch with the encoder frozen, wait for the job to finish (dev
WER before -> after shown), see `tuned:<name>` selected in the Whisper model list, and transcribe a clip with it.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from backends.audio import write_wav
from studio.bench.asr_data import espeak_available, synthesize
from tests._studio_server import running_studio
from tests._whisper_support import tiny_en_hf  # noqa: F401 (session fixture)
from tests.test_e2e_browser import _new_page, _open, _upload, _visible, browser  # noqa: F401 (skips without chromium)

pytestmark = [
    pytest.mark.slow,  # ~2.5 min on the loaded 2-core machine: a studio subprocess, a fine-tune + export, a transcription
    pytest.mark.skipif(not espeak_available(), reason="espeak-ng missing (apt-get install -y espeak-ng)"),
]
WAIT_MS = 600_000  # a loaded 2-core machine


def _clips(folder: Path, n: int = 6) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        text = f"Please call Zorvex at number {i}."
        write_wav(folder / f"s{i}.wav", synthesize(text, "en-us"))
        (folder / f"s{i}.txt").write_text(text, encoding="utf-8")
    return folder


def test_fine_tune_in_the_browser_then_transcribe_with_the_result(tmp_path, tiny_en_hf, browser):  # noqa: F811

    data = _clips(tmp_path / "recordings")
    workdir = tmp_path / "studio"
    shutil.copytree(tiny_en_hf, workdir / "data" / "cache" / "whisper-hf" / "whisper-tiny.en")  # converted once
    with running_studio(workdir) as studio:
        page = _new_page(browser, studio.url)
        page.set_default_timeout(30_000)
        panel = _open(page, "Audio")
        panel.get_by_text("Fine-tune Whisper", exact=True).click()  # the accordion
        panel.get_by_label("Training folder on this computer").fill(str(data))
        panel.get_by_label("Name of the tuned model").fill("zorvex")
        panel.get_by_label("Epochs").fill("1")
        panel.get_by_label("Batch size").fill("4")
        panel.get_by_text("Advanced", exact=True).click()
        panel.get_by_label("Freeze the encoder (names and vocabulary only)").check()
        panel.get_by_label("Gradient checkpointing").uncheck()
        panel.get_by_role("button", name="Start fine-tuning").click()
        _visible(panel.get_by_text(re.compile(r"Queued|Started|running"))).wait_for(timeout=60_000)
        done = _visible(panel.get_by_text(re.compile(r"Model \*?\*?tuned:zorvex")))
        done.wait_for(timeout=WAIT_MS)
        assert "Dev WER" in done.inner_text() or "steps" in done.inner_text(), done.inner_text()
        model_box = panel.get_by_label("Whisper model")
        assert "zorvex" in model_box.input_value(), model_box.input_value()  # selected for the next transcription
        _upload(panel, data / "s1.wav")
        panel.get_by_role("button", name="Transcribe", exact=True).click()
        _visible(panel.get_by_text(re.compile(r"\*?Done"))).wait_for(timeout=WAIT_MS)
        text = panel.get_by_label("Transcript").input_value()
        assert "call" in text.lower(), text
        assert (
            "tuned:zorvex" in studio.log() or (workdir / "models" / "whisper-tuned" / "zorvex" / "model.bin").is_file()
        )
        assert page.errors == [], page.errors
        page.close()
