"""Users' text data files (training manifests, datasets): decoded with a clear message, JSONL read line by line.

Decoding policy: UTF-8 with or without a byte-order mark, and UTF-16 with one, are read; anything else (latin-1,
UTF-16 without a BOM, a binary file) is refused naming the line and byte where it stops being UTF-8.
JSONL policy: lines are split on "\\n" only (a "\\r" before it is dropped, so CRLF files read the same), never on the
other breaks `str.splitlines()` knows (U+2028, U+0085, form feed), which a JSON string may hold raw. Blank lines are
skipped; a BOM at a line's start (files joined with `cat`) is dropped. Every other line must be one JSON object;
each one that is not comes back as a `JsonlLine` with a `problem`, so callers report every bad line as
`file:line: what` in one pass, with the caller's example of a good line as the hint.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_BOMS = {b"\xef\xbb\xbf": "utf-8-sig", b"\xff\xfe": "utf-16", b"\xfe\xff": "utf-16"}


class TextFileError(ValueError):
    """A file that cannot be read as text; `where` is "name" or "name:line", `reason` says what to do."""

    def __init__(self, where: str, reason: str) -> None:
        self.where, self.reason = where, reason
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class JsonlLine:
    where: str  # "name.jsonl:12"
    value: dict[str, Any] | None  # the line's object; None when `problem` says why there is none
    problem: str = ""


def read_text(path: Path, name: str | None = None) -> str:
    """The file's text (see the module's decoding policy); raises TextFileError. `name` is shown instead of
    the file's name (e.g. a path relative to the dataset folder)."""
    path = Path(path)
    name = name or path.name
    raw = path.read_bytes()
    encoding = next((enc for bom, enc in _BOMS.items() if raw.startswith(bom)), None)
    if encoding == "utf-16":
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError:
            raise TextFileError(name, "not valid UTF-16 text despite its byte-order mark; save it as UTF-8.") from None
    if b"\x00" in raw:
        line = raw[: raw.index(b"\x00")].count(b"\n") + 1
        raise TextFileError(
            f"{name}:{line}",
            "holds null bytes (UTF-16 without a byte-order mark, or not a text file); save it as UTF-8.",
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise TextFileError(
            f"{name}:{line}", f"not UTF-8 text (byte {e.start} is 0x{raw[e.start]:02X}); save it as UTF-8."
        ) from None


def jsonl_lines(path: Path, example: str) -> Iterator[JsonlLine]:
    """One JsonlLine per non-blank line of a JSONL file; `example` (a good line, e.g. '{"audio": ..., "text": ...}')
    is the hint for a line that is not an object. Raises TextFileError when the file is not text."""
    path = Path(path)
    for n, line in enumerate(read_text(path).split("\n"), start=1):
        line = line.removesuffix("\r").lstrip("\ufeff")
        if not line.strip():
            continue
        where = f"{path.name}:{n}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            hint = f"; JSONL holds one object like {example} per line, not one array" if line.strip() == "[" else ""
            yield JsonlLine(where, None, f"not valid JSON ({e.msg} at column {e.colno}){hint}")
            continue
        if not isinstance(value, dict):
            kind = {list: "a list", str: "a string", bool: "true/false", type(None): "null"}.get(
                type(value), "a number"
            )
            yield JsonlLine(where, None, f"each line must be a JSON object like {example}, not {kind}")
            continue
        yield JsonlLine(where, value)
