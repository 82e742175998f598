"""Streaming VAD: hysteresis on frame scores, windows that never exceed Whisper's context, bounded buffers."""

from __future__ import annotations

import numpy as np
import pytest

from backends.audio.vad import FRAME, SR, FixedWindows, SpeechRegions, SpeechWindows, VadConfig, load_silero_session
from studio.bench.asr_data import SENTENCES, espeak_available, make_dialogue

needs_espeak = pytest.mark.skipif(not espeak_available(), reason="espeak-ng missing (apt-get install -y espeak-ng)")
FPS = SR / FRAME  # frames per second (31.25)


def frames(pattern: list[tuple[float, float]]) -> np.ndarray:
    """Frame scores from (seconds, probability) runs."""
    return np.concatenate([np.full(round(s * FPS), p, np.float32) for s, p in pattern])


def regions_of(probs: np.ndarray, cfg: VadConfig, step: int = 7) -> list[tuple[float, float]]:
    r = SpeechRegions(cfg)
    out = []
    for i in range(0, probs.size, step):  # fed in odd-sized pieces: streaming must not depend on them
        out += r.feed(probs[i : i + step])
    out += r.flush()
    return [(a / SR, b / SR) for a, b in out]


def test_regions_hysteresis_padding_and_blips():
    cfg = VadConfig(pad_s=0.0, min_silence_s=0.3, min_speech_s=0.25)
    probs = frames([(1, 0.05), (2, 0.9), (0.1, 0.2), (1, 0.9), (1, 0.05), (0.1, 0.9), (2, 0.05)])
    got = regions_of(probs, cfg)
    assert len(got) == 1, "a 0.1 s dip does not split speech; a 0.1 s blip is dropped"
    assert got[0][0] == pytest.approx(1.0, abs=0.05) and got[0][1] == pytest.approx(4.1, abs=0.05)
    padded = regions_of(probs, VadConfig(pad_s=0.2, min_silence_s=0.3))
    assert padded[0][0] == pytest.approx(0.8, abs=0.05) and padded[0][1] == pytest.approx(4.3, abs=0.05)


def test_long_region_is_cut_at_its_last_quiet_frame():
    cfg = VadConfig(pad_s=0.0, max_region_s=10.0, max_window_s=10.0)
    probs = frames([(7.0, 0.9), (0.1, 0.3), (6.0, 0.9), (1.0, 0.0)])  # one brief dip at 7 s
    got = regions_of(probs, cfg)
    assert len(got) == 2
    assert got[0][1] == pytest.approx(7.1, abs=0.1)  # cut inside the dip, not at 10 s
    assert got[1][0] == pytest.approx(got[0][1], abs=0.04) and got[1][1] == pytest.approx(13.1, abs=0.1)
    assert all(b - a <= 10.0 for a, b in got)


def test_config_validation():
    with pytest.raises(ValueError, match="threshold"):
        VadConfig(threshold=1.5)
    with pytest.raises(ValueError, match="max_window_s"):
        VadConfig(max_window_s=45.0)


def test_fixed_windows_cover_everything_and_cut_in_quiet():
    rng = np.random.default_rng(0)
    audio = (0.3 * rng.standard_normal(65 * SR)).astype(np.float32)
    audio[25 * SR : int(25.3 * SR)] = 0.0  # a pause near the end of the first 28 s window
    fw, out = FixedWindows(28.0), []
    for i in range(0, audio.size, 9 * SR):
        out += fw.feed(audio[i : i + 9 * SR], final=i + 9 * SR >= audio.size)
    assert out[0].end_s == pytest.approx(25.15, abs=0.1)
    assert all(w.audio.size <= 28 * SR for w in out)
    assert [w.start for w in out[1:]] == [w.start + w.audio.size for w in out[:-1]], "contiguous"
    assert sum(w.audio.size for w in out) == audio.size


def test_silence_keeps_the_buffer_small():
    sw = SpeechWindows(VadConfig(), load_silero_session())
    for _ in range(30):  # 5 minutes of silence in 10 s chunks
        assert list(sw.feed(np.zeros(10 * SR, np.float32))) == []
        assert sw._buf.end - sw._buf.start < SR, "silence must not accumulate"


@needs_espeak
def test_windows_find_the_speech_whatever_the_chunk_size():
    lines = [("A", "en-us", SENTENCES[0]), ("B", "en-us+f3", SENTENCES[1]), ("A", "en-us", SENTENCES[2])]
    d = make_dialogue(lines, [0.8, 3.0])
    audio = np.concatenate([d.pcm, np.zeros(40 * SR, np.float32), d.pcm])
    shift = (d.pcm.size + 40 * SR) / SR
    session = load_silero_session()
    results = []
    for chunk_s in (0.5, 7.0, 30.0):
        sw, wins, step = SpeechWindows(VadConfig(), session), [], int(chunk_s * SR)
        for i in range(0, audio.size, step):
            wins += sw.feed(audio[i : i + step], final=i + step >= audio.size)
        results.append([(w.start, w.audio.size) for w in wins])
        assert all(w.audio.size <= 28 * SR for w in wins)
        for t in [*d.turns, *[type(t)(t.speaker, t.start + shift, t.end + shift, t.text) for t in d.turns]]:
            inside = [w for w in wins if w.start_s <= t.start + 0.1 and t.end - 0.3 <= w.end_s]
            assert inside, f"turn {t} is not inside any window"
        assert not any(w.start_s < shift - 5 and w.end_s > d.duration_s + 5 for w in wins), "40 s silence skipped"
    assert results[0] == results[1] == results[2]
