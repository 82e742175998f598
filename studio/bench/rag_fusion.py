"""Held-out figures for the hybrid fusion's two constants (backends/rag/search.py: VECTOR_WEIGHT, AGREEMENT).

The shipped constants were tuned on the bench's two question sets, so their hybrid figures are in-sample. Here
the candidates of every answerable question are fetched once (`RAGBackend.fusion_inputs`: both retrievers' top-N
with exact scores), and fusion is re-scored offline over a grid of (weight, agreement):

- cross-set: tune on one set, report on the other (quotes -> paraphrased and back);
- 2-fold: within each set, questions split in two by a fixed seed, tune on one half, report on the other, both
  folds pooled (every question scored once, by constants that never saw it).

The objective is recall@5 + MRR@10 (the issue's two metrics). Vector and BM25 alone are scored on the same
candidates, so "hybrid - max(vector, BM25)" compares like with like.
"""

from __future__ import annotations

import random
from itertools import product
from typing import Any

from backends.rag.search import AGREEMENT, VECTOR_WEIGHT, fuse

WEIGHTS = tuple(round(0.1 + 0.05 * i, 2) for i in range(17))  # 0.10 .. 0.90
AGREEMENTS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
SEED = 19


def collect(rag: Any, kb: str, questions: list) -> list[tuple[Any, Any]]:
    """(question, its fusion inputs) for the answerable questions."""
    return [(q, rag.fusion_inputs(kb, q.question)) for q in questions if q.answerable]


def _first_hit(q: Any, c: Any, scores: dict[str, float]) -> int | None:
    for rank, d in enumerate(sorted(scores, key=lambda d: -scores[d])[:10], start=1):
        meta = c.records[d][1]
        if q.supports(meta["display"], int(meta["start_line"]), int(meta["end_line"])):
            return rank
    return None


def _metrics(ranks: list[int | None]) -> dict[str, float]:
    n = max(1, len(ranks))
    return {"recall@5": sum(1 for r in ranks if r and r <= 5) / n, "mrr@10": sum(1 / r for r in ranks if r) / n}


def score(items: list, mode: str, weight: float = VECTOR_WEIGHT, agreement: float = AGREEMENT) -> dict[str, float]:
    """recall@5 and MRR@10 of `mode` (vector, keyword or hybrid with these constants) over `items`."""
    ranks = []
    for q, c in items:
        if mode == "vector":
            s = c.vec
        elif mode == "keyword":
            s = c.bm
        else:
            s = fuse(c.vec, c.bm, c.vec_ref, c.bm_ref, weight=weight, agreement=agreement)
        ranks.append(_first_hit(q, c, s))
    return _metrics(ranks)


def tune(items: list) -> tuple[float, float]:
    """The grid point with the best recall@5 + MRR@10 on `items` (ties: closest to the shipped constants)."""

    def key(wa: tuple[float, float]) -> tuple[float, float]:
        m = score(items, "hybrid", *wa)
        return (round(m["recall@5"] + m["mrr@10"], 9), -abs(wa[0] - VECTOR_WEIGHT) - abs(wa[1] - AGREEMENT))

    return max(product(WEIGHTS, AGREEMENTS), key=key)


def _row(items: list, weight: float, agreement: float, tuned_on: str) -> dict[str, Any]:
    h = score(items, "hybrid", weight, agreement)
    best = {m: max(score(items, "vector")[m], score(items, "keyword")[m]) for m in h}
    return {"tuned_on": tuned_on, "weight": weight, "agreement": agreement, **{k: round(v, 4) for k, v in h.items()},
            "margin": {m: round(h[m] - best[m], 4) for m in h}}  # fmt: skip


def _two_fold(items: list) -> dict[str, Any]:
    order = list(range(len(items)))
    random.Random(SEED).shuffle(order)
    halves = [[items[i] for i in order[::2]], [items[i] for i in order[1::2]]]
    ranks: list[int | None] = []
    chosen = []
    for train, test in ((halves[0], halves[1]), (halves[1], halves[0])):
        w, a = tune(train)
        chosen.append([w, a])
        ranks += [_first_hit(q, c, fuse(c.vec, c.bm, c.vec_ref, c.bm_ref, weight=w, agreement=a)) for q, c in test]
    h = _metrics(ranks)
    best = {m: max(score(items, "vector")[m], score(items, "keyword")[m]) for m in h}
    return {"tuned_on": "the other half (2-fold, pooled)", "constants": chosen,
            **{k: round(v, 4) for k, v in h.items()}, "margin": {m: round(h[m] - best[m], 4) for m in h}}  # fmt: skip


def held_out(sets: dict[str, list]) -> dict[str, Any]:
    """Per set: vector, BM25, shipped (in-sample), cross-set and 2-fold hybrid rows; see the module docstring."""
    names = list(sets)
    tuned = {n: tune(items) for n, items in sets.items()}
    out = {}
    for n, items in sets.items():
        other = next(o for o in names if o != n)
        out[n] = {
            "vector": {k: round(v, 4) for k, v in score(items, "vector").items()},
            "keyword": {k: round(v, 4) for k, v in score(items, "keyword").items()},
            "shipped (in-sample)": _row(items, VECTOR_WEIGHT, AGREEMENT, "both sets"),
            "tuned on this set": _row(items, *tuned[n], n),
            "cross-set (held out)": _row(items, *tuned[other], other),
            "2-fold (held out)": _two_fold(items),
        }
    return out


def table(res: dict[str, Any]) -> str:
    lines = ["| set | hybrid constants | tuned on | recall@5 | MRR@10 | recall@5 - max | MRR@10 - max |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for n, rows in res.items():
        for label in ("vector", "keyword"):
            r = rows[label]
            lines.append(f"| {n} | {label} alone | - | {r['recall@5']:.3f} | {r['mrr@10']:.3f} | | |")
        for label in ("shipped (in-sample)", "tuned on this set", "cross-set (held out)", "2-fold (held out)"):
            r = rows[label]
            consts = f"w={r['weight']}, a={r['agreement']}" if "weight" in r else f"per fold {r['constants']}"
            lines.append(f"| {n} | {label}: {consts} | {r['tuned_on']} | {r['recall@5']:.3f} | {r['mrr@10']:.3f} | "
                         f"{r['margin']['recall@5']:+.3f} | {r['margin']['mrr@10']:+.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"
