"""Training data for Whisper fine-tuning: a folder of audio files with their transcripts, checked line by line.

Accepted layouts (the first that applies):
1. a manifest `manifest.jsonl` / `metadata.jsonl` ({"audio": "clips/a.wav", "text": "...", "split": "dev"?}),
2. a manifest `manifest.csv` / `metadata.csv` (header with `audio`/`file`/`path` and `text`/`transcript`/
   `sentence`; optional `split`),
3. otherwise every audio file with a `.txt` (the transcript) or `.srt` (its cue texts joined) of the same name.
Audio paths in a manifest are relative to the folder and may not leave it. Every problem is collected and reported
together as `file:line: what is wrong` (a missing audio file, an empty text, a duplicate, a bad JSON line, an
unknown column), so a user fixes a manifest in one pass. The dev set is the rows marked `split=dev`, else every
`dev_every`-th example in a stable order (at least one).
"""

from __future__ import annotations

import csv
import hashlib
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

from studio.datafiles import TextFileError, jsonl_lines, read_text
from studio.safety import UnsafePathError, contained_path

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".webm", ".aac")
MANIFESTS = ("manifest.jsonl", "metadata.jsonl", "manifest.csv", "metadata.csv")
AUDIO_KEYS, TEXT_KEYS = ("audio", "file", "path", "file_name"), ("text", "transcript", "sentence", "transcription")
MAX_ERRORS_SHOWN = 20
MAX_ZIP_BYTES = 4 * 2**30


class DatasetError(ValueError):
    """The training folder has problems; `errors` holds one `file:line: message` per problem."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        shown = "\n".join(errors[:MAX_ERRORS_SHOWN])
        more = f"\n... and {len(errors) - MAX_ERRORS_SHOWN} more" if len(errors) > MAX_ERRORS_SHOWN else ""
        super().__init__(f"{len(errors)} problem(s) in the training data:\n{shown}{more}")


@dataclass(frozen=True)
class Example:
    audio: Path
    text: str
    where: str  # "manifest.csv:12" or "clips/a.txt"
    dev: bool = False


def load_examples(folder: Path, dev_every: int = 10) -> list[Example]:
    """Every example of the folder, validated; raises DatasetError listing all problems."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError([f"{folder}: not a folder"])
    manifest = next((folder / m for m in MANIFESTS if (folder / m).is_file()), None)
    errors: list[str] = []
    if manifest is None:
        rows = _sidecar_rows(folder, errors)
    elif manifest.suffix == ".jsonl":
        rows = _jsonl_rows(folder, manifest, errors)
    else:
        rows = _csv_rows(folder, manifest, errors)
    seen: dict[tuple[Path, str], str] = {}
    examples = []
    for ex in rows:
        key = (ex.audio, ex.text)
        if key in seen:
            errors.append(f"{ex.where}: duplicate of {seen[key]} (same audio and text)")
            continue
        seen[key] = ex.where
        examples.append(ex)
    if not errors and not examples:
        errors.append(f"{folder}: no examples (give a manifest.csv/.jsonl, or .txt transcripts beside audio files)")
    if errors:
        raise DatasetError(errors)
    return _split(examples, dev_every)


def _split(examples: list[Example], dev_every: int) -> list[Example]:
    if any(e.dev for e in examples) or len(examples) < 2:
        return examples
    order = sorted(range(len(examples)), key=lambda i: hashlib.sha1(examples[i].where.encode()).hexdigest())
    dev = set(order[:: max(2, dev_every)])
    return [Example(e.audio, e.text, e.where, i in dev) for i, e in enumerate(examples)]


def _audio(folder: Path, name: str, where: str, errors: list[str]) -> Path | None:
    try:
        path = contained_path(folder, name.strip())
    except UnsafePathError as e:
        errors.append(f"{where}: {e}")
        return None
    if not path.is_file():
        errors.append(f"{where}: audio file {name!r} not found in {folder.name}/")
        return None
    if path.suffix.lower() not in AUDIO_SUFFIXES:
        errors.append(f"{where}: {name!r} is not an audio file ({', '.join(AUDIO_SUFFIXES)})")
        return None
    return path


