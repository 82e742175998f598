"""Detection training benchmark: the studio's YOLO trainer (Ultralytics inside the preemptible training lease) on a
synthetic set, with and without mixed precision, side by side in one run.

GPU (GPU.md): YOLOv8s built from its yaml (architecture-true, random weights: speed and memory do not depend on
them), 640 px, batch 16, default augmentation (mosaic), one epoch of `--batches` batches of synthetic shapes
(JPEG), 8 dataloader workers, under the studio's 12 GiB VRAM cap plus `torch.cuda.set_per_process_memory_fraction`.
Measured per run: images/s over the batches after the first `--skip` (timed at Ultralytics' on_train_batch_end,
CUDA synchronised), peak allocated and reserved VRAM (torch's counters, reset before the run), the loss, and that
the AMP check (our offline one: no download) passed. The same code runs on the CPU with `--quick` (64 px, batch 4)
to check the script; AMP does not apply there, so both rows train in fp32.

    python -m studio.bench.vision_train --out studio/bench/results           # GPU: ~60 s on an H200
    python -m studio.bench.vision_train --quick --out studio/bench/results   # CPU check
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from studio.bench.common import RESULTS_DIR, Target, describe_machine, machine_info, targets_table
from studio.bench.detection import context, run_and_write

GiB = 2**30


def progress(msg: str) -> None:
    print(f"[vision_train {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class BatchClock:
    """on_train_batch_end timestamps (CUDA synchronised) of the first epoch."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.amp: bool | None = None  # what the trainer really used (after its AMP check)

    def started(self, trainer: Any) -> None:
        self.amp = bool(trainer.amp)

    def __call__(self, trainer: Any) -> None:
        import torch

        if trainer.epoch == 0:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.stamps.append(time.perf_counter())

    def images_per_s(self, batch: int, skip: int) -> float | None:
        timed = self.stamps[skip:]
        if len(timed) < 2:
            return None
        return round(batch * (len(timed) - 1) / (timed[-1] - timed[0]), 1)


def train_once(det: Any, report: Any, amp: bool, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from backends.vision.options import TrainOptions
    from backends.vision.train import train_detector

    opts = TrainOptions(base="yolov8s-untrained", epochs=1, imgsz=args.imgsz, batch=args.batch, amp=amp,
                        patience=0, warmup_epochs=0, close_mosaic=0, workers=args.workers, augment="default")  # fmt: skip
    clock, logs = BatchClock(), []
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = det.get_model(opts.base)
    t = time.perf_counter()
    callbacks = {"on_train_batch_end": clock, "on_train_start": clock.started}
    job = det.ctx.jobs.submit(f"bench train amp={amp}", lambda j: train_detector(det, j, report, base, opts,
                              callbacks=callbacks), gpu=True)  # fmt: skip
    error = None
    if not job.wait(timeout=args.timeout):
        det.ctx.jobs.cancel(job.id)
        job.wait(timeout=60)
        error = f"did not finish in {args.timeout:g} s"
    elif job.status != "done":
        error = f"{job.status}: {job.error}"
    if error:  # recorded, not raised: the other row and the results file still come back
        progress(f"amp={amp} FAILED: {error}\n" + "\n".join(job.logs[-8:]))
    logs = [ln for ln in job.logs if "AMP" in ln or "auto batch" in ln or "epoch 1/1" in ln]
    rows = det.ctx.runs.get(job.result.run_id).metrics() if job.result is not None else []
    cuda = torch.cuda.is_available()
    return {
        "amp": amp and cuda,
        "amp_used": clock.amp,
        "error": error,
        "images_per_s": clock.images_per_s(args.batch, args.skip),
        "batches": len(clock.stamps),
        "timed_batches": max(0, len(clock.stamps) - args.skip - 1),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GiB, 3) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GiB, 3) if cuda else None,
        "box_loss": rows[0].get("box_loss") if rows else None,
        "wall_s": round(time.perf_counter() - t, 1),
        "log": logs[-3:],
    }


