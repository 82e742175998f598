"""Transcript export: plain text, SRT, WebVTT and JSON (segments, words, speakers).

Subtitle cues hold at most two lines of `LINE_CHARS` characters: a longer segment is split into several cues, at
word boundaries with the words' own timestamps when word timestamps exist, otherwise in proportion to characters.
Speakers appear as "SPEAKER_1: " in TXT/SRT and as WebVTT voice tags (`<v SPEAKER_1>`).
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import asdict
from pathlib import Path

from backends.audio.types import Segment, Transcript
from studio.safety import atomic_write_text, contained_path, safe_filename

FORMATS = ("txt", "srt", "vtt", "json")
LINE_CHARS = 42


def timestamp(seconds: float, sep: str = ",") -> str:
    ms = max(0, round(seconds * 1000))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def _cues(seg: Segment, max_chars: int = 2 * LINE_CHARS) -> list[tuple[float, float, str]]:
    text = seg.text.strip()
    if len(text) <= max_chars:
        return [(seg.start, seg.end, text)] if text else []
    if seg.words:
        cues, current = [], []
        for w in seg.words:
            if current and len("".join(x.text for x in [*current, w]).strip()) > max_chars:
                cues.append((current[0].start, current[-1].end, "".join(x.text for x in current).strip()))
                current = []
            current.append(w)
        if current:
            cues.append((current[0].start, current[-1].end, "".join(x.text for x in current).strip()))
        return cues
    pieces = textwrap.wrap(text, max_chars)
    span, total, t, out = seg.end - seg.start, sum(len(p) for p in pieces), seg.start, []
    for p in pieces:
        dt = span * len(p) / total
        out.append((round(t, 3), round(t + dt, 3), p))
        t += dt
    return out


def _lines(text: str) -> str:
    return "\n".join(textwrap.wrap(text, LINE_CHARS)) or text


def to_srt(tr: Transcript) -> str:
    blocks, n = [], 0
    for seg in tr.segments:
        for a, b, text in _cues(seg):
            n += 1
            who = f"{seg.speaker}: " if seg.speaker else ""
            body = _lines(who + text.replace("-->", "->"))  # an arrow in the text would read as a timing line
            blocks.append(f"{n}\n{timestamp(a)} --> {timestamp(b)}\n{body}\n")
    return "\n".join(blocks)


def to_vtt(tr: Transcript) -> str:
    blocks = ["WEBVTT\n"]
    for seg in tr.segments:
        for a, b, text in _cues(seg):
            body = _lines(text.replace("-->", "->"))
            if seg.speaker:
                body = f"<v {seg.speaker}>{body}"
            blocks.append(f"{timestamp(a, '.')} --> {timestamp(b, '.')}\n{body}\n")
    return "\n".join(blocks)


def to_txt(tr: Transcript) -> str:
    """One paragraph per speaker turn (or per segment without speakers), each with its start time."""
    paras: list[tuple[float, str | None, list[str]]] = []
    for seg in tr.segments:
        if paras and seg.speaker and paras[-1][1] == seg.speaker:
            paras[-1][2].append(seg.text.strip())
        else:
            paras.append((seg.start, seg.speaker, [seg.text.strip()]))
    out = []
    for start, speaker, texts in paras:
        who = f" {speaker}:" if speaker else ""
        out.append(f"[{timestamp(start)[:8]}]{who} {' '.join(t for t in texts if t)}")
    return "\n".join(out) + ("\n" if out else "")


def to_json(tr: Transcript) -> str:
    data = {
        "model": tr.model_id,
        "language": tr.language,
        "duration_s": round(tr.duration_s, 3),
        "cancelled": tr.cancelled,
        "notes": tr.notes,
        "segments": [asdict(s) for s in tr.segments],
        "speakers": [asdict(t) for t in tr.speakers],
    }
    return json.dumps(data, indent=2, ensure_ascii=False)


RENDER = {"txt": to_txt, "srt": to_srt, "vtt": to_vtt, "json": to_json}


def export(tr: Transcript, out_dir: Path, stem: str, formats: tuple[str, ...] = FORMATS) -> dict[str, Path]:
    """Write the chosen formats atomically as `<out_dir>/<stem>.<fmt>`; the stem is sanitised."""
    unknown = [f for f in formats if f not in RENDER]
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; choose from {FORMATS}")
    name = safe_filename(stem, default="transcript")
    paths = {}
    for fmt in formats:
        path = contained_path(Path(out_dir), f"{name}.{fmt}")
        atomic_write_text(path, RENDER[fmt](tr))
        paths[fmt] = path
    return paths
