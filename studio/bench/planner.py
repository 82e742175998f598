"""VRAM planner benchmark (issue 21): the planner's prediction against the measured peak, one row per job, one run.

GPU (an H200 capped at 12 GiB: the studio's VRAM cap and `set_per_process_memory_fraction`), architecture-true random
weights built from configs, nothing from the Hub:
- Llama-3.1-8B nf4, built once (studio.bench.llm_models): chat at 2k and 8k context through the studio's static-cache
  CUDA-graph decoder (prefill of context - 64 tokens, then 16 steps); then, with that model still resident,
  a Llama-2-13B-architecture nf4 model that does not fit beside it: the planner predicts the split, the layers
  beyond it are built one by one and parked in pinned pools (studio/residency/stream.py), and eager decoding
  streams them in: tokens/s, the share of time moving layers, GPU bytes predicted vs measured;
  last, QLoRA at 2k on the same 8B model (the studio's recipe, studio.bench.finetune.measure);
- Whisper-small fp16, batch 16 x 30 s windows, 100 tokens each (transformers' generate, greedy);
- SDXL 1024x1024 through the studio's image backend (4 steps) and SD1.5 rank-16 LoRA training at 512 px (6 steps),
  both with random components (studio.bench.diffusion);
- YOLOv8s training at 640 px, batch 16, one epoch of 32 synthetic images (Ultralytics, AMP, the studio's arguments).
Measured: torch's peak allocated bytes over the job (what the planner predicts; the CUDA context is not in it).
Predicted: `studio.planner` formulas without learning; the "learned" column is the prediction after the earlier rows
of the same family were stored (only chat has two rows). Rows that could not run within `--budget-s` are "not
measured", never estimated.

CPU (`--quick`): the same code paths with tiny configs (fp32 Llama, tiny SD/SDXL, yolov8n at 64 px, a 2-layer
Whisper; the simulated card for streaming); the CPU has no allocator peak counter, so only predictions and times.

    python -m studio.bench.planner --out studio/bench/results          # GPU, about 2-4 minutes
    python -m studio.bench.planner --quick --out studio/bench/results  # CPU check of the script
    python -m studio.bench.planner --only yolo --yolo-shapes 640x16,640x8,512x16,640x4   # the YOLO factor's check
"""

from __future__ import annotations

import argparse
import gc
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from studio.bench.common import Target, describe_machine, machine_info, targets_table, write_results
from studio.bench.planner_rows import (
    chat_row,
    offload_row,
    qlora_row,
    sd_lora_row,
    sdxl_row,
    whisper_row,
    yolo_row,
)
from studio.planner import VramPlanner

