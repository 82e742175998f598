"""LLM post-edit of a transcript: punctuation, casing and a glossary of names/terms, and nothing else.

The chat backend (`llm.complete`) proposes an edited text; a guard then compares word sequences normalised to
lower-case letters and digits (difflib on tokens) and keeps only:
- changes of casing and punctuation (the normalised words are equal, including "o clock" -> "o'clock" merges);
- replacements whose new words are exactly a glossary term and whose old words resemble it (a mis-heard name);
every other change (a new, dropped, reordered or different word, a chatty preamble) is rejected and the original
words stay. Accepted edits are mapped back to the segments they came from, so timings are kept; word-level
timestamps keep the recogniser's words.
"""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from backends.audio.types import Segment

log = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You correct speech-recognition transcripts. Add punctuation and capital letters. "
    "Spell these names and terms exactly as given: {glossary}. "
    "Do not add, remove, reorder or replace any other word. Reply with the corrected text only."
)
CASE_PUNCT, GLOSSARY, REJECTED = "case/punctuation", "glossary", "rejected"


def norm(token: str) -> str:
    return re.sub(r"[^0-9a-z]+", "", token.lower())


@dataclass(frozen=True)
class PostEditOptions:
    glossary: tuple[str, ...] = ()
    chunk_words: int = 120  # words per LLM call (small models keep format better on short inputs)
    similarity: float = 0.45  # how close the heard words must be to a glossary term to be replaced by it

    def __post_init__(self) -> None:
        if not 10 <= self.chunk_words <= 1000:
            raise ValueError(f"chunk_words must be 10..1000, got {self.chunk_words}")
        if not 0.0 <= self.similarity <= 1.0:
            raise ValueError(f"similarity must be within [0, 1], got {self.similarity}")
        bad = [t for t in self.glossary if not norm(t)]
        if bad:
            raise ValueError(f"glossary terms need letters or digits: {bad}")


@dataclass
class GuardResult:
    tokens: list[str]  # the text that is kept, token by token
    origin: list[int]  # index of the original token each kept token stands for
    spans: list[tuple[str, str | None]] = field(default_factory=list)  # (text, tag) for a diff view
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (original, proposed) refused

    @property
    def text(self) -> str:
        return " ".join(self.tokens)


def _glossary_match(new: list[str], old: list[str], glossary: tuple[str, ...], similarity: float) -> bool:
    joined_new = "".join(norm(t) for t in new)
    terms = {"".join(norm(w) for w in term.split()) for term in glossary}
    if not joined_new or joined_new not in terms or not old:
        return False
    joined_old = "".join(norm(t) for t in old)
    return difflib.SequenceMatcher(None, joined_old, joined_new).ratio() >= similarity


def guard(original: str, proposed: str, opts: PostEditOptions) -> GuardResult:
    """Keep only the allowed changes of `proposed` relative to `original` (see the module docstring)."""
    a, b = original.split(), proposed.split()
    na, nb = [norm(t) for t in a], [norm(t) for t in b]
    res = GuardResult([], [])
    matcher = difflib.SequenceMatcher(None, na, nb, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        old, new = a[i1:i2], b[j1:j2]
        if op == "equal":
            _keep(res, new, list(range(i1, i2)), CASE_PUNCT, changed=old != new)
        elif op == "replace" and "".join(na[i1:i2]) == "".join(nb[j1:j2]):
            _keep(res, new, _spread(i1, i2, len(new)), CASE_PUNCT, changed=True)  # "o clock" -> "o'clock"
        elif op == "replace" and _glossary_match(new, old, opts.glossary, opts.similarity):
            _keep(res, new, _spread(i1, i2, len(new)), GLOSSARY, changed=True)
        else:
            if op != "insert" or any(nb[j1:j2]):
                res.rejected.append((" ".join(old), " ".join(new)))
            _keep(res, old, list(range(i1, i2)), None, changed=False)
            if new and any(nb[j1:j2]):
                res.spans.append((" ".join(new), REJECTED))
    return res


def _spread(i1: int, i2: int, n: int) -> list[int]:
    return [min(i2 - 1, i1 + k) for k in range(n)] if i2 > i1 else [max(0, i1 - 1)] * n


def _keep(res: GuardResult, tokens: list[str], origin: list[int], tag: str | None, *, changed: bool) -> None:
    if not tokens:
        return
    res.tokens.extend(tokens)
    res.origin.extend(origin)
    res.spans.append((" ".join(tokens), tag if changed else None))


def _clean_reply(reply: str) -> str:
    """Strip wrappers small models like to add: code fences and surrounding quotes."""
    text = reply.strip().strip("`").strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1]
    return text


@dataclass
class PostEditReport:
    segments: list[Segment]
    spans: list[tuple[str, str | None]]
    rejected: list[tuple[str, str]]
    accepted_changes: int


def postedit(
    llm: Any, segments: list[Segment], opts: PostEditOptions, should_stop=None, on_chunk=None
) -> PostEditReport:
    """Post-edit segment texts chunk by chunk with `llm.complete`; segments keep their times and speakers.

    `should_stop()` is polled before each chunk (the rest stays as transcribed); `on_chunk(done, total)` reports.
    """
    tokens, seg_of = [], []
    for i, seg in enumerate(segments):
        for tok in seg.text.split():
            tokens.append(tok)
            seg_of.append(i)
    system = SYSTEM_PROMPT.format(glossary=", ".join(opts.glossary) if opts.glossary else "(none)")
    kept: list[list[str]] = [[] for _ in segments]
    spans: list[tuple[str, str | None]] = []
    rejected: list[tuple[str, str]] = []
    starts = range(0, len(tokens), opts.chunk_words)
    for n, start in enumerate(starts):
        if on_chunk is not None:
            on_chunk(n, len(starts))
        chunk = tokens[start : start + opts.chunk_words]
        if should_stop is not None and should_stop():
            res = GuardResult(chunk, list(range(len(chunk))), [(" ".join(chunk), None)])
        else:
            messages = [{"role": "system", "content": system}, {"role": "user", "content": " ".join(chunk)}]
            reply = llm.complete(messages, max_new_tokens=2 * len(chunk) + 32, temperature=0.0)
            res = guard(" ".join(chunk), _clean_reply(reply), opts)
        for tok, o in zip(res.tokens, res.origin, strict=True):
            kept[seg_of[start + o]].append(tok)
        spans.extend(res.spans)
        rejected.extend(res.rejected)
    edited = [replace(s, text=" ".join(k)) for s, k in zip(segments, kept, strict=True)]
    accepted = sum(1 for _, tag in spans if tag in (CASE_PUNCT, GLOSSARY))
    log.info("post-edit: %d change(s) kept, %d rejected", accepted, len(rejected))
    return PostEditReport(edited, spans, rejected, accepted)
