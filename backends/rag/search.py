"""Lexical search and rank fusion for RAG: a small BM25 over a whole knowledge base, and reciprocal rank fusion.

BM25 (Okapi, k1=1.5, b=0.75, idf = ln(1 + (N - df + 0.5) / (df + 0.5))) runs over every chunk of a knowledge
base, not only the vector candidates, so an exact word or identifier the embedding model misses can still be
found. The term-document matrix is a scipy CSC matrix: memory is about 12 bytes per (chunk, distinct term) pair,
~50 MB for 100,000 chunks. Tokens: lower-cased words, identifiers also split at '_' and camelCase humps, English
stop words dropped, a trailing plural 's' removed.
"""

from __future__ import annotations

import math
import re
from array import array
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

STOP_WORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "but",
        "by",
        "for",
        "from",
        "has",
        "have",
        "he",
        "her",
        "his",
        "i",
        "if",
        "in",
        "into",
        "is",
        "it",
        "its",
        "me",
        "my",
        "no",
        "not",
        "of",
        "on",
        "or",
        "our",
        "she",
        "so",
        "than",
        "that",
        "the",
        "their",
        "them",
        "then",
        "there",
        "these",
        "they",
        "this",
        "to",
        "was",
        "we",
        "were",
        "what",
        "when",
        "where",
        "which",
        "who",
        "whom",
        "why",
        "will",
        "with",
        "you",
        "your",
        "does",
        "did",
        "do",
        "how",
        "can",
        "could",
        "would",
        "should",
        "shall",
        "about",
    ]
)  # "not", "be" and "to" stay out of BM25 on purpose: quote-style queries still match via the vector side
_WORD = re.compile(r"\w+")
_HUMP = re.compile(r"_+|(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
RRF_K = 60  # the constant of Cormack et al. (2009); large k flattens the head of each ranking


def _norm(word: str) -> str:
    w = word.lower()
    if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
        w = w[:-1]
    return w


def tokenize(text: str) -> list[str]:
    out: list[str] = []
    for word in _WORD.findall(text):
        parts = [p for p in _HUMP.split(word) if p]
        if len(parts) > 1:
            out += [_norm(p) for p in parts if len(p) > 1 and p.lower() not in STOP_WORDS]
        low = word.lower()
        if len(low) > 1 and low not in STOP_WORDS:
            out.append(_norm(word))
    return out


class BM25Index:
    """Okapi BM25 over a fixed list of chunks (rebuilt after each ingest)."""

    def __init__(self, ids: list[str], texts: Iterable[str], *, k1: float = 1.5, b: float = 0.75) -> None:
        from scipy.sparse import csc_matrix

        self.ids = list(ids)
        self.row = {d: i for i, d in enumerate(self.ids)}
        self.k1, self.b = k1, b
        vocab: dict[str, int] = {}
        rows, cols, tfs = array("i"), array("i"), array("f")
        lengths = array("f")
        for row, text in enumerate(texts):
            counts = Counter(tokenize(text))
            lengths.append(sum(counts.values()))
            for term, tf in counts.items():
                rows.append(row)
                cols.append(vocab.setdefault(term, len(vocab)))
                tfs.append(tf)
        if len(lengths) != len(self.ids):
            raise ValueError(f"BM25Index: {len(self.ids)} ids but {len(lengths)} texts")
        self.vocab = vocab
        n = len(self.ids)
        self.matrix = csc_matrix(
            (np.frombuffer(tfs, np.float32), (np.frombuffer(rows, np.int32), np.frombuffer(cols, np.int32))),
            shape=(n, len(vocab)),
        )
        self.doc_len = np.frombuffer(lengths, np.float32).copy() if n else np.zeros(0, np.float32)
        self.avg_len = float(self.doc_len.mean()) if n else 0.0
        df = np.diff(self.matrix.indptr)
        self.idf = np.log1p((n - df + 0.5) / (df + 0.5)).astype(np.float32)

    def __len__(self) -> int:
        return len(self.ids)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every chunk for `query` (zeros when no query term occurs)."""
        out = np.zeros(len(self.ids), np.float32)
        if not self.ids:
            return out
        norm = self.k1 * (1 - self.b + self.b * self.doc_len / max(self.avg_len, 1e-9))
        for term in set(tokenize(query)):
            col = self.vocab.get(term)
            if col is None:
                continue
            lo, hi = self.matrix.indptr[col], self.matrix.indptr[col + 1]
            docs, tf = self.matrix.indices[lo:hi], self.matrix.data[lo:hi]
            out[docs] += self.idf[col] * tf * (self.k1 + 1) / (tf + norm[docs])
        return out

    def search(self, query: str, top_n: int, scores: np.ndarray | None = None) -> list[tuple[str, float]]:
        """The `top_n` best chunks with a positive score, best first (`scores`: this query's, if computed)."""
        scores = self.scores(query) if scores is None else scores
        positive = int((scores > 0).sum())
        n = min(top_n, positive)
        if n <= 0:
            return []
        best = np.argpartition(-scores, n - 1)[:n]
        best = best[np.argsort(-scores[best], kind="stable")]
        return [(self.ids[i], float(scores[i])) for i in best]


def reciprocal_rank_fusion(rankings: list[list[str]], k: int = RRF_K) -> dict[str, float]:
    """score(d) = sum over rankings of 1 / (k + rank of d), ranks from 1; ids missing from a ranking add 0."""
    fused: dict[str, float] = {}
    for ranking in rankings:
        for rank, doc_id in enumerate(ranking, start=1):
            fused[doc_id] = fused.get(doc_id, 0.0) + 1.0 / (k + rank)
    return fused


def random_recall_at_k(k: int, n_chunks: int, n_relevant: float) -> float:
    """Chance that k chunks drawn at random include at least one of n_relevant relevant ones."""
    if n_chunks <= 0 or n_relevant <= 0:
        return 0.0
    rel = min(round(n_relevant), n_chunks)
    k = min(k, n_chunks)
    return 1.0 - math.comb(n_chunks - rel, k) / math.comb(n_chunks, k)


# ---- hybrid fusion ------------------------------------------------------------------------------------------------
FUSION_NAME = "z-score max fusion"
VECTOR_WEIGHT = 0.45  # tuned with AGREEMENT on both Shakespeare question sets (studio/bench/rag.py); see fuse()
AGREEMENT = 0.1


def standardise(scores: dict[str, float], reference: list[float]) -> dict[str, float]:
    """(score - mean) / std of `reference` (a retriever's own top-N scores); all zeros when it has < 2 values."""
    ref = np.asarray(reference, np.float64)
    std = float(ref.std()) if len(ref) >= 2 else 0.0
    if std <= 1e-12:
        return dict.fromkeys(scores, 0.0)
    mean = float(ref.mean())
    return {d: (v - mean) / std for d, v in scores.items()}


def fuse(
    vec: dict[str, float], bm: dict[str, float], vec_ref: list[float], bm_ref: list[float],
    weight: float = VECTOR_WEIGHT, agreement: float = AGREEMENT,
) -> dict[str, float]:  # fmt: skip
    """Hybrid score of every candidate: max(w * z_vec, (1 - w) * z_bm25) + agreement * min(the two).

    `vec` and `bm` hold both retrievers' exact scores for every candidate (the union of their top-N lists), and
    each is standardised by its own top-N (`vec_ref`, `bm_ref`): how far above that retriever's typical candidate
    a passage stands. Taking the stronger of the two keeps a passage that one retriever is sure of (a quoted line
    for BM25, a paraphrase for the vectors) from being dragged down by the other, which plain rank fusion does;
    the small agreement term ranks passages both like above ones only one likes. With one retriever (the other
    empty) the order is that retriever's own. On the bench's two question sets this keeps hybrid at or above the
    better single retriever on recall@5 and MRR@10, where reciprocal rank fusion lost to BM25 on quotes.
    """
    zv, zb = standardise(vec, vec_ref), standardise(bm, bm_ref)
    out = {}
    for d in vec.keys() | bm.keys():
        a, b = weight * zv.get(d, 0.0), (1.0 - weight) * zb.get(d, 0.0)
        out[d] = max(a, b) + agreement * min(a, b)
    return out


@dataclass
class Candidates:
    """One question's retrieval candidates before fusion: doc id -> score per retriever, each retriever's own
    top-N scores (the standardisation reference), (document, metadata) records, the base's chunk count."""

    vec: dict[str, float]
    bm: dict[str, float]
    vec_ref: list[float]
    bm_ref: list[float]
    records: dict[str, tuple]
    total: int
    timings: dict[str, float]
    col: Any = None
