"""Chat decode benchmark for issue 18: the int4 fused decoder against nf4 and transformers' own paths, one run.

Full run (GPU, 12 GiB cap): a Llama-3.1-8B-architecture model with random weights. Batch 1, a 512-token prompt,
256 new tokens, greedy. Rows:
- int4 model (llm_int4, quantised on load from streamed bf16 tensors: peak VRAM of the load measured):
  plain `generate`; ours: the fused decoder (Triton glue, CUDA graph); the same with the torch glue ops (to show
  what the Triton kernels buy);
- nf4 model (bitsandbytes, double quant): ours, the static-cache CUDA-graph decoder (the path before issue 18);
- last (results are written before it, as it compiles for over a minute): `generate` with a static cache and
  transformers' automatic compile on the int4 model (its own fast path; --no-compile-row skips it).
Time to first token for 512- and 4,096-token prompts for both of ours. Checks: the Triton kernels against torch,
teacher-forced argmax agreement of our decoder with the same int4 model's plain forward, and a residency swap
(GPU -> pinned RAM -> GPU through studio.residency.pinned) giving bit-identical logits.

    python -m studio.bench.llm_int4 --out studio/bench/results/   # GPU
    python -m studio.bench.llm_int4 --quick                       # tiny Llama on CPU (checks the script)
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path
from typing import Any

import torch

from studio.bench.common import Target, machine_info, targets_table, write_results
from studio.bench.llm import bytes_per_token, copy_bandwidth, measure, rows_table
from studio.bench.llm_int4_checks import step_breakdown, swap_check, teacher_forced_agreement
from studio.bench.llm_models import GB, LLAMA_8B, TINY, build_nf4_llama, first_mismatch, run_generate, run_ours

GOAL_TOK_S, GOAL_VRAM_GB = 300.0, 7.0


def random_llama_tensors(config: Any, device: str, seed: int = 0):
    """(checkpoint key, bf16 tensor) of a random Llama, one at a time, as a safetensors stream would give them."""
    from backends.llm.int4 import meta_model

    gen = torch.Generator(device=device).manual_seed(seed)
    for key, p in meta_model(config, torch.bfloat16).state_dict().items():
        if "norm" in key:
            yield key, torch.ones(p.shape, dtype=torch.bfloat16, device=device)
        else:
            std = 0.2 if key == "lm_head.weight" else 0.02  # a peaked head: greedy choices well separated
            yield key, torch.randn(p.shape, generator=gen, device=device, dtype=torch.bfloat16).mul_(std)


def build_int4_llama(cfg_kwargs: dict, device: str, dtype: torch.dtype) -> tuple[Any, dict]:
    """Random Llama quantised to int4 on the way in (the loader's own streaming path); load time and peak."""
    from transformers import LlamaConfig

    from backends.llm.int4 import meta_model, quantize_stream

    config = LlamaConfig(**cfg_kwargs)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = quantize_stream(meta_model(config, dtype), random_llama_tensors(config, device), device, dtype,
                            hqq_iters=20 if device == "cuda" else 2)  # fmt: skip
    info = {"load_s": time.perf_counter() - t0}
    if device == "cuda":
        torch.cuda.synchronize()
        info.update(load_peak_gb=torch.cuda.max_memory_allocated() / GB, weights_gb=torch.cuda.memory_allocated() / GB)
    return model, info


def time_prefill(decoder_factory: Any, vocab: int, n: int, device: str) -> float:
    """Seconds of one prefill of an n-token prompt (after a warm-up of the same length): time to first token."""
    ids = torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(n)).to(device)
    dec = decoder_factory(n + 64)
    dec.prefill(ids)
    _sync(device)
    dec.forget()  # a first turn: nothing reused from the warm-up
    t0 = time.perf_counter()
    dec.prefill(ids)
    _sync(device)
    return time.perf_counter() - t0


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def int4_section(args: argparse.Namespace, device: str, cfg: dict, ids: torch.Tensor, new: int, out: dict) -> None:
    from backends.llm.compact import FusedInt4Decoder
    from backends.llm.kernels import TorchOps, check_ops, pick_ops

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, load = build_int4_llama(cfg, device, dtype)
    out["int4_load"] = load
    print("int4 model:", load, flush=True)
    out["kernel_check"] = pick_ops(torch.device(device), dtype)[1]
    if device == "cuda":
        from backends.llm.kernels import TritonOps

        out["kernel_check_rel_err"] = check_ops(TritonOps, device, dtype)
    out["bytes_per_token_int4_GB"] = bytes_per_token(model, ids.shape[1] + new // 2) / GB
    rows = out["rows"]
    run_generate(model, ids, 4)
    plain_tokens, row = measure("int4: plain generate", lambda: run_generate(model, ids, new), device)
    rows.append(row)
    dec = FusedInt4Decoder(model, ids.shape[1] + new + 8)
    run_ours(dec, ids, 8)  # Triton compiles, graph capture
    ours_tokens, row = measure("int4: ours, fused decoder", lambda: run_ours(dec, ids, new), device)
    row.update(capture_s=dec.capture_s, graph_error=dec.graph_error, ops=dec.ops_note)
    rows.append(row)
    if device == "cuda":
        alt = FusedInt4Decoder(model, ids.shape[1] + new + 8)
        alt.ops, alt.ops_note = TorchOps, "torch ops (forced, for comparison)"
        run_ours(alt, ids, 8)
        _, row = measure("int4: ours, torch glue ops", lambda: run_ours(alt, ids, new), device)
        row.update(graph_error=alt.graph_error)
        rows.append(row)
        out["teacher_forced_int4_torch_ops"] = teacher_forced_agreement(model, alt, ids, plain_tokens[:64])
        alt = None
    if device == "cuda":
        out["step_breakdown"] = step_breakdown(dec)
        print("step breakdown:", out["step_breakdown"], flush=True)
    out["teacher_forced_int4"] = teacher_forced_agreement(model, dec, ids, plain_tokens[:64])
    out["greedy_leading_equal_int4_ours_vs_plain"] = first_mismatch(ours_tokens, plain_tokens)
    factory = lambda n: FusedInt4Decoder(model, n)  # noqa: E731
    out["ttft_int4"] = {str(n): time_prefill(factory, cfg["vocab_size"], n, device) for n in args.ttft}
    dec = None
    out["swap_int4"] = swap_check(model, ids, device)
    out["plain_tokens"] = plain_tokens
    model = None
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def compile_row(cfg: dict, ids: torch.Tensor, new: int, out: dict) -> None:
    """transformers' own fast path on the same int4 model: `generate` with a static cache compiles the forward."""
    model, _ = build_int4_llama(cfg, "cuda", torch.bfloat16)
    plain, device = out["plain_tokens"], "cuda"
    t0 = time.perf_counter()
    try:
        run_generate(model, ids, new, cache_implementation="static")  # compiles (same shapes as the timed run)
        tokens, row = measure("int4: generate, static cache + compile",
                              lambda: run_generate(model, ids, new, cache_implementation="static"), device)  # fmt: skip
        row["first_call_s"] = time.perf_counter() - t0 - row["total_s"]
        out["rows"].append(row)
        out["greedy_leading_equal_int4_compile_vs_plain"] = first_mismatch(tokens, plain)
    except Exception as e:  # report, keep the rest of the run
        out["compile_row_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print("compile row failed:", out["compile_row_error"], flush=True)


def nf4_section(args: argparse.Namespace, cfg: dict, ids: torch.Tensor, new: int, out: dict) -> None:
    from backends.llm.fastdecode import StaticDecoder

    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = build_nf4_llama(cfg, "cuda")
    out["nf4_load"] = {"load_s": time.perf_counter() - t0, "load_peak_gb": torch.cuda.max_memory_allocated() / GB,
                       "weights_gb": torch.cuda.memory_allocated() / GB}  # fmt: skip
    out["bytes_per_token_nf4_GB"] = bytes_per_token(model, ids.shape[1] + new // 2) / GB
    dec = StaticDecoder(model, ids.shape[1] + new + 8, use_graph=True)
    run_ours(dec, ids, 8)
    _, row = measure("nf4: ours, static cache + CUDA graph (before)", lambda: run_ours(dec, ids, new), device="cuda")
    out["rows"].append(row)
    out["teacher_forced_nf4"] = teacher_forced_agreement(model, dec, ids, out["plain_tokens"][:64])
    dec = None
    factory = lambda n: StaticDecoder(model, n, use_graph=True)  # noqa: E731
    out["ttft_nf4"] = {str(n): time_prefill(factory, cfg["vocab_size"], n, "cuda") for n in args.ttft}
    model = None
    gc.collect()
    torch.cuda.empty_cache()


def targets(out: dict) -> list[dict]:
    rows = {r["method"]: r for r in out["rows"]}
    ours = rows.get("int4: ours, fused decoder", {})
    t = [
        Target("int4 fused decode, 512-token prompt, 256 new", ours.get("decode_tok_s"), GOAL_TOK_S, "tok/s"),
        Target("peak VRAM while decoding (int4)", ours.get("peak_vram_gb"), GOAL_VRAM_GB, "GB", False),
        Target(
            "peak VRAM while quantising on load (int4), under the 12 GiB cap",
            out["int4_load"].get("load_peak_gb"),
            round(12 * 2**30 / GB, 2),
            "GB",
            False,
        ),
        Target("logits identical after a pinned-RAM swap", float(out["swap_int4"]["identical"]), 1.0, "bool"),
    ]
    for n, value in out["ttft_int4"].items():
        nf4 = out.get("ttft_nf4", {}).get(n)  # today's path, same run: the goal is to be no slower
        t.append(Target(f"time to first token, {n}-token prompt, int4 (goal: nf4's)", value,
                        round(nf4, 4) if nf4 else float("nan"), "s", False))  # fmt: skip
    return [x.as_dict() for x in t]


def bench(args: argparse.Namespace) -> dict:
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.vram_cap_gb * 2**30 / total))
    cfg = dict(TINY, intermediate_size=768) if args.quick else LLAMA_8B  # int4 needs widths in steps of 32
    prompt, new = (64, 32) if args.quick else (args.prompt, args.new)
    if args.quick:
        args.ttft = [64, 256]
    ids = torch.randint(3, cfg["vocab_size"], (1, prompt), generator=torch.Generator().manual_seed(0)).to(device)
    result = {
        **machine_info("torch", "transformers", "bitsandbytes", "triton"),
        "benchmark": "llm decode, int4 (issue 18)", "device": device,
        "vram_cap_gb": args.vram_cap_gb if device == "cuda" else None,
        "model": "Llama-3.1-8B architecture, random weights" if not args.quick else "tiny Llama (CPU check)",
        "prompt_tokens": prompt, "new_tokens": new, "rows": [], "copy_bandwidth_GBps": copy_bandwidth(device) / GB,
    }  # fmt: skip
    int4_section(args, device, cfg, ids, new, result)
    result["bandwidth_bound_int4_tok_s"] = result["copy_bandwidth_GBps"] / result["bytes_per_token_int4_GB"]
    if device == "cuda":
        nf4_section(args, cfg, ids, new, result)
    result["targets"] = targets(result)
    _save(args.out, result)  # before the slow compile row, which may not end in time
    if device == "cuda" and args.compile_row and time.perf_counter() - args.t0 < args.compile_budget_s:
        compile_row(cfg, ids, new, result)
        _save(args.out, result)
    return result


def _save(out: Path | None, result: dict) -> None:
    md = markdown(result)
    print(md, flush=True)
    if out:
        write_results(out, "llm-int4", result, md)


def markdown(r: dict) -> str:
    lines = [
        f"# Chat decode, int4 vs nf4 vs transformers ({r.get('gpu') or r.get('cpu')}, {r['date']})",
        "",
        f"`{r['command']}` - {r['model']}; batch 1, {r['prompt_tokens']}-token prompt, {r['new_tokens']} new tokens, "
        f"greedy; VRAM cap {r['vram_cap_gb']} GB; {r['versions']}.",
        "",
        *rows_table(r["rows"], "x plain int4 generate"),
    ]
    lines += ["", "| prompt tokens | time to first token, int4 ours | nf4 ours |", "|---|---|---|"]
    for n, s in r["ttft_int4"].items():
        nf4 = r.get("ttft_nf4", {}).get(n)
        lines.append(f"| {n} | {s * 1000:.0f} ms | {'-' if nf4 is None else f'{nf4 * 1000:.0f} ms'} |")
    lines += [
        "",
        f"int4 bytes read per token: {r['bytes_per_token_int4_GB']:.2f} GB; copy bandwidth "
        f"{r['copy_bandwidth_GBps']:.0f} GB/s -> bound {r['bandwidth_bound_int4_tok_s']:.0f} tok/s.",
        f"int4 load (quantise while streaming): {json.dumps(r['int4_load'])}; nf4 load: {json.dumps(r.get('nf4_load'))}.",
        f"Kernels: {r['kernel_check']}. Swap GPU -> pinned RAM -> GPU: {json.dumps(r['swap_int4'])}.",
        f"One decode step on the GPU: {json.dumps(r.get('step_breakdown'))}.",
        "",
        "Teacher-forced (64 tokens fed to each decoder, argmax and logits compared with one plain forward of the same "
        "model; random weights make near-ties, so this measures noise from rounding, see nf4 for the old path's):",
    ]
    for key in ("teacher_forced_int4", "teacher_forced_int4_torch_ops", "teacher_forced_nf4"):
        if key in r:
            v = r[key]
            lines.append(f"- {key}: argmax agrees {v['argmax_agree'] * 100:.0f}%, max |diff| "
                         f"{v['max_abs_diff_over_std']:.3f} std, mean {v['mean_abs_diff_over_std']:.4f} std")  # fmt: skip
    lines += ["", targets_table(r["targets"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny Llama on CPU (checks the script)")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--ttft", type=int, nargs="+", default=[512, 4096])
    p.add_argument("--vram-cap-gb", type=float, default=12.0)
    p.add_argument("--no-compile-row", dest="compile_row", action="store_false")
    p.add_argument("--compile-budget-s", type=float, default=200.0, help="skip the compile row after this many s")
    p.add_argument("--out", type=Path, default=None, help="folder for llm-int4-<device>.json and .md")
    args = p.parse_args(argv)
    args.t0 = time.perf_counter()
    torch.manual_seed(0)
    bench(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
