"""Speech test data made on this machine: espeak-ng sentences, two-speaker dialogues, and media files.

Everything here is synthesised (licence-clean, reproducible): Debian's `espeak-ng` speaks the text, and the
reference transcript and speaker turns are known exactly. Used by the ASR benchmark and by the tests.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from backends.audio.pcm import SAMPLE_RATE, load_pcm

# Voices that differ audibly (accent, pitch variant); "+f3"/"+m3" are espeak-ng voice variants.
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-us+f3", "en-029+m3")

SENTENCES = (
    "The meeting will start at nine o'clock on Monday morning.",
    "Please send the quarterly report to the finance team before Friday.",
    "We measured the temperature of the water every hour for three days.",
    "The library closes early during the summer holidays.",
    "She bought fresh bread, two apples and a bottle of milk.",
    "Our new office is on the fourth floor of the old brick building.",
    "The train to the airport leaves from platform seven.",
    "He forgot his umbrella and walked home in the rain.",
)


class EspeakMissing(RuntimeError):
    """espeak-ng is not installed (Debian: apt-get install espeak-ng)."""


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def synthesize(text: str, voice: str = "en-us", *, speed: int = 160, pitch: int = 50) -> np.ndarray:
    """espeak-ng speech for `text` as 16 kHz mono float32."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise EspeakMissing("espeak-ng is not installed; on Debian/Ubuntu run: apt-get install -y espeak-ng")
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        cmd = [exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav), "--", text]
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)
        return load_pcm(wav)


@dataclass(frozen=True)
class Turn:
    speaker: str
    start: float
    end: float
    text: str


@dataclass(frozen=True)
class Dialogue:
    pcm: np.ndarray
    turns: tuple[Turn, ...]

    @property
    def duration_s(self) -> float:
        return self.pcm.size / SAMPLE_RATE

    @property
    def text(self) -> str:
        return " ".join(t.text for t in sorted(self.turns, key=lambda t: t.start))


def make_dialogue(lines: list[tuple[str, str, str]], gaps: list[float], *, lead_s: float = 0.5) -> Dialogue:
    """Assemble (speaker, voice, text) lines; `gaps[i]` is the pause before line i+1 (negative = overlap).

    Overlapping speech is mixed (summed and rescaled), as when two people talk at once.
    """
    if len(gaps) != len(lines) - 1:
        raise ValueError(f"need {len(lines) - 1} gaps for {len(lines)} lines, got {len(gaps)}")
    clips = [synthesize(text, voice) for _, voice, text in lines]
    starts, t = [], lead_s
    for i, clip in enumerate(clips):
        starts.append(t)
        t += clip.size / SAMPLE_RATE + (gaps[i] if i < len(gaps) else 0.0)
    total = max(s + c.size / SAMPLE_RATE for s, c in zip(starts, clips, strict=True)) + lead_s
    mix = np.zeros(int(total * SAMPLE_RATE) + 1, np.float32)
    turns = []
    for (speaker, _, text), start, clip in zip(lines, starts, clips, strict=True):
        i = int(start * SAMPLE_RATE)
        mix[i : i + clip.size] += clip
        turns.append(Turn(speaker, round(start, 3), round(start + clip.size / SAMPLE_RATE, 3), text))
    peak = float(np.abs(mix).max()) or 1.0
    return Dialogue(mix / max(1.0, peak), tuple(turns))


def write_media(
    path: Path, pcm: np.ndarray, *, codec: str, rate: int = SAMPLE_RATE, channels: int = 1, sample_rate_in: int = 16000
) -> Path:
    """Encode mono float PCM into any container/codec PyAV can write (mp3, flac, aac in m4a, opus in ogg...).

    `channels=2` duplicates the signal with the right channel at half volume, so a down-mix is observable.
    """
    import av

    path = Path(path)
    layout = "mono" if channels == 1 else "stereo"
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        src = np.asarray(pcm, np.float32)
        planar = src[None, :] if channels == 1 else np.stack([src, 0.5 * src])
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(planar), format="fltp", layout=layout)
        frame.sample_rate = sample_rate_in
        resampler = av.AudioResampler(format=stream.codec_context.format, layout=layout, rate=rate)
        fifo = av.AudioFifo()
        for f in [*resampler.resample(frame), *resampler.resample(None)]:
            f.pts = None
            fifo.write(f)
        size = stream.codec_context.frame_size or 1024  # fixed-frame codecs (aac, opus, mp3) need exact sizes
        pts = 0
        while fifo.samples:
            f = fifo.read(min(size, fifo.samples))
            f.pts, pts = pts, pts + f.samples
            for packet in stream.encode(f):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def write_video_only(path: Path, seconds: float = 1.0, fps: int = 10) -> Path:
    """A small MPEG-4 video with no audio track at all."""
    import av

    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(int(seconds * fps)):
            img = np.full((48, 64, 3), (i * 20) % 255, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return Path(path)


# Made-up domain words (product names, surnames) for the fine-tuning test and benchmark: Whisper has never seen them.
DOMAIN_TERMS = ("Zorvex", "Quillmark", "Brantova", "Kelsingham", "Vexaline", "Dromberg")
TRAIN_CARRIERS = (
    "Please send the {} report to the team.",
    "We met {} at the office on Monday.",
    "The new {} update ships next week.",
    "Ask {} about the budget before noon.",
    "I think {} will call us back today.",
    "Our customers really like {} so far.",
)
HELD_OUT_CARRIERS = ("Yesterday {} sent me a long message.", "Could you check whether {} is ready?")
# Ordinary sentences trained beside the domain ones (rehearsal), so the model keeps its general English.
REHEARSAL = (
    "The children played in the park until it got dark.",
    "My brother works as a nurse at the city hospital.",
    "Turn left at the bakery and walk two more blocks.",
    "The weather was cold and windy all weekend.",
    "We need more chairs for the guests this evening.",
    "She reads the newspaper every morning with her coffee.",
)


def write_domain_dataset(folder: Path, voice: str = "en-us") -> dict[str, list[tuple[Path, str]]]:
    """A fine-tuning folder (audio + .txt beside it) with the domain terms in training carriers, and held-out
    clips: the same terms in new sentences ("terms") and the general SENTENCES ("general"). Returns the held-out
    (path, text) lists; the training folder holds only the training clips (10 % of them become its dev set)."""
    from backends.audio.pcm import write_wav

    folder = Path(folder)
    train_dir, held_dir = folder / "train", folder / "held-out"
    train_dir.mkdir(parents=True, exist_ok=True)
    held_dir.mkdir(parents=True, exist_ok=True)
    for i, carrier in enumerate(TRAIN_CARRIERS):
        for j, term in enumerate(DOMAIN_TERMS):
            text = carrier.format(term)
            write_wav(train_dir / f"c{i}-t{j}.wav", synthesize(text, voice))
            (train_dir / f"c{i}-t{j}.txt").write_text(text, encoding="utf-8")
    for i, text in enumerate(REHEARSAL):
        write_wav(train_dir / f"r{i}.wav", synthesize(text, voice))
        (train_dir / f"r{i}.txt").write_text(text, encoding="utf-8")
    held: dict[str, list[tuple[Path, str]]] = {"terms": [], "general": []}
    for i, carrier in enumerate(HELD_OUT_CARRIERS):
        for j, term in enumerate(DOMAIN_TERMS):
            text = carrier.format(term)
            held["terms"].append((write_wav(held_dir / f"h{i}-t{j}.wav", synthesize(text, voice)), text))
    for i, text in enumerate(SENTENCES):
        held["general"].append((write_wav(held_dir / f"g{i}.wav", synthesize(text, voice)), text))
    return held
