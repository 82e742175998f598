"""Reading and checking fine-tune datasets (torch-free): the formats users bring, file:line problems, duplicates,
a fixed dev split.

Every record becomes one conversation, a list of `{"role": "system"|"user"|"assistant", "content": str}`:
- OpenAI `{"messages": [{"role", "content"}, ...]}`
- ShareGPT `{"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}`
- Alpaca `{"instruction", "input" (optional), "output"}`
- `{"prompt", "completion"}` (strings)
Files: .jsonl (one record a line), .json (an array of records, or {"data": [...]}), .csv (one record a row, columns
named as above; `messages`/`conversations` cells hold JSON), .parquet (read with polars).

Policy: a record with a problem (malformed line, wrong keys, empty answer, bad role) is reported as `file:line` and
refuses the dataset unless `skip_invalid`; exact duplicate conversations are counted and only the first is kept.
The dev split is by sha256 of each conversation, so it is the same every run and independent of file order.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from backends.finetune.types import DataError, DataOptions, DatasetReport, Problem
from studio.datafiles import TextFileError, jsonl_lines, read_text

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MAX_PROBLEMS_SHOWN = 20
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
                "model": "assistant", "system": "system"}  # fmt: skip
Conversation = list[dict[str, str]]
_EXAMPLE_LINE = '{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}'


def read_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) for every record of a file; `where` is "name:line" (JSONL, CSV) or "name:item N"."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Dataset file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path.name}: unsupported file type {suffix!r}; use {', '.join(SUFFIXES)}.")
    if suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif suffix == ".json":
        yield from _read_json(path)
    elif suffix == ".csv":
        yield from _read_csv(path)
    else:
        yield from _read_parquet(path)


def _read_text(path: Path) -> str:
    try:
        return read_text(path)
    except TextFileError as e:
        raise DataError(str(e)) from None


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        for line in jsonl_lines(path, example=_EXAMPLE_LINE):
            yield line.where, (Problem(line.where, line.problem) if line.problem else line.value)
    except TextFileError as e:
        raise DataError(str(e)) from None


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path.name}:{e.lineno}: malformed JSON ({e.msg}); a .json file holds one array.") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f'{path.name}: expected a JSON array of records (or {{"data": [...]}}), got an object.')
    for i, rec in enumerate(data, start=1):
        yield f"{path.name}:item {i}", rec


def _read_csv(path: Path) -> Iterator[tuple[str, Any]]:
    reader = csv.DictReader(_read_text(path).splitlines(keepends=True))
    for row in reader:
        rec: dict[str, Any] = {k: v for k, v in row.items() if k is not None}
        for key in ("messages", "conversations"):
            if isinstance(rec.get(key), str) and rec[key].strip():
                with contextlib.suppress(json.JSONDecodeError):  # else reported by the record check
                    rec[key] = json.loads(rec[key])
        yield f"{path.name}:{reader.line_num}", rec


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import polars as pl

        frame = pl.read_parquet(path)
    except Exception as e:  # polars raises its own error types for corrupt files
        raise DataError(f"{path.name}: not a readable Parquet file ({str(e).splitlines()[0][:200]}).") from None
    for i, rec in enumerate(frame.iter_rows(named=True), start=1):
        yield f"{path.name}:row {i}", rec


def detect_format(rec: Any) -> str | None:
    if not isinstance(rec, dict):
        return None
    if "messages" in rec:
        return "messages"
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    if "prompt" in rec and "completion" in rec:
        return "prompt_completion"
    return None


def to_conversation(rec: Any, fmt: str) -> Conversation:
    """One record -> a conversation; raises ValueError with a short reason for a bad record."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected an object with keys, got {type(rec).__name__}")
    if fmt == "messages":
        turns = [
            (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None) for m in _list(rec, "messages")
        ]
    elif fmt == "sharegpt":
        turns = [
            (m.get("from"), m.get("value")) if isinstance(m, dict) else (None, None)
            for m in _list(rec, "conversations")
        ]
    elif fmt == "alpaca":
        prompt = _text(rec, "instruction")
        extra = rec.get("input") or ""
        if not isinstance(extra, str):
            raise ValueError("'input' must be a string")
        turns = [("user", f"{prompt}\n\n{extra}" if extra.strip() else prompt), ("assistant", _text(rec, "output"))]
        if isinstance(rec.get("system"), str) and rec["system"].strip():
            turns.insert(0, ("system", rec["system"]))
    elif fmt == "prompt_completion":
        turns = [("user", _text(rec, "prompt")), ("assistant", _text(rec, "completion"))]
    else:
        keys = ", ".join(sorted(map(str, rec))[:8]) or "none"
        raise ValueError(
            f"unknown keys ({keys}); expected messages, conversations, instruction/output or prompt/completion"
        )
    return _check_turns(turns)


