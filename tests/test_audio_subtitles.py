"""Exports: SRT/VTT timing and cue splitting, speakers, TXT paragraphs, JSON round trip, safe file names."""

from __future__ import annotations

import json
import re

import pytest

from backends.audio.asr import Segment, Transcript, Word
from backends.audio.diarize import SpeakerTurn
from backends.audio.subtitles import LINE_CHARS, export, timestamp, to_json, to_srt, to_txt, to_vtt


def transcript(with_words: bool = True) -> Transcript:
    long_words = [Word(10.0 + 0.4 * i, 10.3 + 0.4 * i, f" word{i}", 0.9, "SPEAKER_2") for i in range(30)]
    segs = [
        Segment(0.5, 2.25, "Hello there.", (Word(0.5, 1.0, " Hello", 0.9), Word(1.1, 2.25, " there.", 0.8)), "SPEAKER_1"),
        Segment(2.5, 3.0, "Fine --> thanks.", (), "SPEAKER_1"),
        Segment(10.0, 22.0, "".join(w.text for w in long_words).strip(), tuple(long_words) if with_words else (),
                "SPEAKER_2"),
    ]  # fmt: skip
    turns = [SpeakerTurn(0.5, 3.0, "SPEAKER_1"), SpeakerTurn(10.0, 22.0, "SPEAKER_2")]
    return Transcript(segs, "en", 3725.5, "whisper-tiny.en", speakers=turns)


def test_timestamp_formats():
    assert timestamp(3725.5) == "01:02:05,500"
    assert timestamp(0.0004, ".") == "00:00:00.000"
    assert timestamp(59.9996) == "00:01:00,000"


@pytest.mark.parametrize("with_words", [True, False])
def test_srt_cues_are_numbered_timed_and_short(with_words):
    srt = to_srt(transcript(with_words))
    blocks = srt.strip().split("\n\n")
    assert [b.splitlines()[0] for b in blocks] == [str(i) for i in range(1, len(blocks) + 1)]
    assert len(blocks) > 3, "the long segment is split into several cues"
    times = [re.match(r"(\S+) --> (\S+)", b.splitlines()[1]).groups() for b in blocks]
    assert times[0] == ("00:00:00,500", "00:00:02,250")
    assert all(a <= b for a, b in times) and [t[0] for t in times] == sorted(t[0] for t in times)
    for b in blocks:
        lines = b.splitlines()[2:]
        assert all(len(line) <= LINE_CHARS + len("SPEAKER_2: ") for line in lines)
    assert blocks[0].endswith("SPEAKER_1: Hello there.")
    if with_words:  # cue boundaries come from the words' own times
        assert times[-1][1] == timestamp(10.3 + 0.4 * 29)


def test_vtt_has_header_voices_and_no_arrow_in_text():
    vtt = to_vtt(transcript())
    assert vtt.startswith("WEBVTT\n")
    assert "00:00:00.500 --> 00:00:02.250\n<v SPEAKER_1>Hello there." in vtt
    assert "Fine -> thanks." in vtt and vtt.count("-->") == to_srt(transcript()).count("-->")


def test_txt_groups_a_speaker_turn():
    txt = to_txt(transcript())
    assert txt.splitlines()[0] == "[00:00:00] SPEAKER_1: Hello there. Fine --> thanks."
    assert txt.splitlines()[1].startswith("[00:00:10] SPEAKER_2: word0 word1")


def test_json_round_trip():
    data = json.loads(to_json(transcript()))
    assert data["language"] == "en" and data["model"] == "whisper-tiny.en"
    assert data["segments"][0]["words"][1] == {"start": 1.1, "end": 2.25, "text": " there.", "probability": 0.8,
                                               "speaker": None}  # fmt: skip
    assert data["speakers"][1] == {"start": 10.0, "end": 22.0, "speaker": "SPEAKER_2"}


def test_export_writes_files_with_a_safe_name(tmp_path):
    paths = export(transcript(), tmp_path / "out", "../../etc/passwd", ("txt", "srt", "vtt", "json"))
    assert set(paths) == {"txt", "srt", "vtt", "json"}
    for p in paths.values():
        assert p.parent == (tmp_path / "out").resolve() and p.stat().st_size > 0
    with pytest.raises(ValueError, match="unknown export format"):
        export(transcript(), tmp_path, "x", ("docx",))


def test_empty_transcript_exports_cleanly(tmp_path):
    empty = Transcript([], None, 0.0, "whisper-tiny.en")
    assert to_srt(empty) == "" and to_txt(empty) == "" and to_vtt(empty) == "WEBVTT\n"
    assert json.loads(to_json(empty))["segments"] == []
