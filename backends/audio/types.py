"""Results of the audio package: plain dataclasses shared by transcription, diarization, subtitles and post-editing."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Word:
    start: float
    end: float
    text: str
    probability: float
    speaker: str | None = None


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    text: str
    words: tuple[Word, ...] = ()
    speaker: str | None = None
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0


@dataclass
class Transcript:
    segments: list[Segment]
    language: str | None
    duration_s: float
    model_id: str
    speakers: list[SpeakerTurn] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # skipped damaged packets, diarization engine, ...
    cancelled: bool = False

    @property
    def text(self) -> str:
        return " ".join(s.text.strip() for s in self.segments if s.text.strip())


ENGINES = ("offline", "pyannote")


@dataclass(frozen=True)
class DiarizeOptions:
    engine: str = "offline"
    num_speakers: int | None = None  # None: decided by clustering
    max_speakers: int = 8  # upper bound for the automatic count
    pyannote_source: str = ""  # a catalog id, or a pipeline folder (with config.yaml) inside a trusted folder

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"diarization engine {self.engine!r} is unknown; use one of {ENGINES}")
        if self.num_speakers is not None and not 1 <= self.num_speakers <= 20:
            raise ValueError(f"number of speakers must be 1..20 (or automatic), got {self.num_speakers}")
        if not 2 <= self.max_speakers <= 20:
            raise ValueError(f"max_speakers must be 2..20, got {self.max_speakers}")
        if self.engine == "pyannote" and not self.pyannote_source:
            raise ValueError("the pyannote engine needs a pipeline folder (download one in the Models tab)")


@dataclass(frozen=True)
class SpeakerTurn:
    start: float
    end: float
    speaker: str


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
