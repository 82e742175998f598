"""Speech to text with faster-whisper (CTranslate2), streamed, through the residency manager.

`AsrBackend.stream(path, opts)` is a generator of `AsrUpdate`s: the file is decoded in chunks (backends.audio.pcm),
cut into speech windows of at most 28 s by the streaming VAD (or fixed windows with VAD off), and each window is
transcribed under a residency lease (`residency.run`, so a CUDA OOM is retried once). Segments are yielded as each
window finishes; memory stays bounded by one window whatever the file's length. Cancel is cooperative: the
`should_stop` callable is polled between chunks, windows and segments, and the last update carries everything
transcribed so far. With diarization on, speaker embeddings are taken per window while transcribing and the
speakers are assigned to segments and words at the end (backends.audio.diarize).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from backends.audio.models import (
    TUNED_PREFIX,
    ModelMissing,
    TunedWhisperLoader,
    WhisperLoader,
    register_vad,
    tuned_models,
)
from backends.audio.pcm import SAMPLE_RATE, DecodeStats, iter_pcm, mark_last, probe
from backends.audio.types import DiarizeOptions, Segment, Transcript, Word
from backends.audio.vad import FixedWindows, SpeechWindow, SpeechWindows, VadConfig

if TYPE_CHECKING:
    from studio.services import Services

log = logging.getLogger(__name__)

__all__ = ["AsrBackend", "AsrUpdate", "ModelMissing", "Segment", "TranscribeOptions", "Transcript", "Word", "create"]

# Speech windows for Whisper keep 0.4 s of audio each side of the VAD's speech (the diarizer's regions keep 0.2 s):
# with 0.2 s the pipeline lost word edges and scored WER 0.155 vs plain faster-whisper's 0.150 on tiny.en
# (studio/bench/asr.py, 40 espeak-ng clips); with 0.4 s both score the same, for tiny.en and base.
WHISPER_PAD_S = 0.4
SILENCE_PEAK = 1e-3  # a window whose loudest sample is below -60 dBFS is silence: Whisper never sees it
ENGINES = ("faster-whisper", "torch")
CARRY_MIN_LOGPROB = -1.0  # Whisper's own log_prob_threshold: below it a window's text is not used as a prompt


def whisper_languages() -> tuple[str, ...]:
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    return tuple(_LANGUAGE_CODES)


@dataclass(frozen=True)
class TranscribeOptions:
    model_id: str = "whisper-tiny.en"
    language: str = "auto"  # "auto" or a Whisper language code ("en", "fr", ...)
    vad: bool = True
    word_timestamps: bool = False
    beam_size: int = 5
    batch_size: int = 1  # > 1: batched decoding of several windows at once (worth it on a GPU)
    chunk_s: float = 10.0  # decode granularity; progress and cancel are at least this fine
    # Prompt carry-over (Whisper's condition_on_previous_text, across our windows): each window is decoded with the
    # previous window's text as its prompt, so names and spelling carry on. A window whose own text looks unsure
    # (mean word log-probability below CARRY_MIN_LOGPROB) is not carried, so one hallucination does not feed the
    # next. With batched decoding the windows of one batch share the text before the batch.
    carry_prompt: bool = False
    engine: str = "faster-whisper"  # or "torch": transformers' Whisper on any CUDA (text per window, no words)

    def __post_init__(self) -> None:
        if not self.model_id:
            raise ValueError("model_id is empty; pick a Whisper model such as 'whisper-tiny.en'")
        if self.engine not in ENGINES:
            raise ValueError(f"engine {self.engine!r}: use one of {', '.join(ENGINES)}")
        if self.engine == "torch" and self.word_timestamps:
            raise ValueError("word timestamps need the faster-whisper engine; untick them or pick faster-whisper")
        if self.language != "auto" and self.language not in whisper_languages():
            raise ValueError(f"language {self.language!r} is not a Whisper language code; use 'auto' or e.g. 'en'")
        if not 1 <= self.beam_size <= 10:
            raise ValueError(f"beam_size must be 1..10, got {self.beam_size}")
        if not 1 <= self.batch_size <= 64:
            raise ValueError(f"batch_size must be 1..64, got {self.batch_size}")
        if not 1.0 <= self.chunk_s <= 60.0:
            raise ValueError(f"chunk_s must be 1..60 seconds, got {self.chunk_s}")


@dataclass(frozen=True)
class AsrUpdate:
    new_segments: tuple[Segment, ...]
    position_s: float  # audio decoded so far
    duration_s: float | None
    language: str | None
    message: str = ""
    transcript: Transcript | None = None  # only on the last update

    @property
    def fraction(self) -> float:
        if self.transcript is not None:
            return 1.0
        return min(0.99, self.position_s / self.duration_s) if self.duration_s else 0.0


class AsrBackend:
    def __init__(self, ctx: Services) -> None:
        self.ctx = ctx
        self._diarizer = None

    @property
    def diarizer(self):
        """The diarization backend (built on first use; it shares this context's residency manager)."""
        if self._diarizer is None:
            from backends.audio.diarize import DiarizeBackend

            self._diarizer = DiarizeBackend(self.ctx)
        return self._diarizer

    # ---- models --------------------------------------------------------------------------------------
    def models(self) -> list[tuple[str, str, bool]]:
        """(id, title, present on this machine) for every Whisper model in the catalog."""
        cat = self.ctx.catalog
        shipped = [(s.id, s.title, cat.is_present(s)) for s in cat.by_capability("asr")]
        return shipped + [(mid, title, True) for mid, title in tuned_models(self.ctx.settings.models_dir)]

    def _key(self, model_id: str, engine: str = "faster-whisper") -> str:
        if engine == "torch":
            from backends.audio.whisper_torch import TorchWhisperLoader

            s = self.ctx.settings
            loader = TorchWhisperLoader(model_id, self.ctx.catalog, s.cache_dir, s.models_dir)
            if not model_id.startswith(TUNED_PREFIX) and self.ctx.catalog.get(model_id).capability != "asr":
                raise ValueError(f"{model_id!r} is not a Whisper (asr) model")
            if not self.ctx.residency.is_registered(loader.key):
                self.ctx.residency.register(loader)
            return loader.key
        if model_id.startswith(TUNED_PREFIX):
            loader = TunedWhisperLoader(model_id, self.ctx.settings.models_dir)
            if not self.ctx.residency.is_registered(loader.key):
                self.ctx.residency.register(loader)
            return loader.key
        spec = self.ctx.catalog.get(model_id)
        if spec.capability != "asr":
            raise ValueError(f"{model_id!r} is a {spec.capability} model, not a Whisper (asr) model")
        if not self.ctx.residency.is_registered(spec.key):
            self.ctx.residency.register(WhisperLoader(spec, self.ctx.catalog, self.ctx.settings.cache_dir))
        return spec.key

    def _vad_key(self) -> str:
        return register_vad(self.ctx.residency)

    def check(self, opts: TranscribeOptions) -> None:
        """Load the model (under a lease) and refuse a language the model cannot do, before any audio is read."""

        def _check(model: Any) -> None:
            multilingual = model.multilingual if opts.engine == "torch" else model.model.is_multilingual
            if opts.language not in ("auto", "en") and not multilingual:
                raise ValueError(
                    f"{opts.model_id} is English-only; for language {opts.language!r} pick Whisper base "
                    "or a larger multilingual model."
                )

        self.ctx.residency.run(self._key(opts.model_id, opts.engine), _check)

    # ---- transcription -------------------------------------------------------------------------------
    def transcribe(self, path: str | Path, opts: TranscribeOptions | None = None, **kwargs: Any) -> Transcript:
        """Run `stream` to the end and return the transcript."""
        updates = self.stream(path, opts or TranscribeOptions(), **kwargs)
        final = next(u for u in updates if u.transcript is not None)
        return final.transcript

    def stream(
        self,
        path: str | Path,
        opts: TranscribeOptions,
        *,
        should_stop: Callable[[], bool] | None = None,
        diarize: DiarizeOptions | None = None,
    ) -> Iterator[AsrUpdate]:
        should_stop = should_stop or (lambda: False)
        info = probe(path)  # bad files fail here, before the model loads
        self.check(opts)
        run = _Run(self, opts, info.duration_s, should_stop)
        tracker = self._tracker(diarize)
        stats = DecodeStats()
        windows = SpeechWindows(VadConfig(pad_s=WHISPER_PAD_S)) if opts.vad else FixedWindows()
        # The speaker tracker needs speech regions: without VAD for Whisper it gets its own VAD stream.
        speech = windows if opts.vad else (SpeechWindows(VadConfig()) if tracker is not None else None)
        t0 = time.perf_counter()
        with _lease(self.ctx, self._vad_key() if speech is not None else None) as vad_session:
            if speech is not None:
                speech.set_session(vad_session)
            for chunk, final in mark_last(iter_pcm(path, chunk_s=opts.chunk_s, stats=stats)):
                if should_stop():
                    run.cancelled = True
                    break
                if tracker is not None and speech is not windows:
                    for window in speech.feed(chunk, final=final):
                        tracker.add(window)
                for window in windows.feed(chunk, final=final):
                    if tracker is not None and speech is windows:
                        tracker.add(window)
                    yield from run.add_window(window, stats.seconds)
                    if run.cancelled:
                        break
                if run.cancelled:
                    break
                yield run.update((), stats.seconds)
        yield from run.flush(stats.seconds)
        transcript = run.transcript(stats)
        if diarize is not None and transcript.segments and not transcript.cancelled:  # pyannote has no tracker
            yield run.update((), stats.seconds, message="assigning speakers...")
            self._diarize(transcript, tracker, diarize, path)
        log.info(
            "transcribed %.1f s of %s with %s in %.1f s (%d segments)",
            stats.seconds, Path(path).name, opts.model_id, time.perf_counter() - t0, len(transcript.segments),
        )  # fmt: skip
        yield AsrUpdate((), stats.seconds, info.duration_s, transcript.language, "done", transcript)

    def _tracker(self, diarize: DiarizeOptions | None):
        if diarize is None or diarize.engine != "offline":
            return None
        return self.diarizer.tracker()

    def _diarize(self, transcript: Transcript, tracker, diarize: DiarizeOptions, path: str | Path) -> None:
        from backends.audio.diarize import assign_speakers, number_speakers

        if tracker is not None:
            turns = tracker.finish(diarize.num_speakers, diarize.max_speakers)
        else:
            turns = self.diarizer.diarize(path, diarize)
        transcript.segments, transcript.speakers = number_speakers(assign_speakers(transcript.segments, turns), turns)
        n = len({t.speaker for t in turns})
        transcript.notes.append(f"diarization ({diarize.engine}): {n} speaker(s)")


class _Run:
    """State of one streamed transcription: language, pending batch, segments so far."""

    def __init__(self, backend: AsrBackend, opts: TranscribeOptions, duration: float | None, should_stop) -> None:
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


class _lease:
    """`residency.use(key)` when a key is given, else a no-op context yielding None."""

    def __init__(self, ctx: Services, key: str | None) -> None:
        self._cm = ctx.residency.use(key) if key else None

    def __enter__(self) -> Any:
        return self._cm.__enter__() if self._cm else None

    def __exit__(self, *exc: Any) -> None:
        if self._cm:
            self._cm.__exit__(*exc)


def create(ctx: Services) -> AsrBackend:
    return AsrBackend(ctx)
