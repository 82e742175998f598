"""The latency table: PyTorch (fp32, fp16 on CUDA) vs ONNX Runtime vs TensorRT (vs OpenVINO) at batch 1 and 8, on
the same letterboxed images, with every engine's outputs checked against PyTorch fp32's.

Timing: model forward only (no pre/post-processing), `warmup` untimed calls, then `runs` timed ones, CUDA
synchronised around each. The PyTorch model is the residency-managed one, on its device, fused (Conv+BN folded,
as the predictor and the exporter do). ONNX Runtime uses the CUDA provider when its GPU build is installed, else
the CPU; OpenVINO runs on the CPU; TensorRT engines are fp16.
Output check: the raw head output (B, 4 + classes, anchors) of each engine against PyTorch fp32 at the same batch:
the largest class-score difference over all anchors and the largest box-coordinate difference (pixels) over the
100 anchors PyTorch scores highest; `match` when within the tolerance of the engine's precision.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from backends.vision.export import engine_status, export_model, image_batch

# (class score, box pixels at the input size); bf16 keeps 8 mantissa bits: ~1 px steps at 300 px
TOLERANCE = {"fp32": (1e-3, 0.5), "fp16": (0.03, 3.0), "bf16": (0.05, 8.0)}
TOP_ANCHORS = 100


@dataclass(frozen=True)
class LatencyRow:
    engine: str
    device: str
    p50_ms: float
    p95_ms: float
    mean_ms: float
    fps: float  # images per second at p50: batch * 1000 / p50
    runs: int
    precision: str = "fp32"
    batch: int = 1
    score_diff: float | None = None  # vs PyTorch fp32 (None for the reference itself)
    box_diff_px: float | None = None
    match: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def cells(self) -> list[Any]:
        diff = "reference" if self.score_diff is None else f"{self.score_diff:.1e} / {self.box_diff_px:.2f} px"
        ok = "" if self.match is None else "yes" if self.match else "NO"
        return [self.engine, self.precision, self.batch, self.device, self.p50_ms, self.p95_ms, self.fps, diff, ok]


CELL_HEADERS = ["engine", "precision", "batch", "device", "p50 ms", "p95 ms", "images/s", "vs PyTorch fp32", "match"]


def time_calls(fn: Callable[[], Any], *, runs: int, warmup: int, sync: Callable[[], None] | None = None) -> list[float]:
    """Wall times in ms of `runs` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append((time.perf_counter() - t) * 1000)
    return times


def summarize(engine: str, device: str, times: list[float], **extra: Any) -> LatencyRow:
    s = sorted(times)
    p50 = statistics.median(s)
    p95 = s[min(len(s) - 1, max(0, round(0.95 * len(s)) - 1))]
    batch = extra.get("batch", 1)
    return LatencyRow(engine, device, round(p50, 2), round(p95, 2), round(statistics.fmean(s), 2),
                      round(batch * 1000 / p50, 1), len(s), **extra)  # fmt: skip


def head_output(out: Any) -> np.ndarray:
    """The (B, 4 + classes, anchors) array of a raw YOLO forward (tuple/list/dict/tensor), as float32 numpy."""
    while isinstance(out, tuple | list):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    if hasattr(out, "detach"):
        out = out.detach().float().cpu().numpy()
    return np.asarray(out, dtype=np.float32)


