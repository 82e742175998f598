"""RAG bench: retrieval and answer quality on two Shakespeare question sets, and ingest speed, in one run.

Per question set (studio/bench/rag_data.py: "quotes", 22 hand-written; "paraphrased", 61 answerable + 6 not,
low keyword overlap) and per retrieval (vector, BM25, hybrid, and hybrid + each real cross-encoder downloaded):
recall@1/@5, MRR@10, nDCG@10 through the evaluation harness (backends/rag/harness.py), plus abstention on the
unanswerable questions and, with `--answers N`, the chat model's answers on N questions per set (citation
precision, ROUGE-L, BLEU, latency). Fusion held out (studio/bench/rag_fusion.py): its constants re-tuned on one
set and reported on the other, and 2-fold within each set, beside the shipped in-sample figures.
Ingest: the same corpus into two knowledge bases, the previous settings (PyTorch fp32, batches of 16) and today's
(precision "auto": bf16 on a CPU with AMX, run by OpenVINO when installed, batches of 32), each timed whole;
then the same chunk texts embedded by both in interleaved rounds (A, B, A, B, ...: the machine is shared) whose
median ratio is the speed-up target. Their retrieval must agree within the stated tolerance (mean top-10 overlap
of the vector search >= 0.9; recall@5 and MRR@10 within one question on both sets). The OpenVINO model is
converted once into a cache kept between bench runs (its one-time cost is reported). `--device cuda` is the GPU ingest
figure instead (studio/bench/rag_gpu.py).

    python -m studio.bench.rag --quick    # windows of four plays (~90 chunks): under a minute on this CPU
    python -m studio.bench.rag            # six full plays (~1,200 chunks): several minutes on a 2-core CPU
    python -m studio.bench.rag --answers 12   # and 12 answers per set from the chat model (the committed run)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from backends.rag import RAGBackend, RAGConfig
from backends.rag.harness import EvalOptions, evaluate
from backends.rag.search import random_recall_at_k
from studio.bench.common import Target, describe_machine, machine_info, targets_table, write_results
from studio.bench.rag_data import (
    SUBSET_WINDOWS,
    WORKS,
    keyword_overlap,
    paraphrased_set,
    prepare_corpus,
    quotes_set,
)
from studio.bench.rag_fusion import collect as fusion_collect
from studio.bench.rag_fusion import held_out
from studio.bench.rag_fusion import table as fusion_table

BASELINE = {"embed_precision": "fp32", "embed_batch_size": 16, "flush_chunks": 64}  # the settings before issue 19
ROUNDS = 3  # interleaved A/B embedding rounds
ROUND_CHUNKS = 128  # chunk texts per round (all of them in --quick)
OVERLAP_TOLERANCE = 0.9  # mean share of the vector search's top 10 that both precisions return
METRIC_TOLERANCE = 1.0  # |recall@5 or MRR@10 change| x answerable questions: at most one question's rank moves


def _evaluate(rag: Any, kb: str, questions: list, opts: EvalOptions) -> Any:
    report = None
    for step in evaluate(rag, kb, questions, opts):
        report = step.report or report
    return report


def random_baseline(rag: Any, kb: str, questions: list, k: int = 5) -> float:
    """Mean over answerable questions of the chance that k random chunks include a supporting one."""
    metas = rag.store.collection(kb).get(include=["metadatas"])["metadatas"]
    chances = []
    for q in questions:
        if q.answerable:
            relevant = sum(q.supports(m["display"], int(m["start_line"]), int(m["end_line"])) for m in metas)
            chances.append(random_recall_at_k(k, len(metas), relevant))
    return statistics.fmean(chances) if chances else 0.0


def _ingest(rag: RAGBackend, kb: str, folder: Path) -> dict[str, float]:
    rag.create_kb(kb)
    rag.embed(["warm-up: load the embedding model before timing"])
    t0 = time.perf_counter()
    report = rag.ingest(kb, folder)
    seconds = time.perf_counter() - t0
    return {"chunks": report.chunks_total, "seconds": round(seconds, 2),
            "chunks_per_s": round(report.chunks_total / max(seconds, 1e-9), 1)}  # fmt: skip


def _interleaved(base: RAGBackend, fast: RAGBackend, texts: list[str]) -> dict[str, Any]:
    """The same texts embedded by the baseline (A) and ours (B) in alternating rounds; the median ratio."""
    rounds = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        base.embed(texts)
        a = time.perf_counter() - t0
        t0 = time.perf_counter()
        fast.embed(texts)
        b = time.perf_counter() - t0
        rounds.append({"baseline_s": round(a, 3), "ours_s": round(b, 3), "ratio": round(a / max(b, 1e-9), 3),
                       "load_1min": round(os.getloadavg()[0], 2)})  # fmt: skip
    return {"chunks": len(texts), "rounds": rounds,
            "median_ratio": round(statistics.median(r["ratio"] for r in rounds), 2),
            "ours_chunks_per_s": round(len(texts) / statistics.median(r["ours_s"] for r in rounds), 1),
            "baseline_chunks_per_s": round(len(texts) / statistics.median(r["baseline_s"] for r in rounds), 1)}  # fmt: skip


def _prepare_openvino(fast: RAGBackend, ctx: Any) -> dict[str, Any]:
    """Convert (or find) ours' OpenVINO model in a cache kept between bench runs; its one-time cost."""
    from backends.rag.backend import SAMPLE_NOTES
    from backends.rag.models import KINDS, calibration_passages, openvino_available, resolve_precision
    from backends.rag.openvino_embed import prepare

    kind = resolve_precision(fast.config.embed_precision, ctx.residency.device)
    if kind not in KINDS or not openvino_available(kind) or ctx.residency.device != "cpu":
        return {"used": False}
    folder = fast._model_folder(fast.embedding_key)
    t0 = time.perf_counter()
    cache = Path(tempfile.gettempdir()) / "studio-rag-bench-cache"
    path = prepare(folder, cache, kind, calibration_passages(SAMPLE_NOTES))
    return {"used": True, "kind": kind, "prepare_s": round(time.perf_counter() - t0, 1), "folder": path.name}