def markdown(res: dict) -> str:
    lines = [
        f"# Detection training, YOLOv8s ({res['machine']['gpu'] or 'CPU'}, {res['machine']['date']})", "",
        f"`{res['machine']['command']}` — {res['setup']}; {describe_machine(res['machine'])}", "",
        targets_table(res["targets"]), "",
        "| precision | AMP used | images/s | timed batches | peak allocated GiB | peak reserved GiB | box loss | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in res["runs"]:
        lines.append(f"| {'AMP (fp16)' if r['amp'] else 'fp32'} | {r['amp_used']} | {r['images_per_s']} | {r['timed_batches']} | "
                     f"{r['peak_allocated_gib']} | {r['peak_reserved_gib']} | {r['box_loss']} | {r['wall_s']} |")  # fmt: skip
    return "\n".join([*lines, "", *[f"- {n}" for n in res["notes"]], ""])


def run(args: argparse.Namespace) -> dict:
    import torch

    from backends.vision.data import validate_dataset
    from backends.vision.synth import make_synthetic_dataset

    work = Path(tempfile.mkdtemp(prefix="bench-vision-train-"))
    ctx = context(work / "data", args.vram_cap_gb)
    det = ctx.backends.detection
    t = time.perf_counter()
    root = work / "shapes"
    make_synthetic_dataset(root, n_train=args.batch * args.batches, n_val=args.batch, imgsz=args.imgsz, seed=0,
                           suffix=".jpg")  # fmt: skip
    report = validate_dataset(root)
    report.raise_if_invalid()
    progress(f"synthetic set: {args.batch * args.batches} + {args.batch} images of {args.imgsz} px in "
             f"{time.perf_counter() - t:.1f} s")  # fmt: skip
    runs = []
    for amp in (True, False):
        runs.append(train_once(det, report, amp, args))
        progress(f"amp={amp}: {runs[-1]['images_per_s']} images/s, peak {runs[-1]['peak_allocated_gib']} GiB, "
                 f"{runs[-1]['wall_s']} s")  # fmt: skip
    cap = args.vram_cap_gb
    amp_row, fp32_row = runs
    if amp_row["amp"] and not amp_row["amp_used"]:
        notes_amp = ["The AMP row trained in fp32: the AMP check failed or training never started (see error)."]
    else:
        notes_amp = []
    for r in runs:
        if r["error"]:
            r["images_per_s"] = r["peak_allocated_gib"] = None
    speedup = (round(amp_row["images_per_s"] / fp32_row["images_per_s"], 3)
               if amp_row["images_per_s"] and fp32_row["images_per_s"] else None)  # fmt: skip
    targets = [Target(f"peak VRAM with AMP within the {cap:g} GiB cap", amp_row["peak_allocated_gib"], cap, "GiB",
                      False), Target(f"peak VRAM fp32 within the {cap:g} GiB cap", fp32_row["peak_allocated_gib"], cap,
                      "GiB", False), Target("AMP images/s / fp32 images/s", speedup, 1.0, "x")]  # fmt: skip
    notes = [
        "Images/s: batches after the first skipped ones of epoch 1, timed at on_train_batch_end (CUDA synchronised): "
        "dataloader (mosaic, JPEG decode), forward, loss, backward, optimizer step every nbs/batch batches, EMA, and "
        "the training lease's step boundary.",
        "Peak VRAM: torch.cuda.max_memory_allocated over the whole run (training, then validation of last and best).",
        "AMP: the trainer's amp flag after the studio's offline check (fp32 vs autocast on the trained model itself; "
        f"Ultralytics' own check would download yolo26n.pt): {amp_row['amp_used']}.",
    ]
    notes += notes_amp + [f"{'AMP' if r['amp'] else 'fp32'} row failed: {r['error']}" for r in runs if r["error"]]
    if not torch.cuda.is_available():
        notes.append("No GPU: both rows train in fp32 on the CPU (AMP applies to CUDA only); this checks the script.")
    setup = (f"YOLOv8s from yaml (random weights, nc=3), {args.imgsz} px, batch {args.batch}, default augmentation, "
             f"{args.batches} batches, {args.workers} workers, first {args.skip} batches not timed")  # fmt: skip
    return {"benchmark": "vision_train", "setup": setup, "runs": runs, "notes": notes,
            "machine": machine_info("torch", "ultralytics", "numpy", "opencv-python"),
            "targets": [t.as_dict() for t in targets]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m studio.bench.vision_train", description=__doc__.split("\n")[0])
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=20, help="batches in the (single) epoch")
    p.add_argument("--skip", type=int, default=4, help="first batches not timed (warm-up, cudnn autotune)")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--timeout", type=float, default=240)
    p.add_argument("--vram-cap-gb", type=float, default=12.0)
    p.add_argument("--quick", action="store_true", help="64 px, batch 4, 4 batches on the CPU: checks the script")
    p.add_argument("--out", type=Path, default=None, help=f"results folder (e.g. {RESULTS_DIR})")
    args = p.parse_args(argv)
    if args.quick:
        args.imgsz, args.batch, args.batches, args.skip, args.workers = 64, 4, 4, 1, 0
    return run_and_write(args, "vision_train", run, markdown)


if __name__ == "__main__":
    sys.exit(main())
