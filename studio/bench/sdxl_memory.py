"""Where SDXL's peak GPU bytes are: one image size through the studio's image backend (random weights, real
architecture, the residency manager choosing placement) with torch's memory history on, then the allocations live
at the peak grouped by the code that made them, and the planner's prediction for the mode the backend picked.

It found why SDXL 1024 with every component on the GPU peaked 3.5 GB over the planner: the fp32 VAE decode takes
4.77 GiB (a 2.0 GiB cuDNN workspace among it), and the "parked" run the planner had been fitted to had decoded with
the UNet evicted, not the text encoders (docs/planner.md).

    python -m studio.bench.sdxl_memory --cap-gib 12 --size 1024 --out studio/bench/results   # GPU only
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from studio.bench.common import describe_machine, targets_table

GiB = 2**30
OURS = ("diffusers/", "transformers/", "backends/", "studio/", "torch/nn/")


def site(frames: list[dict[str, Any]], keys: tuple[str, ...] = OURS, depth: int = 1) -> str:
    """The innermost `depth` frames from files matching `keys`, as `path:line function`."""
    out = []
    for f in frames:
        if any(k in f["filename"] for k in keys):
            short = f["filename"].split("site-packages/")[-1]
            out.append(f"{short.split('/')[-2]}/{short.split('/')[-1]}:{f['line']} {f['name']}")
            if len(out) >= depth:
                break
    return " <- ".join(out) or "?"


def peak_allocations(snapshot: dict[str, Any]) -> tuple[int, float, list[dict[str, Any]]]:
    """Replay the allocator trace of device 0: (peak bytes, seconds into the trace, the blocks live at the peak)."""
    events = snapshot["device_traces"][0]
    total = peak = 0
    peak_i, live_sizes = -1, {}
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            live_sizes[e["addr"]] = e["size"]
            total += e["size"]
            if total > peak:
                peak, peak_i = total, i
        elif e["action"] == "free_completed" and e["addr"] in live_sizes:
            total -= live_sizes.pop(e["addr"])
    live: dict[int, dict[str, Any]] = {}
    for e in events[: peak_i + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] == "free_completed":
            live.pop(e["addr"], None)
    t0 = events[0]["time_us"] if events else 0
    return peak, (events[peak_i]["time_us"] - t0) / 1e6 if events else 0.0, list(live.values())


def grouped(blocks: list[dict[str, Any]], keys: tuple[str, ...], depth: int, n: int) -> list[tuple[str, float]]:
    by: collections.Counter[str] = collections.Counter()
    for b in blocks:
        by[site(b["frames"], keys, depth)] += b["size"]
    return [(k, round(v / GiB, 3)) for k, v in by.most_common(n)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from backends.image.diffusion import GenerateRequest
    from backends.image.tiny import SDXL_CONFIGS
    from studio.bench.diffusion import bench_ours, close_context, make_ctx, prepare_model
    from studio.bench.planner_rows import _image_info
    from studio.planner import parts_for
    from studio.planner.tasks import ImageGen

    work = Path(tempfile.mkdtemp(prefix="bench-sdxl-memory-"))
    ctx = make_ctx(work, args.cap_gib)
    torch.cuda.memory._record_memory_history(max_entries=3_000_000, stacks="python")
    try:
        backend, rec = prepare_model(ctx, SDXL_CONFIGS, work / "model")
        mode = backend.plan(rec, GenerateRequest("x", model=str(rec.source.root), width=args.size, height=args.size))
        task = ImageGen(args.size, args.size, parked=mode.text_encoders_parked, tiled=mode.vae_tiling)
        parts = parts_for(_image_info(rec, "sdxl", "sdxl"), task)
        t0 = time.perf_counter()
        gen = bench_ours(backend, rec, args.size, 4, args.runs)
        seconds = time.perf_counter() - t0
        snapshot = torch.cuda.memory._snapshot()
        tiers = {m.key.rsplit("/", 1)[-1]: getattr(m.tier, "value", m.tier) for m in ctx.residency.snapshot().models}
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
        close_context(ctx)
    peak, at_s, blocks = peak_allocations(snapshot)
    predicted = sum(parts.values())
    return {
        "size": args.size, "cap_gib": args.cap_gib, "memory_mode": gen["memory_mode"], "seconds": round(seconds, 1),
        "runs": gen["runs"], "tiers_after": tiers, "traced_peak_bytes": peak, "peak_at_s": round(at_s, 2),
        "predicted_bytes": predicted, "predicted_parts": parts,
        "error_pct": round(100 * (predicted - peak) / peak, 1),
        "live_at_peak_by_studio_code": grouped(blocks, ("backends/", "studio/"), 2, 12),
        "live_at_peak_by_library_code": grouped(blocks, OURS, 3, 20),
        "largest_blocks_at_peak": [(round(b["size"] / 2**20, 1), site(b["frames"], OURS, 5))
                                   for b in sorted(blocks, key=lambda b: -b["size"])[:12]],
    }  # fmt: skip


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# SDXL {r['size']}x{r['size']}: where the peak is ({r['machine']['gpu'] or 'no GPU'}, {r['date']})",
        "",
        f"Machine: {describe_machine(r['machine'])}",
        f"Command: `{r['command']}`. Random weights, real architecture, {len(r['runs'])} generations of 4 steps "
        f"through the studio's image backend under a {r['cap_gib']} GiB cap.",
        "",
        f"Mode the backend picked: **{r['memory_mode']}**; components' tiers after: {r['tiers_after']}.",
        f"Peak (allocator trace, all generations): **{r['traced_peak_bytes'] / GiB:.3f} GiB** at {r['peak_at_s']} s; "
        f"per generation (torch peak counter): {[x['peak_vram_gib'] for x in r['runs']]} GiB.",
        f"Planner for that mode: {r['predicted_bytes'] / GiB:.3f} GiB "
        f"({ {k: round(v / GiB, 3) for k, v in r['predicted_parts'].items()} }), error {r['error_pct']:+.1f} %.",
        "",
        "| GiB live at the peak | allocated by (studio code) |",
        "|---|---|",
        *[f"| {v:.3f} | `{k}` |" for k, v in r["live_at_peak_by_studio_code"]],
        "",
        "| GiB live at the peak | allocated by (library code, innermost first) |",
        "|---|---|",
        *[f"| {v:.3f} | `{k}` |" for k, v in r["live_at_peak_by_library_code"]],
        "",
        "| largest blocks at the peak, MiB | allocated by |",
        "|---|---|",
        *[f"| {mib:.1f} | `{k}` |" for mib, k in r["largest_blocks_at_peak"]],
    ]
    return "\n".join(lines) + "\n\n" + targets_table(r["targets"]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cap-gib", type=float, default=12.0, help="per-process GPU memory cap (the budget follows)")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--runs", type=int, default=3, help="generations (the first loads the components)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU: the allocator trace is CUDA's")
        return 2
    from studio.bench.common import Target, machine_info, write_results

    result = run(args)
    result["machine"] = machine_info("torch", "diffusers", "transformers")
    result["date"], result["command"] = result["machine"]["date"], result["machine"]["command"]
    result["targets"] = [Target(f"planner error vs traced peak, SDXL {args.size} ({result['memory_mode']})",
                                abs(result["error_pct"]), 10.0, "%", higher_is_better=False).as_dict()]  # fmt: skip
    text = markdown(result)
    print(text, flush=True)
    if args.out is not None:
        mode = "parked" if "parked" in result["memory_mode"] else "all-on"
        write_results(args.out, f"sdxl-memory-{args.size}-{mode}", result, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