def _row(folder: Path, values: dict, where: str, errors: list[str]) -> Example | None:
    unknown = [k for k in values if k not in (*AUDIO_KEYS, *TEXT_KEYS, "split", "duration")]
    audio_key = next((k for k in AUDIO_KEYS if k in values), None)
    text_key = next((k for k in TEXT_KEYS if k in values), None)
    if audio_key is None or text_key is None:
        missing = "an audio column (audio/file/path)" if audio_key is None else "a text column (text/transcript)"
        errors.append(f"{where}: needs {missing}" + (f"; unknown keys {unknown}" if unknown else ""))
        return None
    text = str(values[text_key] or "").strip()
    audio = _audio(folder, str(values[audio_key] or ""), where, errors)
    if not text:
        errors.append(f"{where}: empty text")
    split = str(values.get("split") or "train").strip().lower()
    if split not in ("train", "dev", "test", "validation"):
        errors.append(f"{where}: split {split!r} must be train or dev")
    if audio is None or not text:
        return None
    return Example(audio, text, where, split != "train")


def _jsonl_rows(folder: Path, manifest: Path, errors: list[str]) -> list[Example]:
    rows = []
    try:
        for line in jsonl_lines(manifest, example='{"audio": "clips/a.wav", "text": "..."}'):
            if line.problem:
                errors.append(f"{line.where}: {line.problem}")
            elif (ex := _row(folder, line.value, line.where, errors)) is not None:
                rows.append(ex)
    except TextFileError as e:
        errors.append(str(e))
    return rows


def _csv_rows(folder: Path, manifest: Path, errors: list[str]) -> list[Example]:
    text = _read_text(manifest, errors) or ""
    dialect = csv.Sniffer().sniff(text.splitlines()[0] if text else ",", delimiters=",;\t|")
    reader = csv.DictReader(io.StringIO(text), dialect=dialect)
    rows = []
    for values in reader:
        where = f"{manifest.name}:{reader.line_num}"
        clean = {(k or "").strip().lower(): v for k, v in values.items() if k is not None}
        if None in values:
            errors.append(f"{where}: more fields than the header has")
            continue
        if (ex := _row(folder, clean, where, errors)) is not None:
            rows.append(ex)
    return rows


def _sidecar_rows(folder: Path, errors: list[str]) -> list[Example]:
    rows = []
    for audio in sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()):
        txt, srt = audio.with_suffix(".txt"), audio.with_suffix(".srt")
        rel = audio.relative_to(folder).as_posix()
        if not txt.is_file() and not srt.is_file():
            errors.append(f"{rel}: no transcript (add {audio.with_suffix('.txt').name} or a manifest)")
            continue
        source = txt if txt.is_file() else srt
        where = source.relative_to(folder).as_posix()
        if (text := _read_text(source, errors, where)) is None:  # not text: reported by _read_text
            continue
        text = text if source is txt else srt_text(text)
        if not text.strip():
            errors.append(f"{where}:1: empty transcript")
            continue
        rows.append(Example(audio, text.strip(), where))
    return rows


def srt_text(srt: str) -> str:
    """The spoken text of an SRT file: cue numbers and timing lines dropped, lines joined."""
    keep = [
        line.strip() for line in srt.splitlines() if line.strip() and not line.strip().isdigit() and "-->" not in line
    ]
    return " ".join(keep)


def _read_text(path: Path, errors: list[str], name: str | None = None) -> str | None:
    """The file's text, or None after adding why it is not text to `errors`."""
    try:
        return read_text(path, name)
    except TextFileError as e:
        errors.append(str(e))
        return None


def extract_zip(archive: Path, target: Path, max_bytes: int = MAX_ZIP_BYTES) -> Path:
    """Unpack an uploaded zip into `target` (a new folder); no member may leave it, the total size is capped."""
    from studio.safety import atomic_folder

    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        raise DatasetError([f"{Path(archive).name}: not a zip file"]) from None
    with zf, atomic_folder(Path(target)) as tmp:
        total = sum(i.file_size for i in zf.infolist())
        if total > max_bytes:
            raise DatasetError([f"{Path(archive).name}: unpacks to {total} bytes, more than {max_bytes}"])
        for info in zf.infolist():
            if info.is_dir():
                continue
            try:
                dest = contained_path(tmp, info.filename)
            except UnsafePathError as e:
                raise DatasetError([f"{Path(archive).name}: member {info.filename!r}: {e}"]) from None
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, dest.open("wb") as out:
                out.write(src.read())
    return Path(target)