def _agreement(base: RAGBackend, fast: RAGBackend, questions: list) -> dict[str, float]:
    """How far the fast ingest's vector search agrees with the baseline's (same questions, own query vectors)."""
    overlaps, firsts = [], []
    for q in questions:
        a = [p.id for p in base.search("bench-fp32", q.question, top_k=10, mode="vector", rerank=False).passages]
        b = [p.id for p in fast.search("bench", q.question, top_k=10, mode="vector", rerank=False).passages]
        overlaps.append(len(set(a) & set(b)) / max(1, len(a)))
        firsts.append(a[:1] == b[:1])
    return {
        "mean_top10_overlap": round(statistics.fmean(overlaps), 4),
        "top1_agreement": round(statistics.fmean(firsts), 4),
    }


def _retrieval_rows(report: Any) -> dict[str, dict[str, float]]:
    return {m: {k: round(v, 4) for k, v in r.items()} for m, r in report.retrieval.items()}


def run(quick: bool, data_dir: Path, answers: int) -> dict[str, Any]:
    from studio.app import build_context
    from studio.settings import Settings

    ctx = build_context(Settings(data_dir=data_dir / "data", models_dir=data_dir / "models", open_browser=False))
    try:
        fast = ctx.backends.rag
        base = RAGBackend(fast.ctx, replace(RAGConfig(), **BASELINE))
        base.store = fast.store  # one Chroma client per folder
        windows = SUBSET_WINDOWS if quick else None
        corpus = data_dir / ("shakespeare-quick" if quick else "shakespeare")
        offsets = prepare_corpus(corpus, windows)
        sets = {"quotes": quotes_set(offsets, windows), "paraphrased": paraphrased_set(offsets, windows)}
        full = {w: 0 for w in WORKS}
        overlap = {
            "quotes": keyword_overlap(quotes_set(full, None)),
            "paraphrased": keyword_overlap(paraphrased_set(full, None)),
        }
        load_start = round(os.getloadavg()[0], 2)
        openvino = _prepare_openvino(fast, ctx)
        ingest = {"baseline": _ingest(base, "bench-fp32", corpus) | BASELINE}
        ingest["ours"] = _ingest(fast, "bench", corpus) | {"embed_precision": fast.config.embed_precision,
                                                           "embed_batch_size": fast.config.embed_batch_size,
                                                           "flush_chunks": fast.config.flush_chunks}  # fmt: skip
        ingest["ours"]["precision_used"] = _precision_used(ctx, fast) + (" (OpenVINO)" if openvino["used"] else "")
        ingest["openvino_preparation"] = openvino
        docs = fast.store.collection("bench").get(include=["documents"])["documents"]
        ingest["interleaved"] = _interleaved(base, fast, docs[:ROUND_CHUNKS])
        rerankers = [r for r, _, ok in fast.rerankers() if ok and not ctx.catalog.get(f"reranker:{r}").demo]
        out_sets = {}
        for name, questions in sets.items():
            opts = EvalOptions(modes=("hybrid", "vector", "keyword"), k=5)
            rep = _evaluate(fast, "bench", questions, opts)
            rows = _retrieval_rows(rep)
            for r in rerankers:
                rr = _evaluate(fast, "bench", questions, replace(opts, modes=("hybrid",), reranker=r))
                rows[f"hybrid+{r}"] = _retrieval_rows(rr)["hybrid+rerank"]
            before = _retrieval_rows(_evaluate(base, "bench-fp32", questions, opts))
            out_sets[name] = {
                "questions": rep.questions, "answerable": rep.answerable, "keyword_overlap": round(overlap[name], 3),
                "retrieval": rows, "retrieval_fp32_ingest": before, "answers": _answers(fast, questions, answers, rep),
                "agreement": _agreement(base, fast, [q for q in questions if q.answerable]),
                "random_recall@5": round(random_baseline(fast, "bench", questions), 4),
            }  # fmt: skip
        demo = _demo_reranker_check(fast, sets["quotes"])
        fusion = held_out({n: fusion_collect(fast, "bench", qs) for n, qs in sets.items()})
        return {
            "benchmark": "rag", "quick": quick,
            "corpus": "subset windows of four plays" if quick else "full plays: " + ", ".join(WORKS),
            "paraphrased_answerable_shipped": sum(q.answerable for q in paraphrased_set(full, None)),
            "ingest": ingest, "sets": out_sets, "fusion_held_out": fusion, "answers_per_set": answers, "rerankers_measured": rerankers, "demo_reranker": demo,
            "embedding_model": fast.embedding_key, "device": ctx.residency.device,
            "load_average_1min": [load_start, round(os.getloadavg()[0], 2)],
        }  # fmt: skip
    finally:
        ctx.jobs.shutdown(timeout=5)


