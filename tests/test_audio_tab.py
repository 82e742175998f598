"""The Audio tab: builds without torch, and its handlers stream, stop, report errors and export."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest

import tabs.audio as audio_tab
from backends.audio import write_wav
from studio.bench.asr_data import SENTENCES, espeak_available, synthesize
from tabs._session import StopFlag
from tests._whisper_support import tiny_en_hf  # noqa: F401 (session fixture)

ROOT = Path(__file__).resolve().parents[1]


def test_tab_module_does_not_import_torch():
    code = "import sys, tabs.audio; assert 'torch' not in sys.modules, 'tabs.audio imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.fixture
def handlers(ctx):
    import tabs.audio as audio_tab

    with gr.Blocks():
        audio_tab.TAB.build(ctx)
        blocks = gr.context.Context.root_block
    fns = {f.fn.__name__: f.fn for f in blocks.fns.values() if f.fn}  # js-only events have no fn
    assert {"transcribe", "request_stop", "post_edit", "export"} <= set(fns)
    return fns


def call_transcribe(fns, audio=None, video=None, session="s1", **kw):
    args = dict(model_v="whisper-tiny.en", lang_v="auto", vad_v=True, words_v=False, batched_v=False, diar_v=False,
                n_v=0, engine_v="offline", src_v="", asr_engine_v="faster-whisper", carry_v=False)  # fmt: skip
    args.update(kw)
    from tabs._session import StopFlag

    return list(fns["transcribe"](audio, video, *args.values(), StopFlag()))


def test_errors_become_short_messages(handlers, tmp_path):
    with pytest.raises(gr.Error, match="No audio yet"):
        call_transcribe(handlers)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(gr.Error, match="0 bytes"):
        call_transcribe(handlers, audio=str(empty))
    silence = write_wav(tmp_path / "s.wav", np.zeros(16000, np.float32))
    with pytest.raises(gr.Error, match="English-only"):
        call_transcribe(handlers, audio=str(silence), lang_v="de")
    with pytest.raises(gr.Error, match="transcribe something first"):
        handlers["export"](None, ["txt"])
    with pytest.raises(gr.Error, match="transcribe something first"):
        handlers["post_edit"](None, "", StopFlag())


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng missing (apt-get install -y espeak-ng)")
def test_transcribe_streams_then_exports(handlers, ctx, tmp_path):
    clip = np.concatenate([synthesize(SENTENCES[0]), np.zeros(40000, np.float32), synthesize(SENTENCES[2])])
    path = write_wav(tmp_path / "talk.wav", clip)
    outputs = call_transcribe(handlers, video=str(path), diar_v=True, n_v=1)  # the File input wins over Audio
    statuses = [o[0] for o in outputs]
    assert statuses[0].startswith("Loading") and "%" in statuses[1]
    status, text, tr, _, rows, speakers = outputs[-1]
    assert status.startswith("**Done**") and "SPEAKER_1" in text and "meeting" in text.lower()
    assert tr.segments and all(s.speaker == "SPEAKER_1" for s in tr.segments)
    assert len(rows) == len(tr.segments) and speakers == [["SPEAKER_1", "SPEAKER_1"]]
    assert len({s.avg_logprob for s in tr.segments}) == len(tr.segments)  # each segment its own confidence
    tr, text, rows, speakers = audio_tab.rename_speakers(tr, [["SPEAKER_1", "Ada"]])
    assert "Ada:" in text and rows[0][3] == "Ada" and speakers == [["Ada", "Ada"]]
    files = handlers["export"](tr, ["srt", "json"])
    assert [Path(f).suffix for f in files] == [".srt", ".json"]
    assert all(Path(f).parent == (ctx.settings.outputs_dir / "audio").resolve() for f in files)
    assert "-->" in Path(files[0]).read_text()
    with pytest.raises(gr.Error, match="Tick at least one"):
        handlers["export"](tr, [])


def _click(row: int, rows=None):
    return SimpleNamespace(index=[row, 0], row_value=rows[row] if rows else None)


def test_click_seeks_the_main_player_to_the_segment_start(tmp_path):
    """A click moves the main player (not a second one) to the segment's start; nothing to seek: nothing changes."""
    from backends.audio import Segment, Transcript

    segs = [Segment(0.5, 2.0, "one", speaker="A"), Segment(3.4, 5.0, "two", speaker="B")]
    tr, path = Transcript(segs, "en", 5.0, "whisper-tiny.en"), str(tmp_path / "talk.wav")
    rows = audio_tab.segment_rows(segs)
    update, note, t = audio_tab.seek_segment(tr, path, path, _click(1, rows))
    assert update == gr.skip() and t == 3.4 and "segment 1 from 0:03.4" in note  # the player keeps its audio
    assert audio_tab.apply_seek(t) == {"__type__": "update", "playback_position": 3.4}  # then (in the browser) seeks
    assert audio_tab.apply_seek(-1.0) == gr.skip()
    rows_sorted = [rows[1], rows[0]]  # the user sorted the table: the '#' cell still names the segment
    assert audio_tab.seek_segment(tr, path, path, _click(0, rows_sorted))[2] == 3.4
    update, note, t = audio_tab.seek_segment(tr, path, None, _click(0))  # file box input: the player was empty
    assert update == path and t == 0.5
    update, note, t = audio_tab.seek_segment(tr, str(tmp_path / "talk.mkv"), None, _click(0))
    assert update == gr.skip() and t == -1.0 and "talk.mkv does not play in the browser" in note
    update, note, t = audio_tab.seek_segment(tr, path, str(tmp_path / "other.ogg"), _click(0))
    assert update == gr.skip()
    assert t == -1.0 and "another recording" in note and "talk.wav" in note
    for state, src, evt in [(None, path, _click(0)), (tr, None, _click(0)), (tr, path, _click(7)),
                            (tr, path, SimpleNamespace(index=[0, 0], row_value=["", "", ""]))]:  # fmt: skip
        assert audio_tab.seek_segment(state, src, path, evt)[2] == -1.0  # no audio yet, no row, an empty row


