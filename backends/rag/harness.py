"""The RAG evaluation harness: a question set against a knowledge base, scored on retrieval and on answers.

Retrieval, per mode (hybrid, vector, keyword, and hybrid + a reranker when one is chosen), over the answerable
questions: recall@k (a supporting passage in the first k), MRR@10, nDCG@10 with binary relevance (the ideal ranking
puts every supporting chunk of the base first, counted from the index's own line ranges). Answers (one mode, the
first): citation precision (cited passages that hold the support, over answers that cite), ROUGE-L F1 (rouge-score,
Porter stemming) and corpus BLEU (sacrebleu, 13a tokens) against the reference answers, with the [n] citation
marks removed first; abstention rate on the unanswerable questions (and the false abstentions on answerable ones);
latency p50/p95 of the first mode's retrieve + answer. Scores come from those libraries, not our own code.
A run record (kind "rag-eval") keeps the configuration, the question set's hash, the summary and a details.jsonl.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from backends.rag.answer import is_abstention
from backends.rag.questions import EvalQuestion
from studio.units import quantile

RETRIEVAL_DEPTH = 10
_MARKS = re.compile(r"\[\d{1,3}(?:\s*,\s*\d{1,3})*\]")


@dataclass(frozen=True)
class EvalOptions:
    modes: tuple[str, ...] = ("hybrid", "vector", "keyword")
    k: int = 5
    reranker: str | None = None  # adds "hybrid+rerank" when given
    answer: bool = False  # write answers with the chat model (slow on a CPU)
    max_new_tokens: int = 96

    def __post_init__(self) -> None:
        if not self.modes or any(m not in ("hybrid", "vector", "keyword") for m in self.modes):
            raise ValueError(f"modes={self.modes!r}: choose from hybrid, vector, keyword.")
        if not 1 <= self.k <= RETRIEVAL_DEPTH:
            raise ValueError(f"k={self.k}: use 1 to {RETRIEVAL_DEPTH}.")
        if not 8 <= self.max_new_tokens <= 1024:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: use 8 to 1024.")

    @property
    def all_modes(self) -> tuple[str, ...]:
        return (*self.modes, "hybrid+rerank") if self.reranker else self.modes


@dataclass
class QuestionDetail:
    id: str
    question: str
    answerable: bool
    first_hit: dict[str, int | None] = field(default_factory=dict)  # mode -> rank of the first support
    ndcg: dict[str, float] = field(default_factory=dict)
    top: list[str] = field(default_factory=list)  # the first mode's top-k citations
    answer: str = ""
    cited: list[int] = field(default_factory=list)
    cited_supporting: int = 0
    abstained: bool = False
    rouge_l: float | None = None
    latency_s: float = 0.0
    note: str = ""


@dataclass
class EvalReport:
    kb: str
    questions: int
    answerable: int
    retrieval: dict[str, dict[str, float]]  # mode -> recall@k, mrr@10, ndcg@10, ms/query
    answers: dict[str, float | None]
    details: list[QuestionDetail]
    options: EvalOptions
    run_id: str = ""
    cancelled: bool = False

    def summary(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {f"{m}.{k}": v for m, r in self.retrieval.items() for k, v in r.items()}
        return out | {f"answers.{k}": v for k, v in self.answers.items()}


@dataclass
class EvalProgress:
    done: int
    total: int
    message: str
    report: EvalReport | None = None


def _ideal_counts(rag: Any, kb: str, questions: list[EvalQuestion]) -> dict[str, int]:
    """Per question, how many chunks of the base hold its support (the ideal ranking for nDCG)."""
    metas = rag.store.collection(kb).get(include=["metadatas"])["metadatas"]
    by_file: dict[str, list[tuple[int, int]]] = {}
    for m in metas:
        by_file.setdefault(m.get("display", m["path"]), []).append((int(m["start_line"]), int(m["end_line"])))
    out = {}
    for q in questions:
        out[q.id] = sum(q.supports(d, s, e) for d, spans in by_file.items() for s, e in spans) if q.source else 0
    return out


def ndcg_at(flags: list[bool], ideal: int, depth: int = RETRIEVAL_DEPTH) -> float:
    """Binary-relevance nDCG@depth: DCG of the flags over the DCG of `ideal` relevant results first."""
    import math

    dcg = sum(1.0 / math.log2(i + 2) for i, f in enumerate(flags[:depth]) if f)
    best = sum(1.0 / math.log2(i + 2) for i in range(min(ideal, depth)))
    return dcg / best if best else 0.0


def _retrieve(rag: Any, kb: str, q: EvalQuestion, mode: str, opts: EvalOptions, ideal: int, d: QuestionDetail):
    base, rerank = mode.removesuffix("+rerank"), mode.endswith("+rerank")
    res = rag.search(kb, q.question, top_k=RETRIEVAL_DEPTH, mode=base, rerank=rerank, reranker=opts.reranker)
    flags = [q.supports(p.display, p.start_line, p.end_line) for p in res.passages]
    d.first_hit[mode] = next((i + 1 for i, f in enumerate(flags) if f), None)
    d.ndcg[mode] = ndcg_at(flags, ideal)
    if not d.top:
        d.top = [p.citation for p in res.passages[: opts.k]]


def _answer(rag: Any, kb: str, q: EvalQuestion, opts: EvalOptions, d: QuestionDetail, cancel: threading.Event):
    mode = opts.modes[0]
    last = None
    stream = rag.answer(kb, q.question, top_k=opts.k, mode=mode, rerank=bool(opts.reranker), reranker=opts.reranker,
                        use_llm=opts.answer, max_new_tokens=opts.max_new_tokens, cancel=cancel)  # fmt: skip
    for update in stream:
        last = update
    if last is None:
        return
    d.answer, d.cited, d.note = last.text, list(last.cited), last.note
    d.abstained = last.abstained or (last.llm_used and is_abstention(last.text))
    passages = last.search.passages
    d.cited_supporting = sum(
        q.supports(passages[n - 1].display, passages[n - 1].start_line, passages[n - 1].end_line) for n in d.cited
    )


def _answer_metrics(questions: list[EvalQuestion], details: list[QuestionDetail], answered: bool) -> dict:
    unans = [d for d in details if not d.answerable]
    ans = [d for d in details if d.answerable]
    out: dict[str, float | None] = {
        "abstention_rate_unanswerable": sum(d.abstained for d in unans) / len(unans) if unans else None,
        "false_abstention_rate": sum(d.abstained for d in ans) / len(ans) if ans else None,
        "latency_p50_s": quantile([d.latency_s for d in details], 0.5),
        "latency_p95_s": quantile([d.latency_s for d in details], 0.95),
        "citation_precision": None, "rouge_l": None, "bleu": None, "answers_scored": 0,
    }  # fmt: skip
    if not answered:
        return out
    citing = [d for d in ans if d.cited]
    if citing:
        out["citation_precision"] = sum(d.cited_supporting / len(d.cited) for d in citing) / len(citing)
    refs = {q.id: q.answer for q in questions if q.answer and q.answerable}
    scored = [d for d in ans if d.id in refs and d.answer.strip()]
    if scored:
        import sacrebleu
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        preds = [_MARKS.sub("", d.answer).strip() for d in scored]
        for d, p in zip(scored, preds, strict=True):
            d.rouge_l = scorer.score(refs[d.id], p)["rougeL"].fmeasure
        out["rouge_l"] = sum(d.rouge_l or 0.0 for d in scored) / len(scored)
        out["bleu"] = sacrebleu.corpus_bleu(preds, [[refs[d.id] for d in scored]]).score
        out["answers_scored"] = len(scored)
    return out


def _retrieval_metrics(details: list[QuestionDetail], modes: tuple[str, ...], k: int, seconds: dict) -> dict:
    ans = [d for d in details if d.answerable]
    out = {}
    for m in modes:
        ranks = [d.first_hit.get(m) for d in ans]
        n = max(1, len(ans))
        out[m] = {
            f"recall@{k}": sum(1 for r in ranks if r and r <= k) / n,
            "recall@1": sum(1 for r in ranks if r == 1) / n,
            "mrr@10": sum(1.0 / r for r in ranks if r) / n,
            "ndcg@10": sum(d.ndcg.get(m, 0.0) for d in ans) / n,
            "ms_per_query": 1000 * seconds.get(m, 0.0) / max(1, len(details)),
        }
    return out


def evaluate(
    rag: Any, kb: str, questions: list[EvalQuestion], opts: EvalOptions, cancel: threading.Event | None = None
) -> Iterator[EvalProgress]:
    """Stream progress; the last item carries the report (also when cancelled: the questions done so far)."""
    cancel = cancel or threading.Event()
    ideal = _ideal_counts(rag, kb, questions)
    details: list[QuestionDetail] = []
    seconds: dict[str, float] = {}
    modes = opts.all_modes
    for i, q in enumerate(questions):
        if cancel.is_set():
            break
        d = QuestionDetail(q.id, q.question, q.answerable)
        for m in modes:
            t = time.perf_counter()
            if q.answerable:
                _retrieve(rag, kb, q, m, opts, ideal[q.id], d)
            seconds[m] = seconds.get(m, 0.0) + time.perf_counter() - t
        t = time.perf_counter()
        _answer(rag, kb, q, opts, d, cancel)
        d.latency_s = time.perf_counter() - t
        details.append(d)
        yield EvalProgress(i + 1, len(questions), f"{i + 1}/{len(questions)} questions: {q.question[:60]}")
    report = EvalReport(kb, len(details), sum(d.answerable for d in details),
                        _retrieval_metrics(details, modes, opts.k, seconds),
                        _answer_metrics(questions, details, opts.answer), details, opts,
                        cancelled=len(details) < len(questions))  # fmt: skip
    yield EvalProgress(len(details), len(questions), "done", report)


def save_run(runs: Any, report: EvalReport, set_name: str, set_text: str, config: dict[str, Any]) -> str:
    """Record the evaluation as a run (kind "rag-eval"); returns its id."""
    digest = hashlib.sha256(set_text.encode("utf-8")).hexdigest()
    run = runs.create("rag-eval", {"kb": report.kb, "question_set": set_name, **asdict(report.options), **config},
                      dataset_hash=digest)  # fmt: skip
    for i, d in enumerate(report.details):
        row = {f"rank_{m}": r for m, r in d.first_hit.items() if r is not None}
        run.log_metrics(i, latency_s=round(d.latency_s, 4), abstained=int(d.abstained), **row)
    path = run.dir / "details.jsonl"
    path.write_text("".join(json.dumps(asdict(d), ensure_ascii=False) + "\n" for d in report.details), "utf-8")
    run.add_artifact(path)
    run.finish("cancelled" if report.cancelled else "done", questions=report.questions, **report.summary())
    report.run_id = run.id
    return run.id


def evaluation_stream(rag: Any, kb: str, set_path: str | Path, opts: EvalOptions,
                      cancel: threading.Event | None = None) -> Iterator[EvalProgress]:  # fmt: skip
    """Check the question set, evaluate, and save the run (also a cancelled one, with what was done)."""
    from backends.rag.questions import load_question_set

    path = Path(set_path)
    questions = load_question_set(path)
    rag.kb_info(kb)  # a clear error for a base that does not exist, before any work
    last = None
    for step in evaluate(rag, kb, questions, opts, cancel):
        last = step
        if step.report is None:
            yield step
    assert last is not None and last.report is not None
    config = {"embedding_model": rag.embedding_key, "fusion": "z-score max fusion", "questions_total": len(questions)}
    save_run(rag.ctx.runs, last.report, path.name, path.read_text("utf-8-sig"), config)
    yield last
