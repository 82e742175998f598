"""Decode any common audio or video file to 16 kHz mono float32, as a stream of bounded chunks.

PyAV (installed with faster-whisper) bundles FFmpeg, so no system FFmpeg is needed. Invariants:
- memory is bounded by one chunk (`chunk_s` seconds of output) plus FFmpeg's small internal buffers, whatever the
  length of the file: a 3-hour lecture is never held in RAM at once;
- any sample rate, any channel layout (mono, stereo, 5.1) comes out as mono at `sample_rate`;
- bad input ends in an `AudioInputError` whose message names the file, what is wrong and what to do; a silent
  or empty-but-valid file is not an error (it yields silence or nothing);
- a file damaged in the middle keeps what decodes: bad packets are skipped and counted (`DecodeStats`), and
  only a file in which nothing at all decodes is refused.
"""

from __future__ import annotations

import logging
import wave
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from studio.safety import atomic_writer

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
MAX_BAD_PACKETS = 200  # consecutive undecodable packets after which we give up on the file


class AudioInputError(ValueError):
    """The file cannot be used as audio; the message says why and what to do."""


@dataclass(frozen=True)
class AudioInfo:
    path: Path
    duration_s: float | None  # None when the container does not say (some streams); decoding still works
    sample_rate: int
    channels: int
    codec: str
    container: str
    has_video: bool


@dataclass
class DecodeStats:
    """Filled in while streaming: how much came out and how many packets were skipped as damaged."""

    samples: int = 0
    bad_packets: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.samples / SAMPLE_RATE


def _check_file(path: Path) -> None:
    if not path.exists():
        raise AudioInputError(f"{path.name}: file not found ({path}).")
    if not path.is_file():
        raise AudioInputError(f"{path.name} is not a file; choose an audio or video file.")
    if path.stat().st_size == 0:
        raise AudioInputError(f"{path.name} is empty (0 bytes). Upload a recording that contains sound.")


def _reason(e: Exception) -> str:
    """FFmpeg's words without the errno number and file name it repeats."""
    return (getattr(e, "strerror", None) or str(e)).strip().rstrip(".").lower()


def _open(path: Path):
    import av

    _check_file(path)
    try:
        return av.open(str(path), mode="r", metadata_errors="ignore")
    except av.error.FFmpegError as e:
        raise AudioInputError(
            f"{path.name} is not a readable audio or video file (corrupt, truncated or not media: {_reason(e)}). "
            "Try re-exporting it as WAV, MP3, FLAC, M4A or OGG."
        ) from None


def _audio_stream(container, path: Path):
    streams = [s for s in container.streams if s.type == "audio"]
    if not streams:
        kinds = sorted({s.type for s in container.streams}) or ["nothing"]
        raise AudioInputError(
            f"{path.name} has no audio track (it holds {', '.join(kinds)}). "
            "Upload a file with sound, or export the audio track first."
        )
    stream = streams[0]
    codec = getattr(stream.codec_context, "name", None) if stream.codec_context is not None else None
    if not codec or codec == "none":
        raise AudioInputError(
            f"{path.name}: its audio codec is not supported by the bundled FFmpeg. "
            "Convert it to WAV, FLAC, MP3 or Opus and upload again."
        )
    return stream


def probe(path: str | Path) -> AudioInfo:
    """Read the header only: duration, rate, channels, codec. Raises AudioInputError on bad files."""
    path = Path(path)
    container = _open(path)
    try:
        stream = _audio_stream(container, path)
        duration = None
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1_000_000
        cc = stream.codec_context
        return AudioInfo(
            path=path,
            duration_s=duration,
            sample_rate=int(cc.sample_rate or 0),
            channels=int(cc.channels or 0),
            codec=cc.name,
            container=container.format.name,
            has_video=any(s.type == "video" for s in container.streams),
        )
    finally:
        container.close()


