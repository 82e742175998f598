"""Speech to text with faster-whisper (CTranslate2), streamed, through the residency manager.

`AsrBackend.stream(path, opts)` is a generator of `AsrUpdate`s: the file is decoded in chunks (backends.audio.pcm),
cut into speech windows of at most 28 s by the streaming VAD (or fixed windows with VAD off), and each window is
transcribed under a residency lease (`residency.run`, so a CUDA OOM is retried once). Segments are yielded as each
window finishes; memory stays bounded by one window whatever the file's length. Cancel is cooperative: the
`should_stop` callable is polled between chunks, windows and segments, and the last update carries everything
transcribed so far. With diarization on, speaker embeddings are taken per window while transcribing and the
speakers are assigned to segments and words at the end (backends.audio.diarize). Decoding the windows (batches,
language, the carried prompt, segments in file time) is whisper_run.py's WindowRun.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backends.audio.models import (
    TUNED_PREFIX,
    ModelMissing,
    TunedWhisperLoader,
    WhisperLoader,
    register_vad,
    tuned_models,
)
from backends.audio.pcm import DecodeStats, iter_pcm, mark_last, probe
from backends.audio.types import AsrUpdate, DiarizeOptions, Segment, Transcript, Word
from backends.audio.vad import FixedWindows, SpeechWindows, VadConfig
from backends.audio.whisper_run import WindowRun

if TYPE_CHECKING:
    from studio.services import Services

log = logging.getLogger(__name__)

__all__ = ["AsrBackend", "AsrUpdate", "ModelMissing", "Segment", "TranscribeOptions", "Transcript", "Word", "create"]

# Speech windows for Whisper keep 0.4 s of audio each side of the VAD's speech (the diarizer's regions keep 0.2 s):
# with 0.2 s the pipeline lost word edges and scored WER 0.155 vs plain faster-whisper's 0.150 on tiny.en
# (studio/bench/asr.py, 40 espeak-ng clips); with 0.4 s both score the same, for tiny.en and base.
WHISPER_PAD_S = 0.4
ENGINES = ("faster-whisper", "torch")


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
    # (mean word log-probability below whisper_run.CARRY_MIN_LOGPROB) is not carried, so one hallucination does not
    # feed the next. With batched decoding the windows of one batch share the text before the batch.
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
        run = WindowRun(self, opts, info.duration_s, should_stop)
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
