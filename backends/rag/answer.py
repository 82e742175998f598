"""Results of a RAG query and the prompt that turns retrieved passages into a cited answer.

Passages are numbered from 1 in ranking order; the prompt shows each as `[n] (source)` and asks the model to
cite with `[n]`. `cited_numbers` reads the citations back from the answer, ignoring numbers that name no passage,
so the UI only maps real citations to file:line ranges.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

SYSTEM_PROMPT = (
    "You answer questions using only the numbered passages the user gives you. After each claim, cite the "
    "passage it comes from like [1] or [2]. If the passages do not contain the answer, say that they do not."
)
_CITATION = re.compile(r"\[(\d{1,3}(?:\s*,\s*\d{1,3})*)\]")


@dataclass(frozen=True)
class Passage:
    number: int  # 1-based rank, the [n] used in the answer
    id: str
    path: str  # absolute path of the source file
    display: str  # folder name + path relative to it
    start_line: int
    end_line: int
    page: int
    heading: str
    text: str
    vector_score: float | None = None  # cosine similarity, when the vector retriever found it
    bm25_score: float | None = None  # BM25 score, when the keyword retriever found it
    fused_score: float = 0.0  # reciprocal rank fusion
    rerank_score: float | None = None  # cross-encoder logit, when a reranker ran

    @property
    def citation(self) -> str:
        """'notes/setup.md:12-30', or 'papers/x.pdf p.3 lines 4-20' for a PDF page."""
        lines = f"{self.start_line}" if self.start_line == self.end_line else f"{self.start_line}-{self.end_line}"
        if self.page:
            return f"{self.display} p.{self.page} lines {lines}"
        return f"{self.display}:{lines}"


@dataclass
class SearchResult:
    question: str
    mode: str  # "hybrid" | "vector" | "keyword"
    passages: list[Passage]
    ranking_note: str  # how the final order was made, shown in the UI
    reranked: bool = False
    chunks_in_kb: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class AnswerUpdate:
    text: str  # the whole answer so far ("" while retrieving or when no LLM runs)
    search: SearchResult
    note: str = ""
    cited: list[int] = field(default_factory=list)  # passage numbers cited in `text`
    done: bool = False
    llm_used: bool = False
    abstained: bool = False  # refused: no passage is close enough to the question (or it is not about the notes)
    steps: list[str] = field(default_factory=list)  # tool calls and their results, when the chat used tools


def check_question(question: str, max_chars: int) -> str:
    if not isinstance(question, str) or not question.strip():
        raise ValueError("The question is empty: type a question about your notes.")
    if "\x00" in question:
        raise ValueError("The question contains a null byte (\\x00); remove it and ask again.")
    q = question.strip()
    if len(q) > max_chars:
        raise ValueError(f"The question is {len(q)} characters long; keep it under {max_chars}.")
    return q


def build_messages(
    question: str, passages: list[Passage], max_chars_per_passage: int = 1200, max_total_chars: int = 6000
) -> tuple[list[dict], int]:
    """Chat messages (a system rule, then numbered passages and the question) and how many passages fit.

    Passages go in ranking order until `max_total_chars` (about 1,500-2,000 tokens) is spent, so the prompt stays
    well inside a 4k context whatever top_k is; the first passage is always included (cut if it must be).
    """
    blocks: list[str] = []
    used = 0
    for p in passages:
        text = p.text if len(p.text) <= max_chars_per_passage else p.text[:max_chars_per_passage] + " ..."
        block = f"[{p.number}] ({p.citation})\n{text}"
        if blocks and used + len(block) > max_total_chars:
            break
        blocks.append(block)
        used += len(block)
    user = "Passages:\n\n" + "\n\n".join(blocks) + f"\n\nQuestion: {question}\nAnswer, citing passages like [1]:"
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}], len(blocks)


def cited_numbers(text: str, n_passages: int) -> list[int]:
    """Passage numbers cited as [n] or [n, m] in `text`, in first-seen order, limited to 1..n_passages."""
    seen: list[int] = []
    for group in _CITATION.findall(text):
        for part in group.split(","):
            n = int(part)
            if 1 <= n <= n_passages and n not in seen:
                seen.append(n)
    return seen


def cut_repetition(text: str, min_chars: int = 24) -> str | None:
    """The text up to where a sentence starts repeating (a small model's greedy loop), or None when none repeats."""
    sentences = [m for m in re.finditer(r"[^.!?\n]+[.!?\n]", text)]
    seen: set[str] = set()
    for m in sentences:
        key = " ".join(m.group().lower().split())
        if len(key) >= min_chars and key in seen:
            return text[: m.start()].rstrip()
        seen.add(key)
    return None


_ABSTAIN = re.compile(
    r"(do(es)? not|don't|doesn't) (contain|mention|include|say|provide|answer)|not (in|found in|mentioned in) the "
    r"(passages|notes|text)|no (passage|information)|cannot (answer|find)|can't (answer|find)|i (do not|don't) know|"
    r"unable to (answer|find)",
    re.I,
)


def is_abstention(text: str) -> bool:
    """Does an answer decline (the passages do not hold it)? English phrasings of the system prompt's rule."""
    return bool(_ABSTAIN.search(text or ""))


# ---- the question's language ---------------------------------------------------------------------------------
_SCRIPTS = (
    ("CJK", "Chinese or Japanese"), ("HIRAGANA", "Japanese"), ("KATAKANA", "Japanese"), ("HANGUL", "Korean"),
    ("CYRILLIC", "Russian or another Cyrillic-script language"), ("ARABIC", "Arabic"), ("HEBREW", "Hebrew"),
    ("DEVANAGARI", "Hindi"), ("GREEK", "Greek"), ("THAI", "Thai"),
)  # fmt: skip
_LATIN_WORDS = {
    "French": {"le", "la", "les", "des", "est", "que", "qui", "pourquoi", "comment", "quelle", "quel", "dans", "une",
               "avec", "pour", "combien", "où", "sont", "du"},
    "German": {"der", "die", "das", "ist", "und", "wie", "warum", "welche", "wer", "nicht", "mit", "ein", "eine",
               "dem", "den", "viel", "wo", "sind", "für"},
    "Spanish": {"el", "la", "los", "las", "es", "que", "qué", "por", "cómo", "cuál", "dónde", "una", "con", "para",
                "cuánta", "cuánto", "del", "quién", "son"},
    "Italian": {"il", "la", "lo", "gli", "è", "che", "perché", "come", "quale", "dove", "una", "con", "per", "della",
                "quanta", "quanto", "chi", "sono", "nella", "nel", "di"},
    "Portuguese": {"o", "os", "as", "é", "que", "por", "como", "qual", "onde", "uma", "com", "para", "quanta",
                   "quanto", "quem", "são", "da", "do"},
    "Dutch": {"de", "het", "een", "is", "en", "hoe", "waarom", "welke", "wie", "niet", "met", "voor", "hoeveel",
              "waar", "zijn", "van"},
}  # fmt: skip
_ENGLISH = {"the", "a", "is", "are", "what", "why", "how", "which", "who", "where", "does", "do", "of", "to", "in",
            "and", "for", "with", "much", "many", "when", "that", "on"}  # fmt: skip


def question_language(text: str) -> str | None:
    """The language a question is clearly written in when it is not English (None: English or unsure).

    Non-Latin scripts by their Unicode names (over a third of the letters); Latin-script languages by their
    function words (at least two, and more than English ones)."""
    import unicodedata

    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return None
    for script, language in _SCRIPTS:
        if sum(script in unicodedata.name(ch, "") for ch in letters) > len(letters) / 3:
            return language
    words = re.findall(r"\w+", text.lower())
    english = sum(w in _ENGLISH for w in words)
    best = max(_LATIN_WORDS, key=lambda lang: sum(w in _LATIN_WORDS[lang] for w in words))
    hits = sum(w in _LATIN_WORDS[best] for w in words)
    return best if hits >= 2 and hits > english else None