def _decoded_frames(container, stream, path: Path, stats: DecodeStats) -> Iterator:
    """Frames of the audio stream; undecodable packets are skipped and counted, not fatal."""
    import av

    consecutive_bad = 0
    try:
        packets = container.demux(stream)
        for packet in packets:
            try:
                frames = packet.decode()
            except av.error.FFmpegError as e:
                stats.bad_packets += 1
                consecutive_bad += 1
                if consecutive_bad >= MAX_BAD_PACKETS:
                    raise AudioInputError(
                        f"{path.name}: {consecutive_bad} audio packets in a row could not be decoded ({_reason(e)}); "
                        "the file is damaged. Re-export it and upload again."
                    ) from None
                continue
            consecutive_bad = 0
            for frame in frames:
                frame.pts = None  # the resampler must not enforce timestamps of a damaged stream
                yield frame
    except av.error.FFmpegError as e:  # a read error in the container itself: keep what we have
        stats.notes.append(f"stopped reading at a damaged part of the file ({_reason(e)})")
        log.warning("%s: stopped reading at a damaged part: %s", path.name, e)


def iter_pcm(
    path: str | Path, *, sample_rate: int = SAMPLE_RATE, chunk_s: float = 30.0, stats: DecodeStats | None = None
) -> Iterator[np.ndarray]:
    """Yield float32 mono chunks of `chunk_s` seconds (the last one shorter) at `sample_rate`.

    Raises AudioInputError before the first chunk for files that cannot be opened or have no audio track, and
    later only if the file turns out to be damaged beyond use (nothing decodes).
    """
    import av

    if chunk_s <= 0:
        raise ValueError(f"chunk_s must be positive, got {chunk_s}")
    path = Path(path)
    stats = stats if stats is not None else DecodeStats()
    chunk_len = max(1, round(chunk_s * sample_rate))
    container = _open(path)
    try:
        stream = _audio_stream(container, path)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        pending: list[np.ndarray] = []
        pending_len = 0
        frames = _decoded_frames(container, stream, path, stats)
        for frame in _chain_flush(frames):
            for out in resampler.resample(frame):
                pcm = out.to_ndarray().reshape(-1).astype(np.float32, copy=False)
                pending.append(pcm)
                pending_len += pcm.size
                while pending_len >= chunk_len:
                    joined = np.concatenate(pending)
                    yield joined[:chunk_len]
                    stats.samples += chunk_len
                    rest = joined[chunk_len:]
                    pending, pending_len = ([rest], rest.size) if rest.size else ([], 0)
        if pending_len:
            stats.samples += pending_len
            yield np.concatenate(pending)
    finally:
        container.close()
    if stats.samples == 0 and stats.bad_packets:
        raise AudioInputError(
            f"{path.name}: none of its {stats.bad_packets} audio packets could be decoded; the file is corrupt."
        )
    if stats.bad_packets:
        stats.notes.append(f"skipped {stats.bad_packets} damaged audio packet(s)")


def _chain_flush(frames: Iterator) -> Iterator:
    """The frames, then None (which flushes the resampler). Lazily: a generator, never a list."""
    yield from frames
    yield None


def mark_last(items: Iterator[np.ndarray]) -> Iterator[tuple[np.ndarray, bool]]:
    """(chunk, is_last) pairs, looking one ahead; an empty stream yields one empty final chunk."""
    prev = None
    for item in items:
        if prev is not None:
            yield prev, False
        prev = item
    yield (prev if prev is not None else np.zeros(0, np.float32)), True


def load_pcm(path: str | Path, *, sample_rate: int = SAMPLE_RATE, max_s: float | None = None) -> np.ndarray:
    """The whole file (or its first `max_s` seconds) as one array: for short clips, tests and benchmarks."""
    parts: list[np.ndarray] = []
    total = 0
    limit = None if max_s is None else int(max_s * sample_rate)
    for chunk in iter_pcm(path, sample_rate=sample_rate, chunk_s=30.0):
        parts.append(chunk)
        total += chunk.size
        if limit is not None and total >= limit:
            break
    pcm = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    return pcm if limit is None else pcm[:limit]


def write_wav(path: str | Path, pcm: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    """Atomically write mono float [-1, 1] samples as 16-bit PCM WAV."""
    path = Path(path)
    data = (np.clip(np.asarray(pcm, dtype=np.float32), -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
    with atomic_writer(path, "wb") as f, wave.open(f, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(data)
    return path