GiB = 2**30
CAP_GIB = 12.0
GOAL_ERROR_PCT = 10.0


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Run:
    """Shared state of one benchmark run: device, deadline, the planner that learns, the rows."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.quick = args.quick
        self.device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
        self.deadline = time.monotonic() + args.budget_s
        self.vram = VramPlanner()
        self.rows: list[dict[str, Any]] = []
        self.extra: dict[str, Any] = {}
        self.work = Path(tempfile.mkdtemp(prefix="bench-planner-"))
        self.out = args.out
        self.only = [w.strip().lower() for w in (args.only or "").split(",") if w.strip()]
        self.prior = _prior_rows(args.merge) if args.merge else []
        self.machine = machine_info("torch", "transformers", "bitsandbytes", "diffusers", "ultralytics")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def wanted(self, name: str) -> bool:
        return not self.only or any(w in name.lower() for w in self.only)

    def row(self, name: str, need_s: float, fn: Any, *args: Any) -> dict[str, Any] | None:
        """Run one measurement if `need_s` seconds are left; errors and skips become rows that say so."""
        if not self.wanted(name):
            return None
        if self.left() < need_s:
            print(f"[{name}] skipped: {self.left():.0f} s left, needs ~{need_s:.0f} s", flush=True)
            self.rows.append({"name": name, "status": "not measured: out of time"})
            return None
        t0 = time.perf_counter()
        print(f"[{name}] ...", flush=True)
        try:
            row = fn(self, *args)
        except Exception as e:
            traceback.print_exc()
            row = {"status": f"not measured: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
        row = {"name": name, **row, "seconds": round(time.perf_counter() - t0, 1)}
        row.setdefault("status", "measured" if row.get("measured_bytes") else "ran (no peak counter on the CPU)")
        if row.get("measured_bytes") and row.get("predicted_bytes"):
            row["error_pct"] = round(100 * (row["predicted_bytes"] - row["measured_bytes"]) / row["measured_bytes"], 1)
        self.rows.append(row)
        print(f"[{name}] {_line(row)}", flush=True)
        _free()
        self.save()
        return row

    def report(self) -> dict[str, Any]:
        rows = _merged(self.rows, self.prior)
        return {"machine": self.machine, "device": self.device, "cap_gib": CAP_GIB if self.device == "cuda" else None,
                "rows": rows, **self.extra, "targets": targets(rows)}  # fmt: skip

    def save(self) -> None:
        """Results after every row: a run cut short by its time limit still leaves what it measured."""
        if self.out is not None:
            write_results(
                self.out, "planner" + ("-quick" if self.quick else ""), self.report(), markdown(self.report())
            )


def _prior_rows(path: Path) -> list[dict[str, Any]]:
    """The measured rows of an earlier run's JSON, each marked with the run it came from."""
    import json

    old = json.loads(path.read_text(encoding="utf-8"))
    when = f"{old['machine']['date']}, `{old['machine']['command']}`"
    return [{**r, "from_run": r.get("from_run", when)} for r in old["rows"] if r.get("status") == "measured"]


def _merged(rows: list[dict[str, Any]], prior: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """This run's rows, where it measured nothing an earlier run's measured row of the same job (`--merge`), in the
    earlier run's order; its extras (the 13B split) come with its row."""
    if not prior:
        return rows
    mine = {r["name"]: r for r in rows if r.get("status") == "measured"}
    out = [mine.pop(p["name"], p) for p in prior]
    out += [r for r in rows if r["name"] in mine or r["name"] not in {o["name"] for o in out}]
    return out


def _gb(n: Any) -> str:
    return "-" if not n else f"{n / GiB:.2f}"


def _line(r: dict[str, Any]) -> str:
    if "predicted_bytes" not in r:
        return r.get("status", "")
    err = f"{r['error_pct']:+.1f}%" if "error_pct" in r else "-"
    return (f"predicted {_gb(r.get('predicted_bytes'))} GiB, measured {_gb(r.get('measured_bytes'))} GiB, error {err}"
            f" ({r.get('seconds', 0)} s)")  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    r = Run(args)
    if r.device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_GIB * GiB / total))
    print(f"device {r.device}, budget {args.budget_s:.0f} s, cap {CAP_GIB} GiB", flush=True)
    try:
        llm_section(r)
        r.row("Whisper-small, batch 16", 25, whisper_row)
        r.row("SDXL 1024x1024", 60, sdxl_row)
        r.row("SD1.5 LoRA training, 512 px", 45, sd_lora_row)
        for i, (imgsz, batch) in enumerate(args.yolo_shapes):  # the first also prepares Ultralytics
            r.row(f"YOLOv8s training, {imgsz} px, batch {batch}", 30 if i else 60, yolo_row, imgsz, batch)
    finally:
        shutil.rmtree(r.work, ignore_errors=True)
    r.save()
    return r.report()


