"""Chunking that respects structure, with exact line ranges for citations.

Invariant: a chunk's text is exactly lines `start_line..end_line` (1-based, inclusive) of its page's text joined
by '\\n' (a single line longer than `max_chars` is the one exception: it is cut into pieces that all cite that
line). So a citation "notes.md:12-30" opens on the passage that was retrieved.

Policy: lines are packed into chunks of about `target_chars`, never above `max_chars`. A chunk ends early at a
hard boundary once it holds `target_chars // 3` of its own text: a markdown heading (outside code fences), or a
top-level `def`/`class` (or decorator) in Python, or a top-level function/class/struct line in other code. Other
breaks fall on blank lines (paragraphs, speeches, code blocks) when the chunk is big enough, else mid-block.
Chunks that end for size carry their last lines (up to `overlap_chars`) into the next; chunks that end at a hard
boundary do not, so a section starts clean. Each chunk records its heading trail ("Setup > GPU") or the Python
definition it sits in ("def load").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from backends.rag.ingest import Document

_MD_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_PY_DEF = re.compile(r"^(?:async\s+def|def|class)\s+(\w+)")
_PY_METHOD = re.compile(r"^(?: {4}|\t)(?:async\s+)?def\s+(\w+)")
_CODE_TOP = re.compile(
    r"^(?:export\s+|public\s+|private\s+|protected\s+|static\s+|pub\s+|async\s+|default\s+)*"
    r"(?:function|class|def|fn|func|impl|struct|interface|trait|enum|module|namespace|type|template)\b"
)


@dataclass(frozen=True)
class ChunkOptions:
    target_chars: int = 650  # about 150-200 tokens: fits all-MiniLM-L6-v2's 256-token window
    max_chars: int = 800
    overlap_chars: int = 120

    def __post_init__(self) -> None:
        if not 100 <= self.target_chars <= self.max_chars <= 8000:
            raise ValueError(
                f"chunk sizes target={self.target_chars}, max={self.max_chars}: need 100 <= target <= max <= 8000."
            )
        if not 0 <= self.overlap_chars <= self.target_chars // 2:
            raise ValueError(f"overlap_chars={self.overlap_chars}: use 0 to half of target ({self.target_chars // 2}).")


@dataclass(frozen=True)
class Chunk:
    text: str
    start_line: int  # 1-based, inclusive, within the page's text
    end_line: int
    page: int = 0  # PDF page (1-based); 0 for files without pages
    heading: str = ""

    def embedding_text(self) -> str:
        """What the embedding model sees: the heading trail gives a short passage its context."""
        return f"{self.heading}\n{self.text}" if self.heading else self.text


def chunk_document(doc: Document, opts: ChunkOptions | None = None) -> list[Chunk]:
    opts = opts or ChunkOptions()
    chunks: list[Chunk] = []
    for page, text in doc.pages:
        chunks += chunk_text(text, doc.kind, opts, page=page)
    return chunks


def structure(lines: list[str], kind: str) -> tuple[list[bool], list[str]]:
    """Per line: does it start a hard boundary, and the heading/definition label in force at it."""
    hard = [False] * len(lines)
    labels = [""] * len(lines)
    trail: list[tuple[int, str]] = []  # markdown (level, title)
    label, in_fence = "", False
    for i, line in enumerate(lines):
        if kind == "markdown":
            if _FENCE.match(line):
                in_fence = not in_fence
            m = None if in_fence else _MD_HEADING.match(line)
            if m:
                level = len(m.group(1))
                trail = [t for t in trail if t[0] < level] + [(level, m.group(2).strip())]
                label, hard[i] = " > ".join(t for _, t in trail), True
        elif kind == "python":
            label, hard[i] = _python_line(lines, i, label)
        elif kind == "code" and _CODE_TOP.match(line):
            label, hard[i] = line.strip()[:80], True
        labels[i] = label
    return hard, labels


def _python_line(lines: list[str], i: int, label: str) -> tuple[str, bool]:
    """Label and hard-boundary flag of Python line i: top-level defs/classes, their decorators, and methods."""
    line = lines[i]
    m = _PY_METHOD.match(line)
    if m and label.startswith("class "):
        owner = label.split(".")[0]
        return f"{owner}.{m.group(1)}", not lines[i - 1].strip().startswith("@")
    if not line or line[0] in " \t#)]}":
        return label, False
    m = _PY_DEF.match(line)
    if m:
        prev_decorator = i > 0 and lines[i - 1].startswith("@")
        return f"{line.split()[0]} {m.group(1)}", not prev_decorator
    if line.startswith("@"):
        if i > 0 and lines[i - 1].startswith("@"):
            return label, False
        nxt = next((lines[j] for j in range(i + 1, min(i + 8, len(lines))) if _PY_DEF.match(lines[j])), "")
        m = _PY_DEF.match(nxt)
        return (f"{nxt.split()[0]} {m.group(1)}" if m else label), True
    return "", False


class _Packer:
    """Accumulates consecutive lines into chunks; see the module docstring for the policy."""

    def __init__(self, lines: list[str], labels: list[str], opts: ChunkOptions, page: int) -> None:
        self.lines, self.labels, self.opts, self.page = lines, labels, opts, page
        self.out: list[Chunk] = []
        self.start: int | None = None
        self.size = 0  # chars in the current chunk, overlap included
        self.fresh = 0  # chars added since the last flush (excludes carried overlap)

    def add(self, i: int) -> None:
        line = self.lines[i]
        if len(line) > self.opts.max_chars:
            self.flush(i - 1, overlap=False)
            self._long_line(i)
            return
        if self.start is not None and self.size + len(line) + 1 > self.opts.max_chars:
            self.flush(i - 1, overlap=True)
            if self.size + len(line) + 1 > self.opts.max_chars:
                self.drop_overlap()
        if self.start is None:
            if not line.strip():
                return
            self.start, self.size, self.fresh = i, 0, 0
        self.size += len(line) + 1
        self.fresh += len(line) + 1

    def flush(self, end: int, *, overlap: bool) -> None:
        start = self.start
        self.start, self.size, self.fresh, fresh = None, 0, 0, self.fresh
        if start is None:
            return
        while end >= start and not self.lines[end].strip():
            end -= 1
        if end < start or fresh == 0:
            return
        text = "\n".join(self.lines[start : end + 1])
        self.out.append(Chunk(text, start + 1, end + 1, self.page, self.labels[start]))
        if overlap and self.opts.overlap_chars:
            self._carry(start, end)

    def _carry(self, start: int, end: int) -> None:
        """Start the next chunk with the last lines of the one just flushed (at most overlap_chars)."""
        k, size = end + 1, 0
        while k - 1 > start and size + len(self.lines[k - 1]) + 1 <= self.opts.overlap_chars:
            k -= 1
            size += len(self.lines[k]) + 1
        while k <= end and not self.lines[k].strip():
            size -= len(self.lines[k]) + 1
            k += 1
        if k <= end:
            self.start, self.size, self.fresh = k, size, 0

    def drop_overlap(self) -> None:
        if self.start is not None and self.fresh == 0:
            self.start, self.size = None, 0

    def _long_line(self, i: int) -> None:
        line, step = self.lines[i], self.opts.max_chars
        for pos in range(0, len(line), step):
            piece = line[pos : pos + step]
            if piece.strip():
                self.out.append(Chunk(piece, i + 1, i + 1, self.page, self.labels[i]))


def chunk_text(text: str, kind: str, opts: ChunkOptions | None = None, *, page: int = 0) -> list[Chunk]:
    """Chunks of one text (one page of a PDF), with 1-based line ranges into it."""
    opts = opts or ChunkOptions()
    lines = text.split("\n")
    hard, labels = structure(lines, kind)
    packer = _Packer(lines, labels, opts, page)
    min_fresh = opts.target_chars // 3
    for i, line in enumerate(lines):
        if hard[i]:
            if packer.fresh >= min_fresh:
                packer.flush(i - 1, overlap=False)
            else:
                packer.drop_overlap()
        packer.add(i)
        if not line.strip() and packer.size >= opts.target_chars:
            packer.flush(i, overlap=True)
    packer.flush(len(lines) - 1, overlap=False)
    return packer.out
