"""Question sets for the RAG evaluation harness: JSONL files, one question per line, checked before anything runs.

    {"question": "...", "source": "hamlet_gut.txt", "lines": [[560, 563]], "answer": "reference answer"}

Keys: `question` (required); `source` (a file name or a path tail such as "notes/setup.md", matched against the end
of a passage's source; null or absent: the notes do not hold the answer, so the right reply is to abstain);
`lines` (optional [start, end] or a list of them, 1-based inclusive: a passage supports the answer when it comes
from `source` and its lines overlap one range; absent: any passage of `source` does); `answer` (optional reference
answer for ROUGE-L and BLEU); `id` and `anchors` (optional, for people reading the file). Any other key, a line that
is not a JSON object, a wrong type, an empty or repeated question is refused with its line number: nothing runs
on half a file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from studio.datafiles import TextFileError, read_text

KEYS = {"question", "source", "lines", "answer", "id", "anchors"}
MAX_BYTES = 5 * 2**20
MAX_QUESTIONS = 5000
BUILTIN = Path(__file__).resolve().parent / "questions"


class QuestionSetError(ValueError):
    """A question set that cannot be used; the message names the line and the fix."""


@dataclass(frozen=True)
class EvalQuestion:
    id: str
    question: str
    source: str | None  # None: unanswerable from the notes
    lines: tuple[tuple[int, int], ...] = ()
    answer: str | None = None

    @property
    def answerable(self) -> bool:
        return self.source is not None

    def supports(self, display: str, start: int, end: int) -> bool:
        """Does a passage (its display path and line range) hold this question's answer?"""
        if self.source is None:
            return False
        src = self.source.replace("\\", "/").lstrip("/")
        if display != src and not display.endswith("/" + src):
            return False
        return not self.lines or any(start <= hi and end >= lo for lo, hi in self.lines)


def builtin_sets() -> dict[str, Path]:
    """The question sets shipped with the studio (name -> file)."""
    return {p.stem: p for p in sorted(BUILTIN.glob("*.jsonl"))}


def load_question_set(path: str | Path) -> list[EvalQuestion]:
    """Read and check a JSONL question set (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise QuestionSetError(f"Question set {path.name!r} not found: upload a .jsonl file.")
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise QuestionSetError(f"Question set {path.name!r} is {size / 2**20:.1f} MB; the limit is 5 MB.")
    try:
        text = read_text(path)  # UTF-8 with or without a BOM, UTF-16 with one (Notepad's "Unicode")
    except TextFileError as e:
        raise QuestionSetError(str(e)) from None
    return parse_question_set(text, path.name)


def parse_question_set(text: str, name: str = "question set") -> list[EvalQuestion]:
    out: list[EvalQuestion] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 may sit inside a string
        raw = raw.removesuffix("\r")
        if not raw.strip():
            continue
        q = _parse_line(raw, number, name)
        key = " ".join(q.question.lower().split())
        if key in seen:
            raise QuestionSetError(f"{name} line {number}: repeats the question of line {seen[key]}; remove one.")
        seen[key] = number
        if len(out) >= MAX_QUESTIONS:
            raise QuestionSetError(f"{name}: more than {MAX_QUESTIONS} questions; split the file.")
        out.append(q if q.id else EvalQuestion(f"q{len(out) + 1}", q.question, q.source, q.lines, q.answer))
    if not out:
        raise QuestionSetError(f"{name} holds no questions: one JSON object per line, e.g. "
                               '{"question": "...", "source": "notes.md", "lines": [3, 9]}.')  # fmt: skip
    return out


def _parse_line(raw: str, number: int, name: str) -> EvalQuestion:
    where = f"{name} line {number}"
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise QuestionSetError(f"{where}: not JSON ({e.msg} at column {e.colno}).") from None
    if not isinstance(obj, dict):
        raise QuestionSetError(f"{where}: a JSON object is needed, not {type(obj).__name__}.")
    unknown = sorted(set(obj) - KEYS)
    if unknown:
        raise QuestionSetError(f"{where}: unknown key(s) {unknown}; use {sorted(KEYS)}.")
    question = obj.get("question")
    if not isinstance(question, str) or not question.strip() or "\x00" in question:
        raise QuestionSetError(f"{where}: 'question' must be non-empty text without null bytes.")
    source = obj.get("source")
    if source is not None and (not isinstance(source, str) or not source.strip()):
        raise QuestionSetError(f"{where}: 'source' must be a file name such as 'notes/setup.md', or null.")
    answer = obj.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise QuestionSetError(f"{where}: 'answer' must be text or null.")
    qid = obj.get("id", "")
    if not isinstance(qid, str | int):
        raise QuestionSetError(f"{where}: 'id' must be text or a number.")
    lines = _parse_lines(obj.get("lines"), where)
    if lines and source is None:
        raise QuestionSetError(f"{where}: 'lines' given without a 'source'; name the file they are in.")
    return EvalQuestion(str(qid), question.strip(), source.strip() if source else None, lines, answer or None)


def _parse_lines(value: object, where: str) -> tuple[tuple[int, int], ...]:
    if value is None:
        return ()
    ranges = (
        [value] if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value) else value
    )
    if not isinstance(ranges, list) or not ranges:
        raise QuestionSetError(f"{where}: 'lines' must be [start, end] or a list of them, e.g. [[12, 30]].")
    out = []
    for r in ranges:
        ok = isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in r)
        if not ok or r[0] > r[1]:
            raise QuestionSetError(f"{where}: line range {r!r} must be [start, end] with start <= end.")
        out.append((max(1, r[0]), r[1]))
    return tuple(out)
