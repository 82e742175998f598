"""Decoding speech windows with Whisper, for one streamed transcription (AsrBackend.stream feeds it windows).

Windows are batched (`batch_size`); the first window is decoded alone because it fixes the language. Each batch runs
under `residency.run` (a CUDA OOM is retried once). Silent windows (peak below -60 dBFS) are never decoded. With
`carry_prompt` a window's text is the next window's prompt unless one of its segments looks unsure (mean word
log-probability below CARRY_MIN_LOGPROB). Segments come back in file time with their own confidence: the mean
log-probability and the VAD's no-speech probability of their own span, not their 30-s decoding window's.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from backends.audio.pcm import SAMPLE_RATE, DecodeStats
from backends.audio.types import AsrUpdate, Segment, Transcript, Word
from backends.audio.vad import SpeechWindow

log = logging.getLogger(__name__)

SILENCE_PEAK = 1e-3  # a window whose loudest sample is below -60 dBFS is silence: Whisper never sees it
CARRY_MIN_LOGPROB = -1.0  # Whisper's own log_prob_threshold: below it a window's text is not used as a prompt


class WindowRun:
    """State of one streamed transcription: language, pending batch, segments so far, the carried prompt.

    `backend` is the AsrBackend (its `_key` names the model, its residency runs each batch under a lease), `opts` its
    TranscribeOptions."""

    def __init__(self, backend: Any, opts: Any, duration: float | None, should_stop: Callable[[], bool]) -> None:
        self.backend, self.opts, self.duration, self.should_stop = backend, opts, duration, should_stop
        self.key = backend._key(opts.model_id, opts.engine)
        self.language = None if opts.language == "auto" else opts.language
        self.prompt = ""  # the previous window's text, when carried (opts.carry_prompt)
        self.segments: list[Segment] = []
        self.batch: list[SpeechWindow] = []
        self.cancelled = False

    def update(self, new: tuple[Segment, ...], position: float, message: str = "") -> AsrUpdate:
        return AsrUpdate(new, position, self.duration, self.language, message)

    def add_window(self, window: SpeechWindow, position: float) -> Iterator[AsrUpdate]:
        if window.audio.size == 0 or float(np.abs(window.audio).max()) < SILENCE_PEAK:
            return
        self.batch.append(window)
        if len(self.batch) >= self.opts.batch_size:
            yield from self.flush(position)

    def flush(self, position: float) -> Iterator[AsrUpdate]:
        batch, self.batch = self.batch, []
        if not batch or self.cancelled:
            return
        if len(batch) == 1 or self.language is None:  # the first window also fixes the language
            first, batch = batch[:1], batch[1:]
            yield self._emit(self.backend.ctx.residency.run(self.key, lambda m: self._single(m, first[0])), position)
        if batch and not self.cancelled:
            yield self._emit(self.backend.ctx.residency.run(self.key, lambda m: self._batched(m, batch)), position)

    def _emit(self, segs: list[Segment], position: float) -> AsrUpdate:
        self.segments.extend(segs)
        if self.opts.carry_prompt and segs:
            sure = [s for s in segs if s.avg_logprob >= CARRY_MIN_LOGPROB and s.text]
            self.prompt = " ".join(s.text for s in sure) if len(sure) == len(segs) else ""
        return self.update(tuple(segs), position)

    def _kwargs(self) -> dict[str, Any]:
        return dict(
            language=self.language,
            beam_size=self.opts.beam_size,
            # Word alignment always runs: without VAD a window can open on long silence and Whisper's segment
            # times are then coarse (the first one snaps to 0), and the words' probabilities give each segment its
            # own confidence (Whisper's avg_logprob / no_speech_prob are per 30-s decoding window, so every
            # segment of one window had the same values). Words are kept only when asked for.
            word_timestamps=True,
            # Inside one window (<= 28 s, one decoding window) there is nothing to condition on; across windows the
            # prompt is carried by us (carry_prompt), so a bad window is not carried.
            condition_on_previous_text=False,
            initial_prompt=self.prompt or None,
            vad_filter=False,  # the windows are already VAD-cut (or deliberately not)
        )

    def _single(self, model: Any, window: SpeechWindow) -> list[Segment]:
        if self.opts.engine == "torch":
            return self._torch(model, [window])
        segments, info = model.transcribe(window.audio, **self._kwargs())
        out = []
        for seg in segments:  # lazy: decoding happens while we iterate
            out.append(_segment(seg, window, self.opts.word_timestamps))
            if self.should_stop():
                self.cancelled = True
                break
        if self.language is None:
            self.language = info.language
            log.info("detected language %s (p=%.2f)", info.language, info.language_probability)
        return out

    def _torch(self, model: Any, windows: list[SpeechWindow]) -> list[Segment]:
        """The torch engine: one segment per window (the window's span), its text decoded in one batch."""
        if self.language is None:
            self.language = model.detect_language(windows[0].audio)
            log.info("detected language %s (torch engine)", self.language)
        texts = model.transcribe([w.audio for w in windows], prompt=self.prompt, language=self.language,
                                 beam_size=self.opts.beam_size, batch_size=len(windows))  # fmt: skip
        out = []
        for w, text in zip(windows, texts, strict=True):
            if text:
                speech = w.speech_prob(w.start_s, w.end_s)
                out.append(Segment(round(w.start_s, 3), round(w.end_s, 3), text,
                                   no_speech_prob=round(1 - speech, 4) if speech is not None else 0.0))  # fmt: skip
        return out

    def _batched(self, model: Any, windows: list[SpeechWindow]) -> list[Segment]:
        """Several windows in one batched call: concatenated, each one a clip (offsets mapped back after)."""
        if self.opts.engine == "torch":
            return self._torch(model, windows)
        from faster_whisper import BatchedInferencePipeline

        audio = np.concatenate([w.audio for w in windows])
        bounds = np.cumsum([0] + [w.audio.size for w in windows])
        clips = [{"start": a / SAMPLE_RATE, "end": b / SAMPLE_RATE} for a, b in itertools.pairwise(bounds)]  # seconds
        kwargs = {k: v for k, v in self._kwargs().items() if k not in ("condition_on_previous_text", "vad_filter")}
        pipe = BatchedInferencePipeline(model)
        segments, _ = pipe.transcribe(audio, clip_timestamps=clips, batch_size=len(windows), **kwargs)
        out = []
        for seg in segments:
            i = max(0, int(np.searchsorted(bounds, seg.start * SAMPLE_RATE, side="right")) - 1)
            out.append(
                _segment(seg, windows[i], self.opts.word_timestamps, windows[i].start_s - bounds[i] / SAMPLE_RATE)
            )
            if self.should_stop():
                self.cancelled = True
                break
        return out

    def transcript(self, stats: DecodeStats) -> Transcript:
        return Transcript(
            segments=sorted(self.segments, key=lambda s: s.start),
            language=self.language,
            duration_s=stats.seconds,
            model_id=self.opts.model_id,
            notes=list(stats.notes),
            cancelled=self.cancelled,
        )


def _segment(seg: Any, window: SpeechWindow, keep_words: bool, offset: float | None = None) -> Segment:
    """A faster-whisper segment in file time. Its no-speech probability is its own: 1 - the VAD's mean speech
    probability over the segment's span (Whisper's `no_speech_prob` is one value per decoding window, i.e. the same
    for every segment of a window); without VAD, Whisper's window value."""
    offset = window.start_s if offset is None else offset
    speech = window.speech_prob(seg.start + offset, seg.end + offset)
    words = tuple(
        Word(round(w.start + offset, 3), round(w.end + offset, 3), w.word, round(float(w.probability), 4))
        for w in (seg.words or ())
        if keep_words
    )
    return Segment(
        start=round(seg.start + offset, 3),
        end=round(seg.end + offset, 3),
        text=seg.text.strip(),
        words=words,
        avg_logprob=segment_logprob(seg),
        no_speech_prob=round(1.0 - speech, 4) if speech is not None else round(float(seg.no_speech_prob), 4),
    )


def segment_logprob(seg: Any) -> float:
    """Mean log-probability of this segment's own words; the window's avg_logprob when there are no words.

    faster-whisper reports `avg_logprob` once per 30-s decoding window (the sum over all its tokens), so every
    segment of that window shares it; the aligned words' probabilities are per segment.
    """
    probs = [float(w.probability) for w in (seg.words or ()) if w.probability is not None]
    if not probs:
        return round(float(seg.avg_logprob), 4)
    return round(float(np.mean(np.log(np.clip(probs, 1e-6, 1.0)))), 4)