def compare_outputs(ref: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """(largest class-score difference, largest box difference in pixels over PyTorch's top anchors)."""
    if ref.shape != other.shape:
        return float("inf"), float("inf")
    score = float(np.abs(ref[:, 4:] - other[:, 4:]).max())
    best = np.argsort(-ref[:, 4:].max(axis=1), axis=1)[:, :TOP_ANCHORS]  # (B, k)
    boxes_ref = np.take_along_axis(ref[:, :4], best[:, None, :], axis=2)
    boxes_other = np.take_along_axis(other[:, :4], best[:, None, :], axis=2)
    return score, float(np.abs(boxes_ref - boxes_other).max())


def _checked(row: LatencyRow, ref: np.ndarray, out: np.ndarray) -> LatencyRow:
    score, box = compare_outputs(ref, out)
    tol_score, tol_box = TOLERANCE[row.precision]
    return LatencyRow(**(row.as_dict() | {"score_diff": score, "box_diff_px": box,
                                          "match": score <= tol_score and box <= tol_box}))  # fmt: skip


def torch_rows(model: Any, batches: dict[int, np.ndarray], *, runs: int, warmup: int, half: bool) -> tuple:
    """PyTorch rows (fp32, and fp16 when `half` and on CUDA) and the fp32 reference outputs per batch."""
    import copy

    import torch

    net = model.model
    net.fuse(verbose=False)
    device = next(net.parameters()).device
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else None
    rows, refs = [], {}
    nets = [("fp32", net)] + ([("fp16", copy.deepcopy(net).half())] if half and cuda else [])
    for precision, m in nets:
        for b, x in batches.items():
            inp = torch.from_numpy(x).to(device, dtype=torch.float16 if precision == "fp16" else torch.float32)
            with torch.inference_mode():
                out = head_output(m(inp))
                times = time_calls(lambda m=m, inp=inp: m(inp), runs=runs, warmup=warmup, sync=sync)
            where = str(device) if cuda else f"cpu, {torch.get_num_threads()} threads"  # (Ultralytics sets them)
            row = summarize("PyTorch", where, times, precision=precision, batch=b)
            if precision == "fp32":
                refs[b] = out
                rows.append(row)
            else:
                rows.append(_checked(row, refs[b], out))
    return rows, refs


def onnx_rows(path_for: Callable[[int], Any], batches: dict, refs: dict, *, runs: int, warmup: int) -> list:
    import onnxruntime as ort

    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    rows = []
    for b, x in batches.items():
        sess = ort.InferenceSession(str(path_for(b)), providers=providers)
        name, device = sess.get_inputs()[0].name, "cuda" if sess.get_providers()[0].startswith("CUDA") else "cpu"
        feed = {name: x}
        out = head_output(sess.run(None, feed))
        times = time_calls(lambda s=sess, f=feed: s.run(None, f), runs=runs, warmup=warmup)
        rows.append(_checked(summarize("ONNX Runtime", device, times, batch=b), refs[b], out))
    return rows


def backend_rows(engine: str, path_for: Callable[[int], Any], batches: dict, refs: dict, *, runs: int, warmup: int,
                 device: str, precision: str) -> list:  # fmt: skip
    """TensorRT or OpenVINO through Ultralytics' AutoBackend (it owns the engines' bindings and sessions)."""
    import torch
    from ultralytics.nn.autobackend import AutoBackend

    rows = []
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    for b, x in batches.items():
        net = AutoBackend(str(path_for(b)), device=torch.device(device), fp16=precision == "fp16", verbose=False)
        inp = torch.from_numpy(x).to(device, dtype=torch.float16 if precision == "fp16" else torch.float32)
        out = head_output(net(inp))
        times = time_calls(lambda n=net, i=inp: n(i), runs=runs, warmup=warmup, sync=sync)
        rows.append(_checked(summarize(engine, device, times, precision=precision, batch=b), refs[b], out))
    return rows


def openvino_rows(path_for: Callable[[int], Any], batches: dict, refs: dict, *, runs: int, warmup: int) -> list:
    """OpenVINO on the CPU twice: forced fp32 (exact), and the CPU plugin's default precision (bf16 on CPUs with
    AMX/AVX-512 BF16: faster, less exact), so the table shows both the speed and what it costs."""
    import openvino as ov

    core, rows = ov.Core(), []
    kinds = ((ov.Type.f32, "fp32"), (ov.Type.bf16, "bf16"), (ov.Type.f16, "fp16"))
    for hint in ("f32", None):
        for b, x in batches.items():
            xml = next(Path(path_for(b)).glob("*.xml"))
            config = {"PERFORMANCE_HINT": "LATENCY"} | ({"INFERENCE_PRECISION_HINT": hint} if hint else {})
            compiled = core.compile_model(core.read_model(str(xml)), "CPU", config)
            got = compiled.get_property("INFERENCE_PRECISION_HINT")
            precision = next((n for t, n in kinds if got == t), str(got))
            if hint is None and precision == "fp32":
                break  # the default is fp32 on this CPU: the first row says it all
            out = head_output(list(compiled(x).values()))
            times = time_calls(lambda c=compiled, x=x: c(x), runs=runs, warmup=warmup)
            rows.append(_checked(summarize("OpenVINO", "cpu", times, precision=precision, batch=b), refs[b], out))
    return rows


def latency_table(
    backend: Any,
    entry: Any,
    *,
    imgsz: int = 640,
    runs: int = 30,
    warmup: int = 5,
    batches: tuple[int, ...] = (1, 8),
    half: bool = True,
    cpu_runs: int | None = None,
) -> tuple:
    """(rows, notes) for every engine usable here; `cpu_runs` caps the timed runs of engines on the CPU."""  # fmt: skip
    xs = {b: image_batch(imgsz, b) for b in batches}
    key = backend._register(entry)
    rows, refs = backend.ctx.residency.run(key, lambda m: torch_rows(m, xs, runs=runs, warmup=warmup, half=half))
    cuda = rows[0].device.startswith("cuda")
    slow = dict(runs=cpu_runs or runs, warmup=min(warmup, 2))
    status, notes = engine_status(), []
    rows += onnx_rows(lambda b: export_model(backend, entry, "onnx", imgsz, batch=b), xs, refs, **slow)
    if status["engine"] is None:
        path = lambda b: export_model(backend, entry, "engine", imgsz, batch=b, half=True)  # noqa: E731
        rows += backend_rows("TensorRT", path, xs, refs, runs=runs, warmup=warmup, device="cuda:0", precision="fp16")
    else:
        notes.append(f"No TensorRT rows: {status['engine']}.")
    if status["openvino"] is None:
        path = lambda b: export_model(backend, entry, "openvino", imgsz, batch=b)  # noqa: E731
        rows += openvino_rows(path, xs, refs, **slow)
    else:
        notes.append(f"No OpenVINO rows: {status['openvino']}.")
    if not cuda:
        notes.append("No GPU here: PyTorch runs on the CPU, so there is no fp16 row (fp16 is a GPU format); its "
                     "thread count is torch's (Ultralytics sets cores - 1 at its first CPU predict).")  # fmt: skip
    return rows, notes