def test_segment_rows_stream_so_a_click_works_during_a_transcription(tmp_path):
    """Each update with new segments sends the table (clickable at once); the start clears the last transcript's."""
    import contextlib

    from backends.audio import AsrUpdate, Segment, Transcript

    segs = [Segment(0.5, 2.0, "one"), Segment(3.4, 5.0, "two")]
    updates = [AsrUpdate((segs[0],), 2.5, 5.0, "en"), AsrUpdate((), 3.0, 5.0, "en"), AsrUpdate((segs[1],), 5.0, 5.0, "en"),
               AsrUpdate((), 5.0, 5.0, "en", transcript=Transcript(segs, "en", 5.0, "whisper-tiny.en"))]  # fmt: skip
    queues = SimpleNamespace(queue_id=lambda tab: tab, hold=lambda *a: contextlib.nullcontext())
    ctx = SimpleNamespace(queues=queues, backends=SimpleNamespace(asr=SimpleNamespace(stream=lambda *a, **k: updates)),
                          settings=SimpleNamespace(max_upload_mb=10))  # fmt: skip
    path = write_wav(tmp_path / "talk.wav", np.zeros(16000, np.float32))
    out = list(audio_tab.transcribe(ctx, str(path), None, "whisper-tiny.en", "auto", True, False, False, False, 0,
                                    "offline", "", "faster-whisper", False, StopFlag()))  # fmt: skip
    assert out[0][4] == [] and out[0][5] == []  # the previous transcript's rows and speakers go at the start
    assert [len(o[4]) if isinstance(o[4], list) else None for o in out[1:]] == [1, None, 2, 2]  # skip: no new rows
    tr = out[1][2]  # the partial transcript a click during the run reads
    assert audio_tab.seek_segment(tr, str(path), str(path), _click(0, out[1][4]))[2] == 0.5


def test_stop_flag_is_per_session(handlers, tmp_path):
    from tabs._session import StopFlag

    assert handlers["request_stop"](StopFlag()).startswith("Stopping")
    silence = write_wav(tmp_path / "s.wav", np.zeros(3 * 16000, np.float32))
    status, text, tr, *_ = call_transcribe(handlers, audio=str(silence), session="s2")[-1]
    assert "no speech found" in status and text == "" and tr.segments == []


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng missing (apt-get install -y espeak-ng)")
def test_torch_engine_is_selectable(handlers, ctx, tmp_path, tiny_en_hf):  # noqa: F811
    """The Whisper engine radio: 'torch' transcribes through transformers' Whisper (tiny.en converted once)."""
    import shutil

    from backends.audio.wer import wer

    shutil.copytree(tiny_en_hf, ctx.settings.cache_dir / "whisper-hf" / "whisper-tiny.en")
    path = write_wav(tmp_path / "one.wav", synthesize(SENTENCES[0]))
    status, text, tr, *_ = call_transcribe(handlers, audio=str(path), asr_engine_v="torch", carry_v=True)[-1]
    assert status.startswith("**Done**") and wer([SENTENCES[0]], [tr.text]) < 0.2, text
    assert ctx.residency.is_registered("asr-torch:whisper-tiny.en")
    with pytest.raises(gr.Error, match="word timestamps need the faster-whisper engine"):
        call_transcribe(handlers, audio=str(path), asr_engine_v="torch", words_v=True)
