"""LLM decode benchmark: plain `generate` vs `generate` with a static cache vs the studio's CUDA-graph decoder.

Full run (GPU): a Llama-3.1-8B-architecture model with random weights in nf4 (double quant), built on the meta
device and quantised layer by layer on the GPU (no 16 GB checkpoint), under a 12 GB cap. Batch 1, a 512-token
prompt, 256 new tokens, greedy. Reports decode tokens/s, time to first token, peak VRAM, the bandwidth bound
(bytes read per token / measured device copy bandwidth), and whether the greedy tokens agree.

    python -m studio.bench.llm --out results/            # GPU
    python -m studio.bench.llm --quick                   # tiny Llama on CPU (checks the script itself)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from studio.bench.common import versions
from studio.bench.llm_models import (
    GB,
    LLAMA_8B,
    TINY,
    _sync,
    build_fp32_llama,
    build_nf4_llama,
    first_mismatch,
    run_generate,
    run_ours,
)


def copy_bandwidth(device: str, nbytes: int = 2**30, iters: int = 20) -> float:
    """Device-to-device copy: (read + write) bytes per second."""
    if device != "cuda":
        nbytes, iters = 2**26, 5
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    _sync(device)
    return 2 * nbytes * iters / (time.perf_counter() - t0)


def bytes_per_token(model: Any, context: int) -> int:
    """Bytes one decode step must read: every weight and buffer except the embedding table (one row), + KV cache."""
    emb = model.get_input_embeddings().weight
    total = 0
    for p in model.parameters():
        if p is emb:
            total += p.shape[1] * p.element_size()
            continue
        total += p.numel() * p.element_size()
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            total += qs.absmax.numel() * qs.absmax.element_size()
            if getattr(qs, "state2", None) is not None:
                total += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
    total += sum(b.numel() * b.element_size() for b in model.buffers())  # int4 packs and scales are buffers
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    total += 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * context * emb.element_size()
    return total


def measure(name: str, fn: Any, device: str) -> tuple[list[int], dict]:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    tokens, row = fn()
    if device == "cuda":
        row["peak_vram_gb"] = torch.cuda.max_memory_allocated() / GB
    row["method"] = name
    print(f"  {name}: {row['decode_tok_s']:.1f} tok/s, ttft {row['ttft_s'] * 1000:.0f} ms", flush=True)
    return tokens, row


def bench(args: argparse.Namespace) -> dict:
    from backends.llm.fastdecode import StaticDecoder
    from studio.bench.llm_checks import fp32_exactness, teacher_forced

    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.vram_cap_gb * 2**30 / total))
    prompt, new = (64, 32) if args.quick else (args.prompt, args.new)
    t0 = time.perf_counter()
    model = build_fp32_llama(TINY) if args.quick else build_nf4_llama(LLAMA_8B, device)
    build_s = time.perf_counter() - t0
    weights_gb = torch.cuda.memory_allocated() / GB if device == "cuda" else 0.0
    print(f"model built in {build_s:.1f} s ({weights_gb:.2f} GB on the GPU)", flush=True)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, prompt), generator=gen).to(device)
    bw = copy_bandwidth(device)
    bpt = bytes_per_token(model, prompt + new // 2)

    run_generate(model, ids, 8)  # warm-up (cuBLAS, bitsandbytes)
    plain_tokens, plain = measure("plain generate", lambda: run_generate(model, ids, new), device)
    run_generate(model, ids, 8, cache_implementation="static", disable_compile=True)
    static_tokens, static = measure(
        "generate, static cache",
        lambda: run_generate(model, ids, new, cache_implementation="static", disable_compile=True),
        device,
    )
    eager_dec = StaticDecoder(model, prompt + new + 8, use_graph=False)
    run_ours(eager_dec, ids, 8)  # warm-up
    nograph_tokens, nograph = measure("ours, static cache, no graph", lambda: run_ours(eager_dec, ids, new), device)
    rows = [plain, static, nograph]
    ours_tokens, checks = None, {}
    if device == "cuda":
        dec = StaticDecoder(model, prompt + new + 8, use_graph=True)
        run_ours(dec, ids, 8)  # captures the graph
        ours_tokens, ours = measure("ours, CUDA graph", lambda: run_ours(dec, ids, new), device)
        ours.update(capture_s=dec.capture_s, graph_error=dec.graph_error)
        rows.append(ours)
        decs = {"ours, no graph": eager_dec, "ours, CUDA graph": dec}
        checks["teacher_forced_64"] = teacher_forced(model, decs, ids, plain_tokens[:64])
        dec = eager_dec = decs = None
        del model
        torch.cuda.empty_cache()
    checks["fp32_exactness"] = fp32_exactness(device)
    print("checks:", json.dumps(checks, indent=1), flush=True)
    best = rows[-1]
    return {
        "benchmark": "llm decode", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python -m studio.bench.llm " + " ".join(sys.argv[1:]),
        "machine": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "versions": versions("torch", "transformers", "bitsandbytes"), "device": device, "vram_cap_gb": args.vram_cap_gb if device == "cuda" else None,
        "model": "Llama-3.1-8B architecture, random weights, nf4 double-quant" if not args.quick else "tiny Llama fp32",
        "prompt_tokens": prompt, "new_tokens": new, "build_s": build_s, "weights_gb": weights_gb,
        "copy_bandwidth_GBps": bw / GB, "bytes_per_token_GB": bpt / GB, "bandwidth_bound_tok_s": bw / bpt,
        "ratio_to_bound": best["decode_tok_s"] / (bw / bpt), "speedup_vs_plain": best["decode_tok_s"] / plain["decode_tok_s"],
        "rows": rows,
        "checks": checks,
        "greedy_agreement": {
            "static_generate_vs_plain": first_mismatch(static_tokens, plain_tokens),
            "ours_nograph_vs_plain": first_mismatch(nograph_tokens, plain_tokens),
            "ours_nograph_vs_static_generate": first_mismatch(nograph_tokens, static_tokens),
            **({"ours_graph_vs_nograph": first_mismatch(ours_tokens, nograph_tokens),
                "ours_graph_vs_plain": first_mismatch(ours_tokens, plain_tokens)} if ours_tokens else {}),
            "of": new,
        },
    }  # fmt: skip


def rows_table(rows: list[dict], ratio: str) -> list[str]:
    """Markdown rows of a decode table; `ratio` names the first row, the one every speed is divided by."""
    lines = [f"| method | decode tok/s | {ratio} | time to first token | peak VRAM |", "|---|---|---|---|---|"]
    for row in rows:
        vram = f"{row['peak_vram_gb']:.2f} GB" if "peak_vram_gb" in row else "-"
        x = row["decode_tok_s"] / rows[0]["decode_tok_s"]
        lines.append(
            f"| {row['method']} | {row['decode_tok_s']:.1f} | {x:.2f}x | {row['ttft_s'] * 1000:.0f} ms | {vram} |"
        )
    return lines


def markdown(r: dict) -> str:
    lines = [
        f"# LLM decode benchmark ({r['machine']}, {r['date']})",
        "",
        f"`{r['command']}` — {r['model']}; batch 1, {r['prompt_tokens']}-token prompt, {r['new_tokens']} new tokens, "
        f"greedy; VRAM cap {r['vram_cap_gb']} GB; {r['versions']}.",
        "",
        *rows_table(r["rows"], "x plain"),
    ]
    lines += [
        "",
        f"Bandwidth bound: {r['bytes_per_token_GB']:.2f} GB read per token at a measured copy bandwidth of "
        f"{r['copy_bandwidth_GBps']:.0f} GB/s = {r['bandwidth_bound_tok_s']:.0f} tok/s; the fastest row reaches "
        f"{r['ratio_to_bound'] * 100:.0f}% of it.",
        f"Greedy agreement (leading tokens equal, of {r['greedy_agreement']['of']}): "
        + ", ".join(f"{k} {v}" for k, v in r["greedy_agreement"].items() if k != "of")
        + " (random weights: near-ties flip after any rounding difference, see the checks below).",
        "",
        f"fp32 tiny Llama, greedy, same device: {r['checks'].get('fp32_exactness')}",
    ]
    for pair, v in r["checks"].get("teacher_forced_64", {}).items():
        lines.append(
            f"- teacher-forced, 64 positions, {pair}: argmax agrees {v['argmax_agree'] * 100:.0f}%, "
            f"max |diff| {v['max_abs_diff_over_std']:.3f} std, mean {v['mean_abs_diff_over_std']:.4f} std"
        )
    pc = r.get("product_check")
    if pc:
        lines += [
            "",
            "Product path (backends.llm.backend through the residency manager, small random Llama, greedy 64 tokens):",
        ]
        lines += [f"- {k}: {v}" for k, v in pc.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny fp32 Llama on CPU (checks the script)")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--vram-cap-gb", type=float, default=12.0)
    p.add_argument(
        "--product-check",
        type=Path,
        default=None,
        metavar="TOKENIZER_DIR",
        help="also run backends.llm.backend end to end on a small random Llama using this tokenizer",
    )
    p.add_argument("--skip-bench", action="store_true", help="only the product check")
    p.add_argument("--out", type=Path, default=None, help="folder for llm-<device>.json and .md")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if not args.skip_bench:
        result = bench(args)
        _write(args.out, result)
    if args.product_check:
        import tempfile

        from studio.bench.llm_checks import product_check

        with tempfile.TemporaryDirectory() as work:
            check = product_check(args.product_check, Path(work))
        if not args.skip_bench:
            result["product_check"] = check
            _write(args.out, result)
    return 0


def _write(out: Path | None, result: dict) -> None:
    md = markdown(result)
    print(md, flush=True)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"llm-{'h200' if result['device'] == 'cuda' else 'cpu-quick'}"
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
        stem.with_suffix(".md").write_text(md)


if __name__ == "__main__":
    raise SystemExit(main())
