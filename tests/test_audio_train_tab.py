"""The Audio tab's "Fine-tune Whisper" section: bad folders and zips become short messages; a job is started,
polled to its end (dev WER, example lines, the new model selected in the Whisper list) and can be cancelled."""

from __future__ import annotations

import zipfile

import gradio as gr
import numpy as np
import pytest

from backends.audio import TuneResult, write_wav


@pytest.fixture
def section(ctx):
    import tabs.audio as audio_tab

    with gr.Blocks():
        audio_tab.TAB.build(ctx)
        blocks = gr.context.Context.root_block
    fns = {f.fn.__name__: f.fn for f in blocks.fns.values() if f.fn}  # js-only events have no fn
    assert {"start_job", "poll", "cancel_job"} <= set(fns)
    return fns


def start(fns, folder="", archive=None, **kw):
    args = dict(base_v="whisper-tiny.en", name_v="mine", epochs_v=1, lr_v=1e-5, batch_v=2, lang_v="en",
                method_v="auto", prec_v="auto", optim_v="auto", ckpt_v=True, spec_v=False, freeze_v=False,
                resume_v="")  # fmt: skip
    args.update(kw)
    return fns["start_job"](folder, archive, *args.values())


def _folder(path, n=3):
    path.mkdir()
    for i in range(n):
        write_wav(path / f"a{i}.wav", np.zeros(8000, np.float32) + 0.01)
        (path / f"a{i}.txt").write_text(f"hello {i}", encoding="utf-8")
    return path


def test_bad_training_data_gives_short_messages(section, tmp_path):
    with pytest.raises(gr.Error, match="No training data"):
        start(section)
    with pytest.raises(gr.Error, match="not a folder"):
        start(section, str(tmp_path / "nope"))
    (tmp_path / "bad").mkdir()
    write_wav(tmp_path / "bad" / "x.wav", np.zeros(800, np.float32))
    with pytest.raises(gr.Error, match=r"x\.wav: no transcript"):
        start(section, str(tmp_path / "bad"))
    with pytest.raises(gr.Error, match="output name"):
        start(section, str(_folder(tmp_path / "ok")), name_v="../x")
    (tmp_path / "fake.zip").write_bytes(b"nope")
    with pytest.raises(gr.Error, match="not a zip"):
        start(section, archive=str(tmp_path / "fake.zip"))


def test_a_remote_user_cannot_name_a_server_folder(ctx, tmp_path, monkeypatch):
    import tabs.audio_train as train_tab

    with pytest.raises(gr.Error, match="upload a zip"):
        train_tab._data_folder(ctx, str(tmp_path), None, local=False)


def test_a_job_from_a_zip_runs_to_the_end_and_selects_the_new_model(section, ctx, tmp_path, monkeypatch):
    src = _folder(tmp_path / "clips")
    archive = tmp_path / "clips.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in src.iterdir():
            zf.write(f, f"clips/{f.name}")
    seen = {}

    def fake_train(cfg, job):  # the UI is under test here; the trainer has its own tests
        seen["cfg"] = cfg
        job.set_progress(0.5, "step 1/2")
        return TuneResult("done", "run-1", 2, 0.5, 0.25, [{"reference": "a", "before": "b", "after": "a"}],
                          "whisper-base")  # fmt: skip

    monkeypatch.setattr(ctx.backends.whisper_tuner, "train", fake_train)
    jid, head, *_ = start(section, archive=str(archive))
    assert head.startswith(("Queued **", "Started **")), head
    ctx.jobs.get(jid).wait(30)
    text, _logs, rows, _timer, choices = section["poll"](jid)
    assert "0.500 → 0.250" in text and rows == [["a", "b", "a"]] and choices["value"] == "whisper-base"
    assert (ctx.settings.data_dir / "uploads" / "whisper-data").is_dir()
    assert "clips" in seen["cfg"].data_dir or "whisper-data" in seen["cfg"].data_dir
    assert "Nothing to cancel" in section["cancel_job"](jid)
