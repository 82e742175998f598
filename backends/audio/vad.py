"""Streaming voice activity detection (Silero VAD, ONNX) and the speech windows Whisper is given.

Policy:
- Silero v6 (the `silero-vad` wheel's ONNX file, run with onnxruntime on the CPU) scores every 32 ms frame of
  16 kHz audio; its recurrent state carries across chunks, so a 3-hour file is scored in one pass and never held.
  We do not import the `silero_vad` package itself: it calls `torch.set_num_threads(1)` at import, which would slow
  every other torch user in the process.
- `SpeechRegions` turns frame scores into speech regions with hysteresis (start at `threshold`, end after
  `min_silence_s` below `threshold - 0.15`), drops blips shorter than `min_speech_s`, pads each side by `pad_s`,
  and cuts a region that grows past `max_region_s` at its most recent quiet frame.
- `SpeechWindows` groups consecutive regions into windows of contiguous audio no longer than `max_window_s`
  (Whisper's 30 s context); a pause longer than `join_gap_s` closes a window. Long silences are never sent to
  Whisper. The audio kept in memory is bounded by one window plus one region plus one chunk.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from studio.catalog import package_dir

log = logging.getLogger(__name__)

SR = 16_000
FRAME = 512  # samples per VAD frame at 16 kHz (32 ms)
CONTEXT = 64  # samples of the previous frame that Silero v5+/v6 expects in front of each frame


def silero_onnx_path() -> Path:
    root = package_dir("silero_vad")
    if root is None or not (root / "data" / "silero_vad.onnx").is_file():
        raise FileNotFoundError("Silero VAD is not installed: pip install silero-vad==6.2.3")
    return root / "data" / "silero_vad.onnx"


def load_silero_session(path: Path | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.inter_op_num_threads = 1
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path or silero_onnx_path()), providers=["CPUExecutionProvider"], sess_options=opts)


@dataclass(frozen=True)
class VadConfig:
    threshold: float = 0.5
    min_speech_s: float = 0.25
    min_silence_s: float = 0.3  # a pause this long ends a speech region
    pad_s: float = 0.2
    max_region_s: float = 28.0
    max_window_s: float = 28.0  # < 30 s so padding never pushes a window past Whisper's context
    join_gap_s: float = 1.5  # a longer pause closes the current window

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"VAD threshold must be in (0, 1), got {self.threshold}")
        for name in ("min_speech_s", "min_silence_s", "pad_s", "join_gap_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 1.0 <= self.max_region_s <= self.max_window_s <= 30.0:
            raise ValueError(
                f"need 1 <= max_region_s ({self.max_region_s}) <= max_window_s ({self.max_window_s}) <= 30"
            )


class SileroStream:
    """Frame speech probabilities for a 16 kHz stream fed in chunks of any size."""

    def __init__(self, session=None) -> None:
        self.session = session  # an onnxruntime session of silero_vad.onnx (may be set later)
        self._state = np.zeros((2, 1, 128), np.float32)
        self._context = np.zeros((1, CONTEXT), np.float32)
        self._rest = np.zeros(0, np.float32)
        self._sr = np.array(SR, dtype=np.int64)

    def probs(self, pcm: np.ndarray, *, final: bool = False) -> np.ndarray:
        """Scores of the complete frames in `rest + pcm`; with `final`, the tail is zero-padded and scored too."""
        x = np.concatenate([self._rest, np.asarray(pcm, np.float32)])
        if final and x.size % FRAME:
            x = np.concatenate([x, np.zeros(FRAME - x.size % FRAME, np.float32)])
        n = x.size // FRAME
        self._rest = x[n * FRAME :]
        out = np.empty(n, np.float32)
        for i in range(n):
            frame = np.concatenate([self._context, x[None, i * FRAME : (i + 1) * FRAME]], axis=1)
            prob, self._state = self.session.run(None, {"input": frame, "state": self._state, "sr": self._sr})
            out[i] = prob[0, 0]
            self._context = frame[:, -CONTEXT:]
        return out


class SpeechRegions:
    """Frame scores -> speech regions (start, end) in samples, streaming; hysteresis as in Silero's reference."""

    def __init__(self, cfg: VadConfig) -> None:
        self.cfg = cfg
        self._frame = 0  # index of the next frame to score
        self._start: int | None = None  # frame where the current speech began
        self._quiet_since: int | None = None  # first frame of the current pause inside speech
        self._last_quiet: int | None = None  # most recent frame below threshold inside speech (cut point)
        self._continued = False  # the current region continues one that was force-split
        self._last_end = 0  # end sample of the last region handed out

    @property
    def pending_start(self) -> int | None:
        """Sample where the speech in progress began (audio from here on must be kept), or None."""
        return None if self._start is None else self._start * FRAME

    def feed(self, probs: np.ndarray) -> list[tuple[int, int]]:
        cfg = self.cfg
        neg = max(0.01, cfg.threshold - 0.15)
        silence_frames = max(1, round(cfg.min_silence_s * SR / FRAME))
        max_frames = int(cfg.max_region_s * SR / FRAME) - 2 * round(cfg.pad_s * SR / FRAME)
        done: list[tuple[int, int]] = []
        for p in probs:
            i = self._frame
            self._frame += 1
            if self._start is None:
                if p >= cfg.threshold:
                    self._start, self._quiet_since, self._last_quiet = i, None, None
                continue
            if p < cfg.threshold:
                self._last_quiet = i
            if p >= cfg.threshold:
                self._quiet_since = None
            elif p < neg and self._quiet_since is None:
                self._quiet_since = i
            if self._quiet_since is not None and i - self._quiet_since + 1 >= silence_frames:
                self._close(self._quiet_since, done)
            elif i - self._start + 1 >= max_frames:
                quiet = self._last_quiet
                cut = quiet if quiet is not None and quiet > self._start + max_frames // 2 else i
                self._close(cut, done, cut=True)
                self._start = cut
        return done

    def flush(self) -> list[tuple[int, int]]:
        done: list[tuple[int, int]] = []
        if self._start is not None:
            self._close(self._quiet_since if self._quiet_since is not None else self._frame, done)
        return done

    def _close(self, end_frame: int, done: list[tuple[int, int]], *, cut: bool = False) -> None:
        """End the region at `end_frame`; a `cut` (forced split) is not padded at its end nor the next start."""
        start, padded_start = self._start, not self._continued
        self._start, self._quiet_since, self._last_quiet, self._continued = None, None, None, cut
        if (end_frame - start) * FRAME < self.cfg.min_speech_s * SR:
            return
        pad = int(self.cfg.pad_s * SR)
        s = max(start * FRAME - (pad if padded_start else 0), self._last_end)  # regions never overlap
        e = end_frame * FRAME + (0 if cut else pad)
        self._last_end = e
        done.append((s, e))