def _precision_used(ctx: Any, rag: RAGBackend) -> str:
    from backends.rag.models import resolve_precision

    return resolve_precision(rag.config.embed_precision, ctx.residency.device)


def _answers(rag: RAGBackend, questions: list, n: int, retrieval_report: Any) -> dict[str, Any]:
    """Abstention from the retrieval run (the relevance gate); with n > 0, n chat-model answers scored too."""
    out = {k: retrieval_report.answers[k] for k in ("abstention_rate_unanswerable", "false_abstention_rate")}
    if n <= 0:
        return out | {"chat_answers": "not run (pass --answers N)"}
    picked = [q for q in questions if q.answerable][:n] + [q for q in questions if not q.answerable][:2]
    rep = _evaluate(rag, "bench", picked, EvalOptions(modes=("hybrid",), answer=True, max_new_tokens=64))
    chat = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in rep.answers.items()}
    return out | {"chat_answers": chat | {"questions": len(picked)}}


def _demo_reranker_check(rag: RAGBackend, questions: list) -> dict[str, Any]:
    """The untrained demo cross-encoder through the same path (wiring only: its order is noise)."""
    rep = _evaluate(rag, "bench", questions[:5], EvalOptions(modes=("hybrid",), reranker="tiny-random-cross-encoder"))
    r = rep.retrieval["hybrid+rerank"]
    return {"questions": rep.questions, "ms_per_query": round(r["ms_per_query"], 1), "note": "untrained demo model"}


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, s in res["sets"].items():
        r = s["retrieval"]
        for metric in ("recall@5", "mrr@10"):
            best = max(r["vector"][metric], r["keyword"][metric])
            out.append(Target(f"{name}: hybrid {metric} - max(vector, BM25)", round(r["hybrid"][metric] - best, 4),
                              0.0, metric).as_dict())  # fmt: skip
    shipped = res["paraphrased_answerable_shipped"]
    out.append(Target("paraphrased set: answerable questions shipped", shipped, 60, "questions").as_dict())
    ing = res["ingest"]
    out.append(Target("ingest speed-up vs fp32/batch-16, interleaved rounds, median",
                      ing["interleaved"]["median_ratio"], 3.0, "x").as_dict())  # fmt: skip
    out.append(Target("ingest speed-up vs fp32/batch-16, one whole ingest each",
                      round(ing["ours"]["chunks_per_s"] / max(ing["baseline"]["chunks_per_s"], 1e-9), 2), 3.0, "x").as_dict())  # fmt: skip
    worst_overlap = min(s["agreement"]["mean_top10_overlap"] for s in res["sets"].values())
    out.append(
        Target(
            "ingest: vector top-10 overlap with the fp32 ingest", worst_overlap, OVERLAP_TOLERANCE, "share"
        ).as_dict()
    )
    delta = max(abs(s["retrieval"][m][k] - s["retrieval_fp32_ingest"][m][k]) * s["answerable"]
                for s in res["sets"].values() for m in ("vector", "keyword", "hybrid") for k in ("recall@5", "mrr@10"))  # fmt: skip
    out.append(Target("ingest: max metric change vs the fp32 ingest, in questions", round(delta, 2),
                      METRIC_TOLERANCE, "questions", higher_is_better=False).as_dict())  # fmt: skip
    for name, rows in res["fusion_held_out"].items():
        for label in ("cross-set (held out)", "2-fold (held out)"):
            for metric in ("recall@5", "mrr@10"):
                out.append(Target(f"{name}: hybrid {metric} - max(vector, BM25), {label}",
                                  rows[label]["margin"][metric], 0.0, metric).as_dict())  # fmt: skip
    return out


