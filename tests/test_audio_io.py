"""Decoding: formats, rates and layouts, streaming in bounded chunks, and every bad input of BAD_INPUTS.md."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from backends.audio.pcm import (
    SAMPLE_RATE,
    AudioInputError,
    DecodeStats,
    iter_pcm,
    load_pcm,
    mark_last,
    probe,
    write_wav,
)
from studio.bench.asr_data import write_media, write_video_only


def chirp(seconds: float = 3.0, sr: int = SAMPLE_RATE) -> np.ndarray:
    """A 200 -> 2000 Hz sweep with a silent middle second: easy to recognise after any resampling."""
    t = np.arange(int(seconds * sr)) / sr
    x = 0.5 * np.sin(2 * np.pi * (200 * t + 300 * t**2))
    x[int(sr * 1.0) : int(sr * 2.0)] = 0.0
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def signal() -> np.ndarray:
    return chirp()


@pytest.mark.parametrize(
    ("codec", "ext", "rate", "channels"),
    [
        ("pcm_s16le", "wav", 8000, 1),
        ("pcm_s16le", "wav", 96000, 2),
        ("flac", "flac", 48000, 1),
        ("libmp3lame", "mp3", 44100, 2),
        ("aac", "m4a", 22050, 2),
        ("libopus", "ogg", 48000, 2),
    ],
)
def test_any_format_rate_and_layout_decodes_to_16k_mono(tmp_path, signal, codec, ext, rate, channels):
    path = write_media(tmp_path / f"clip.{ext}", signal, codec=codec, rate=rate, channels=channels)
    info = probe(path)
    assert info.sample_rate == rate and info.channels == channels
    assert info.duration_s == pytest.approx(3.0, abs=0.1)
    pcm = load_pcm(path)
    assert pcm.dtype == np.float32 and pcm.ndim == 1
    assert pcm.size / SAMPLE_RATE == pytest.approx(3.0, abs=0.08)  # encoder padding of mp3/aac is small
    loud, quiet = np.abs(pcm[:SAMPLE_RATE]).mean(), np.abs(pcm[int(1.2 * SAMPLE_RATE) : int(1.8 * SAMPLE_RATE)]).mean()
    assert loud > 0.1 and quiet < 0.01, "the silent middle second must stay silent and the sweep audible"
    if ext in ("wav", "flac") and rate >= SAMPLE_RATE and channels == 1:  # lossless: same samples after resampling
        n = min(pcm.size, signal.size)
        assert np.corrcoef(pcm[:n], signal[:n])[0, 1] > 0.99


def test_stream_chunks_are_bounded_and_add_up(tmp_path, signal):
    path = write_wav(tmp_path / "clip.wav", np.tile(signal, 2))  # 6 s
    stats = DecodeStats()
    chunks = list(iter_pcm(path, chunk_s=1.0, stats=stats))
    assert [c.size for c in chunks[:-1]] == [SAMPLE_RATE] * (len(chunks) - 1)
    assert 0 < chunks[-1].size <= SAMPLE_RATE
    whole = np.concatenate(chunks)
    assert whole.size == stats.samples == load_pcm(path).size
    assert stats.bad_packets == 0
    assert [last for _, last in mark_last(iter(chunks))] == [False] * (len(chunks) - 1) + [True]


def test_silent_file_is_silence_not_an_error(tmp_path):
    path = write_wav(tmp_path / "silence.wav", np.zeros(2 * SAMPLE_RATE, np.float32))
    pcm = load_pcm(path)
    assert pcm.size == 2 * SAMPLE_RATE and not pcm.any()


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.mp3"
    path.write_bytes(b"")
    with pytest.raises(AudioInputError, match=r"empty \(0 bytes\)"):
        probe(path)
    with pytest.raises(AudioInputError, match="empty"):
        list(iter_pcm(path))


def test_missing_file(tmp_path):
    with pytest.raises(AudioInputError, match="not found"):
        probe(tmp_path / "nope.wav")


@pytest.mark.parametrize("content", [os.urandom(5000), b"this is a text file, not audio\n" * 40, b"RIFF" + b"\0" * 40])
def test_corrupt_or_not_media(tmp_path, content):
    path = tmp_path / "broken.mp3"
    path.write_bytes(content)
    with pytest.raises(AudioInputError, match="not a readable audio or video file") as e:
        probe(path)
    assert "Errno" not in str(e.value) and "broken.mp3" in str(e.value)


def test_video_without_audio(tmp_path):
    path = write_video_only(tmp_path / "silent-film.mp4")
    with pytest.raises(AudioInputError, match=r"no audio track .*video"):
        probe(path)
    with pytest.raises(AudioInputError, match="no audio track"):
        next(iter_pcm(path))


def test_unsupported_codec(tmp_path, signal):
    wav = write_wav(tmp_path / "ok.wav", signal).read_bytes()
    i = wav.find(b"fmt ")
    bad = bytearray(wav)
    bad[i + 8 : i + 10] = struct.pack("<H", 0x7777)  # a WAVE format tag no decoder knows
    path = tmp_path / "odd-codec.wav"
    path.write_bytes(bytes(bad))
    with pytest.raises(AudioInputError, match="codec is not supported"):
        probe(path)


def test_damaged_middle_keeps_what_decodes(tmp_path, signal):
    path = write_media(tmp_path / "clip.mp3", signal, codec="libmp3lame", rate=44100)
    data = bytearray(path.read_bytes())
    third = len(data) // 3
    data[third : third + 3000] = np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    stats = DecodeStats()
    pcm = np.concatenate(list(iter_pcm(path, stats=stats)))
    assert 1.5 * SAMPLE_RATE < pcm.size <= 3.1 * SAMPLE_RATE  # most of it survives


def test_truncated_file_keeps_the_beginning(tmp_path, signal):
    path = write_media(tmp_path / "clip.flac", signal, codec="flac", rate=48000)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    pcm = load_pcm(path)
    assert 0 < pcm.size < 3 * SAMPLE_RATE
    assert np.abs(pcm[: SAMPLE_RATE // 2]).mean() > 0.1


def test_write_wav_roundtrip(tmp_path, signal):
    path = write_wav(tmp_path / "x.wav", signal)
    back = load_pcm(path)
    assert np.abs(back - signal).max() < 1e-3
