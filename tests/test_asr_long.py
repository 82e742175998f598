"""Long recordings are streamed: memory stays bounded and timestamps stay right far into the file."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import psutil
import pytest

from backends.audio.asr import TranscribeOptions
from studio.bench.asr_data import SENTENCES, espeak_available, synthesize

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng missing (apt-get install -y espeak-ng)")
SR = 16_000


def write_long_wav(path: Path, seconds: int, speech: dict[int, np.ndarray]) -> Path:
    """A long 16 kHz WAV written minute by minute (never whole in memory): faint noise plus speech at offsets."""
    rng = np.random.default_rng(0)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        for start in range(0, seconds, 60):
            block = 0.002 * rng.standard_normal(60 * SR)
            for at, clip in speech.items():
                if start <= at < start + 60:
                    i = (at - start) * SR
                    block[i : i + clip.size] += clip[: block.size - i]
            w.writeframes((np.clip(block, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def run_long(ctx, tmp_path, minutes: int, offsets: list[int]):
    """Transcribe a long file; return the transcript and (audio position, RSS in MB) after every update."""
    speech = {at: synthesize(SENTENCES[i % len(SENTENCES)]) for i, at in enumerate(offsets)}
    path = write_long_wav(tmp_path / "long.wav", minutes * 60, speech)
    asr = ctx.backends.asr
    asr.transcribe(write_long_wav(tmp_path / "warm.wav", 60, {5: speech[offsets[0]]}))  # model + VAD loaded first
    proc, trace, tr = psutil.Process(), [], None
    for update in asr.stream(path, TranscribeOptions()):
        trace.append((update.position_s, proc.memory_info().rss / 2**20))
        tr = update.transcript or tr
    return tr, trace


def rss_between(trace, a: float, b: float) -> list[float]:
    return [mb for pos, mb in trace if a <= pos <= b]


def test_twenty_minutes_stream_in_bounded_memory(ctx, tmp_path):
    offsets = [30, 600, 1150]
    tr, trace = run_long(ctx, tmp_path, 20, offsets)
    # Between the first and second utterance lie ~9 minutes of audio (33 MB as float32): nothing may pile up.
    quiet = rss_between(trace, 60, 590)
    assert max(quiet) - quiet[0] < 8, f"RSS rose {max(quiet) - quiet[0]:.1f} MB across 9 minutes of silence"
    assert trace[-1][1] - trace[0][1] < 40, "after the whole 20 minutes (73 MB as float32) memory is back near start"
    assert tr.duration_s == pytest.approx(1200, abs=1)
    assert len(tr.segments) == 3, [(s.start, s.text) for s in tr.segments]
    assert [s.start for s in tr.segments] == pytest.approx(offsets, abs=0.6), "absolute times deep into the file"
    assert "meeting" in tr.segments[0].text.lower()


@pytest.mark.slow
def test_three_hours_stream_in_bounded_memory(ctx, tmp_path):
    offsets = [60, 3600, 7200, 10_700]
    tr, trace = run_long(ctx, tmp_path, 180, offsets)
    quiet = rss_between(trace, 120, 3590)  # 58 minutes of audio, 212 MB as float32
    assert max(quiet) - quiet[0] < 8, f"RSS rose {max(quiet) - quiet[0]:.1f} MB across an hour of silence"
    assert trace[-1][1] - trace[0][1] < 40
    assert tr.duration_s == pytest.approx(3 * 3600, abs=1)
    assert [s.start for s in tr.segments] == pytest.approx(offsets, abs=0.6)