def _set_table(name: str, s: dict[str, Any]) -> str:
    rows = [f"| {m} | {r['recall@1']:.3f} | {r['recall@5']:.3f} | {r['mrr@10']:.3f} | {r['ndcg@10']:.3f} | "
            f"{r['ms_per_query']:.0f} |" for m, r in s["retrieval"].items()]  # fmt: skip
    a = s["answers"]
    chat = a["chat_answers"]
    chat_line = chat if isinstance(chat, str) else _chat_line(chat)
    return (
        f"### {name}: {s['answerable']} answerable + {s['questions'] - s['answerable']} unanswerable questions "
        f"(keyword overlap {s['keyword_overlap']:.2f}; random recall@5 {s['random_recall@5']:.3f})\n\n"
        "| retrieval | recall@1 | recall@5 | MRR@10 | nDCG@10 | ms/query |\n|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + f"\n\nAbstention on unanswerable: {a['abstention_rate_unanswerable']}; false abstention on answerable: "
        f"{a['false_abstention_rate']:.3f}. Chat answers: {chat_line}.  \n"
        f"Agreement with the fp32 ingest: {s['agreement']}.\n"
    )


def _chat_line(c: dict[str, Any]) -> str:
    def f(v: Any, spec: str = ".3f") -> str:
        return "n/a" if v is None else format(v, spec)

    return (f"{c['questions']} questions ({c['answers_scored']} with a reference scored): ROUGE-L {f(c['rouge_l'])}, "
            f"BLEU {f(c['bleu'], '.1f')}, citation precision {f(c['citation_precision'])}, abstention on unanswerable "
            f"{f(c['abstention_rate_unanswerable'], '.2f')}, false abstention {f(c['false_abstention_rate'], '.2f')}, "
            f"latency p50 {f(c['latency_p50_s'], '.1f')} s / p95 {f(c['latency_p95_s'], '.1f')} s")  # fmt: skip