def llm_section(r: Run) -> None:
    from studio.bench.planner_rows import build_llm

    if not any(r.wanted(n) for n in ("8B nf4 chat", "13B nf4", "8B QLoRA")):
        return
    if r.left() < 40:
        for name in ("8B nf4 chat, 2k", "8B nf4 chat, 8k", "13B nf4 decode with offload", "8B QLoRA, 2k"):
            r.rows.append({"name": name, "status": "not measured: out of time"})
        return
    try:
        model, info, weights = build_llm(r)
    except Exception as e:
        traceback.print_exc()
        r.rows.append({"name": "8B nf4 model", "status": f"not measured: build failed: {type(e).__name__}: {e}"})
        return
    r.extra["llm_weights_bytes"] = weights
    quick = r.device == "cpu"
    r.row("8B nf4 chat, 2k", 15, chat_row, model, info, 256 if quick else 2048)
    r.row("8B nf4 chat, 8k", 20, chat_row, model, info, 512 if quick else 8192)
    r.row("13B nf4 decode with offload", 45, offload_row)
    r.row("8B QLoRA, 2k", 20, qlora_row, model, info, 128 if quick else 2048)
    del model
    _free()


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        if row["name"].startswith("13B"):
            out.append(Target("13B-architecture decode with offload, 12 GiB cap", row.get("decode_tok_s"), 1.0,
                              "tok/s").as_dict())  # fmt: skip
            continue
        err = row.get("error_pct")
        out.append(Target(f"planner error vs measured peak: {row['name']}", None if err is None else abs(err),
                          GOAL_ERROR_PCT, "%", higher_is_better=False).as_dict())  # fmt: skip
    return out


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"# VRAM planner: predicted vs measured peak ({m['gpu'] or 'CPU'}, {m['date']})", "",
             f"Machine: {describe_machine(m)}", f"Command: `{m['command']}`", "",
             "Random weights, real architectures; measured = torch peak allocated over the job (no CUDA context); "
             "predicted = `studio.planner` formulas before any learning; learned = after the earlier rows of the "
             "same family were stored." + (" **CPU --quick run: every row is a tiny stand-in (the names are the GPU "
             "rows'); it checks the code paths, the CPU has no peak counter.**" if report["device"] == "cpu" else ""), "",
             "| job | predicted GiB | learned GiB | measured GiB | error | time s | status |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in report["rows"]:
        err = f"{r['error_pct']:+.1f}%" if "error_pct" in r else "-"
        status = r.get("status", "") + (f" (in the run of {r['from_run']})" if r.get("from_run") else "")
        lines.append(f"| {r['name']} | {_gb(r.get('predicted_bytes'))} | {_gb(r.get('learned_bytes'))} | "
                     f"{_gb(r.get('measured_bytes'))} | {err} | {r.get('seconds', '-')} | {status} |")  # fmt: skip
    off = next((r for r in report["rows"] if r["name"].startswith("13B") and "decode_tok_s" in r), None)
    if off:
        lines += ["", f"13B offload: {off['resident']} of {off['layers']} layers on the GPU (planner's split, "
                  f"budget {_gb(off['budget_bytes'])} GiB beside the resident 8B model), {off['streamed']} streamed "
                  f"from {'pinned' if off.get('pinned') else 'pageable'} RAM: **{off['decode_tok_s']:.2f} tok/s**, "
                  f"{100 * off['share_moving']:.0f}% of decode time moving layers "
                  f"({off['moved_gb_per_token']:.2f} GB/token at {off['move_gbps']:.1f} GB/s); planner predicted "
                  f"{off['predicted_s_moving_per_token'] * 1000:.0f} ms/token moving at the PCIe 4.0 guess of 25 GB/s."]  # fmt: skip
    lines += ["", targets_table(report["targets"])]
    return "\n".join(lines)


def _shapes(text: str) -> list[tuple[int, int]]:
    try:
        return [(int(a), int(b)) for a, b in (w.strip().lower().split("x") for w in text.split(",") if w.strip())]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected IMGSZxBATCH[,IMGSZxBATCH...], got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny configs on the CPU (checks the script)")
    p.add_argument("--budget-s", type=float, default=260.0, help="rows that would start after this are not measured")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--only", default=None, help="run only the jobs whose names contain one of these (comma list)")
    p.add_argument(
        "--merge",
        type=Path,
        default=None,
        help="an earlier run's JSON: its measured rows stand where this run measures nothing (marked)",
    )
    p.add_argument(
        "--yolo-shapes",
        type=_shapes,
        default=[(640, 16)],
        help="YOLO rows as IMGSZxBATCH,... (the table's 640x16; more check the fitted factor)",
    )
    args = p.parse_args(argv)
    report = run(args)
    print(markdown(report), flush=True)
    if args.out is not None:
        print(f"wrote {args.out}/planner{'-quick' if args.quick else ''}-<device>.json and .md", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