@dataclass(frozen=True)
class SpeechWindow:
    start: int  # sample index in the whole file
    audio: np.ndarray  # contiguous samples [start, start + len)
    regions: tuple[tuple[int, int], ...]  # speech regions inside, absolute samples
    # Silero's speech probability of each 32-ms frame from `start // FRAME` on (None without VAD): what gives each
    # transcribed segment its own no-speech probability (Whisper's is one value per decoding window).
    frame_probs: np.ndarray | None = None

    @property
    def start_s(self) -> float:
        return self.start / SR

    def speech_prob(self, start_s: float, end_s: float) -> float | None:
        """Mean VAD speech probability over [start_s, end_s] (seconds from the file start); None without VAD."""
        if self.frame_probs is None or self.frame_probs.size == 0:
            return None
        first = self.start // FRAME
        a = min(max(int(start_s * SR) // FRAME - first, 0), self.frame_probs.size - 1)
        b = min(max(-(-int(end_s * SR) // FRAME) - first, a + 1), self.frame_probs.size)
        return float(self.frame_probs[a:b].mean())

    @property
    def end_s(self) -> float:
        return (self.start + self.audio.size) / SR


class AudioBuffer:
    """Samples from `start` on; older audio is dropped as soon as nothing can need it."""

    def __init__(self) -> None:
        self.start = 0
        self._parts: list[np.ndarray] = []
        self.end = 0

    def append(self, pcm: np.ndarray) -> None:
        self._parts.append(pcm)
        self.end += pcm.size

    def slice(self, a: int, b: int) -> np.ndarray:
        data = np.concatenate(self._parts) if len(self._parts) > 1 else (self._parts[0] if self._parts else None)
        if data is None:
            return np.zeros(0, np.float32)
        self._parts = [data]
        a, b = max(a, self.start), min(b, self.end)
        return data[a - self.start : b - self.start].copy() if b > a else np.zeros(0, np.float32)

    def drop_before(self, sample: int) -> None:
        if sample <= self.start:
            return
        data = self.slice(self.start, self.end)
        cut = min(sample, self.end) - self.start
        self._parts, self.start = [data[cut:]], self.start + cut


class SpeechWindows:
    """Audio chunks in, `SpeechWindow`s out (each <= max_window_s), using the streaming VAD."""

    def __init__(self, cfg: VadConfig, session=None) -> None:
        self.cfg = cfg
        self._scores = SileroStream(session)
        self._regions = SpeechRegions(cfg)
        self._buf = AudioBuffer()
        self._open: list[tuple[int, int]] = []  # regions of the window being built
        self._probs = np.zeros(0, np.float32)  # frame scores from frame `_probs_start` on (trimmed with the audio)
        self._probs_start = 0

    def set_session(self, session) -> None:
        """The VAD session to score with (taken under a residency lease by the caller)."""
        self._scores.session = session

    def feed(self, pcm: np.ndarray, *, final: bool = False) -> Iterator[SpeechWindow]:
        self._buf.append(np.asarray(pcm, np.float32))
        scores = self._scores.probs(pcm, final=final)
        self._probs = np.concatenate([self._probs, scores])
        new = self._regions.feed(scores)
        if final:
            new += self._regions.flush()
        for region in new:
            yield from self._add(region)
        if self._open and (final or self._next_start() - self._open[-1][1] > self.cfg.join_gap_s * SR):
            yield self._emit()
        self._trim()

    def _next_start(self) -> int:
        """Earliest sample where the next region can start: the speech in progress, or what is not yet heard."""
        pending = self._regions.pending_start
        pad = int(self.cfg.pad_s * SR)
        return (pending if pending is not None else self._buf.end) - pad

    def _add(self, region: tuple[int, int]) -> Iterator[SpeechWindow]:
        s, e = region
        if self._open:
            w_start, w_end = self._open[0][0], self._open[-1][1]
            if e - w_start > self.cfg.max_window_s * SR or s - w_end > self.cfg.join_gap_s * SR:
                yield self._emit()
        self._open.append((s, e))

    def _emit(self) -> SpeechWindow:
        regions, self._open = tuple(self._open), []
        a, b = regions[0][0], regions[-1][1]
        i, j = max(0, a // FRAME - self._probs_start), max(0, -(-b // FRAME) - self._probs_start)
        probs = self._probs[i:j].copy()
        if a // FRAME < self._probs_start:  # cannot happen while _trim keeps the open window; stay aligned anyway
            probs = np.concatenate([np.zeros(self._probs_start - a // FRAME, np.float32), probs])
        return SpeechWindow(a, self._buf.slice(a, b), regions, probs)

    def _trim(self) -> None:
        keep = [self._buf.end - int(self.cfg.pad_s * SR) - FRAME]
        if self._open:
            keep.append(self._open[0][0])
        if self._regions.pending_start is not None:
            keep.append(self._regions.pending_start - int(self.cfg.pad_s * SR))
        self._buf.drop_before(max(0, min(keep)))
        drop = self._buf.start // FRAME - self._probs_start
        if drop > 0:
            self._probs, self._probs_start = self._probs[drop:], self._probs_start + drop


class FixedWindows:
    """Without VAD: windows of `max_window_s`, each cut at the quietest 100 ms of its last 5 seconds."""

    def __init__(self, max_window_s: float = 28.0) -> None:
        if not 10.0 <= max_window_s <= 30.0:
            raise ValueError(f"max_window_s must be within [10, 30] seconds, got {max_window_s}")
        self.max_len = int(max_window_s * SR)
        self._buf = AudioBuffer()

    def feed(self, pcm: np.ndarray, *, final: bool = False) -> Iterator[SpeechWindow]:
        self._buf.append(np.asarray(pcm, np.float32))
        while self._buf.end - self._buf.start >= self.max_len or (final and self._buf.end > self._buf.start):
            a = self._buf.start
            audio = self._buf.slice(a, a + self.max_len)
            if audio.size == self.max_len and not (final and self._buf.end - a == self.max_len):
                audio = audio[: self._quiet_cut(audio)]
            self._buf.drop_before(a + audio.size)
            yield SpeechWindow(a, audio, ((a, a + audio.size),))

    @staticmethod
    def _quiet_cut(audio: np.ndarray) -> int:
        hop = SR // 10
        tail0 = audio.size - 5 * SR
        frames = audio[tail0:].reshape(-1, hop)
        quietest = int(np.argmin((frames**2).mean(axis=1)))
        return tail0 + quietest * hop + hop // 2