def _ingest_md(ing: dict[str, Any]) -> str:
    il, prep = ing["interleaved"], ing["openvino_preparation"]
    rounds = ", ".join(f"{r['ratio']:.2f}x (load {r['load_1min']})" for r in il["rounds"])
    once = (f" Ours runs in OpenVINO; its one-time conversion took {prep['prepare_s']} s (cached after; 0 when the"
            " bench's cache already held it)."
            if prep.get("used") and "prepare_s" in prep else "")  # fmt: skip
    return (
        f"Ingest ({ing['ours']['chunks']} chunks), one whole ingest each: PyTorch fp32, batch 16 (before) "
        f"{ing['baseline']['chunks_per_s']} chunks/s ({ing['baseline']['seconds']} s); ours "
        f"({ing['ours']['precision_used']}, batch {ing['ours']['embed_batch_size']}) {ing['ours']['chunks_per_s']} "
        f"chunks/s ({ing['ours']['seconds']} s).  \nInterleaved rounds over the same {il['chunks']} chunk texts "
        f"(baseline, ours, baseline, ours, ...): {rounds}; **median {il['median_ratio']:.2f}x** (ours "
        f"{il['ours_chunks_per_s']} vs {il['baseline_chunks_per_s']} chunks/s).{once}\n\n"
    )


def to_markdown(res: dict[str, Any]) -> str:
    return (
        f"# RAG bench ({res['corpus']})\n\nMachine: {describe_machine(res['machine'])}; device {res['device']}.  \n"
        f"Command: `{res['command']}`; 1-minute load average at start/end {res['load_average_1min']} (2 cores: above "
        "2, other work shared them).\n\n"
        + _ingest_md(res["ingest"])
        + "\n".join(_set_table(n, s) for n, s in res["sets"].items())
        + "\n### Fusion constants held out (studio/bench/rag_fusion.py; hybrid without a reranker)\n\n"
        + fusion_table(res["fusion_held_out"])
        + f"\nRerankers measured: {res['rerankers_measured'] or 'none downloaded (offline): not measured'}; the "
        f"untrained demo cross-encoder ran through the same path ({res['demo_reranker']}).\n\n"
        + targets_table(res["targets"])
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="windows of four plays (the default test's subset)")
    parser.add_argument("--answers", type=int, default=0, help="chat-model answers per question set (slow on CPU)")
    parser.add_argument("--device", default="cpu", help="cpu (this bench) or cuda (the GPU ingest figure)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="results folder")
    parser.add_argument("--data-dir", type=Path, help="keep the indexes here (else a temporary folder)")
    args = parser.parse_args(argv)
    if args.device != "cpu":
        from studio.bench.rag_gpu import main as gpu_main

        return gpu_main(args)
    if args.data_dir:
        res = run(args.quick, args.data_dir, args.answers)
    else:
        with tempfile.TemporaryDirectory(prefix="rag-bench-") as tmp:
            res = run(args.quick, Path(tmp), args.answers)
    (Path(tempfile.gettempdir()) / "rag-bench-last.json").write_text(json.dumps(res, default=str))  # if below fails
    res["machine"] = machine_info("sentence-transformers", "chromadb", "torch", "rouge-score", "sacrebleu", "openvino")
    res["command"] = res["machine"]["command"]
    res["targets"] = targets(res)
    md = to_markdown(res)
    print(md)
    write_results(args.out, "rag-quick" if args.quick else "rag", res, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