def _list(rec: dict, key: str) -> list:
    value = rec.get(key)
    if not isinstance(value, list) or not value:
        raise ValueError(f"{key!r} must be a non-empty list of turns")
    return value


def _text(rec: dict, key: str) -> str:
    value = rec.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{key!r} is missing or not a string")
    return value


def _check_turns(turns: list[tuple[Any, Any]]) -> Conversation:
    conv: Conversation = []
    for i, (role, content) in enumerate(turns, start=1):
        if role not in ROLE_ALIASES:
            raise ValueError(f"turn {i}: unknown role {role!r} (use system, user or assistant)")
        if not isinstance(content, str):
            raise ValueError(f"turn {i}: content is missing or not a string")
        conv.append({"role": ROLE_ALIASES[role], "content": content})
    roles = [t["role"] for t in conv]
    if "assistant" not in roles:
        raise ValueError("no assistant turn: nothing to learn from")
    if "user" not in roles[: roles.index("assistant")]:
        raise ValueError("the first assistant turn comes before any user turn")
    for i, t in enumerate(conv, start=1):
        if t["role"] == "assistant" and not t["content"].strip():
            raise ValueError(f"turn {i}: empty assistant answer")
        if t["role"] == "user" and not t["content"].strip():
            raise ValueError(f"turn {i}: empty user message")
    return conv


def conversation_hash(conv: Conversation) -> str:
    return hashlib.sha256(json.dumps(conv, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()


def is_dev(digest: str, fraction: float) -> bool:
    return int(digest[:12], 16) % 10_000 < round(fraction * 10_000)


def load_conversations(
    path: Path, fmt: str = "auto", skip_invalid: bool = False
) -> tuple[list[Conversation], DatasetReport]:
    """Read and check one file; duplicates removed (first kept). Raises DataError listing file:line problems."""
    report = DatasetReport(Path(path), fmt)
    convs: list[Conversation] = []
    seen: set[str] = set()
    for where, rec in read_records(Path(path)):
        report.records += 1
        if isinstance(rec, Problem):
            report.problems.append(rec)
            continue
        kind = fmt if fmt != "auto" else (detect_format(rec) or "?")  # auto: each record by its keys
        if report.format == "auto" and kind != "?":
            report.format = kind
        try:
            conv = to_conversation(rec, kind)
        except ValueError as e:
            report.problems.append(Problem(where, str(e)))
            continue
        digest = conversation_hash(conv)
        if digest in seen:
            report.duplicates += 1
            continue
        seen.add(digest)
        convs.append(conv)
    report.valid = len(convs)
    if report.records == 0:
        raise DataError(f"{Path(path).name} holds no records.")
    if report.problems and not skip_invalid:
        raise DataError(problem_message(report))
    if not convs:
        raise DataError(problem_message(report) if report.problems else f"{Path(path).name}: no usable records.")
    return convs, report


def problem_message(report: DatasetReport) -> str:
    shown = "\n".join(f"- {p}" for p in report.problems[:MAX_PROBLEMS_SHOWN])
    more = len(report.problems) - MAX_PROBLEMS_SHOWN
    tail = f"\n- ... and {more} more" if more > 0 else ""
    return (
        f"{len(report.problems)} of {report.records} records in {report.path.name} cannot be used:\n{shown}{tail}\n"
        "Fix them, or tick 'skip invalid records' to train on the rest."
    )


def split_dataset(opts: DataOptions) -> tuple[list[Conversation], list[Conversation], DatasetReport]:
    """train and dev conversations + the report. With no dev file, the split is by hash (at least one dev example
    when there are two or more)."""
    convs, report = load_conversations(Path(opts.path), opts.format, opts.skip_invalid)
    if opts.dev_path:
        dev, dev_report = load_conversations(Path(opts.dev_path), opts.format, opts.skip_invalid)
        dev_hashes = {conversation_hash(c) for c in dev}
        train = [c for c in convs if conversation_hash(c) not in dev_hashes]
        report.duplicates += len(convs) - len(train)  # examples also in the dev file leave the training set
        report.problems += dev_report.problems
    else:
        hashes = [conversation_hash(c) for c in convs]
        flags = [is_dev(h, opts.dev_fraction) for h in hashes]
        if opts.dev_fraction > 0 and not any(flags) and len(convs) >= 2:
            flags[min(range(len(hashes)), key=hashes.__getitem__)] = True
        train = [c for c, f in zip(convs, flags, strict=True) if not f]
        dev = [c for c, f in zip(convs, flags, strict=True) if f]
    if not train:
        raise DataError("No training examples left after the dev split: add examples or lower the dev fraction.")
    report.train, report.dev = len(train), len(dev)
    report.preview = [{"messages": c} for c in train[:5]]
    return train, dev, report
