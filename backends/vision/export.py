"""ONNX export and the latency table: PyTorch vs ONNX Runtime at batch 1.

Export works on a private CPU copy of the weights file (Ultralytics writes the .onnx beside its input, and the
shipped file lives inside site-packages), cached under cache_dir/detection-export/<model id>/ by content hash.
Latency is measured on the same letterboxed image for every engine, model forward only (no pre/post-processing):
`warmup` untimed runs, then `runs` timed ones; CUDA is synchronised around each timed call.
A TensorRT engine is offered only when the `tensorrt` package is installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatencyRow:
    engine: str
    device: str
    p50_ms: float
    p95_ms: float
    mean_ms: float
    fps: float  # 1000 / p50
    runs: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()[:12]


def export_onnx(backend: Any, entry: Any, imgsz: int = 640) -> Path:
    """Export `entry` (a DetectorModel with weights) to ONNX (fp32, static batch 1); cached by content hash."""
    from backends.vision.types import DetectionError
    from backends.vision.yolo import prepare_ultralytics

    if entry.path is None:
        raise DetectionError(f"{entry.title} has no weights (untrained, built from yaml); train it first, then export.")
    if imgsz % 32 or not 32 <= imgsz <= 2048:
        raise DetectionError(f"export image size must be a multiple of 32 in 32-2048, got {imgsz}")
    if not _has_onnx():
        raise DetectionError("ONNX export needs the 'onnx' package (pip install onnx); it is not installed.")
    prepare_ultralytics(backend.ctx.settings)
    from ultralytics import YOLO

    digest = _file_hash(entry.path)
    work = backend.ctx.settings.cache_dir / "detection-export" / entry.id
    onnx_path = work / f"{digest}-{imgsz}.onnx"
    if onnx_path.is_file():
        return onnx_path
    work.mkdir(parents=True, exist_ok=True)
    copy = work / f"{digest}-{imgsz}.pt"
    shutil.copyfile(entry.path, copy)
    t = time.perf_counter()
    try:
        out = YOLO(str(copy), task="detect").export(
            format="onnx", imgsz=imgsz, device="cpu", simplify=False, dynamic=False, verbose=False
        )
    finally:
        copy.unlink(missing_ok=True)
    if Path(out) != onnx_path:
        shutil.move(out, onnx_path)
    log.info(
        "exported %s to %s (%d bytes) in %.1fs", entry.key, onnx_path, onnx_path.stat().st_size, time.perf_counter() - t
    )
    return onnx_path


def _has_onnx() -> bool:
    try:
        import onnx  # noqa: F401
    except ImportError:
        return False
    return True


def letterboxed_input(imgsz: int = 640, image: Path | None = None) -> np.ndarray:
    """(1, 3, imgsz, imgsz) float32 in 0-1: ultralytics' bus.jpg letterboxed (grey borders), as the models expect."""
    import cv2
    from ultralytics.utils import ASSETS

    bgr = cv2.imread(str(image or ASSETS / "bus.jpg"))
    h, w = bgr.shape[:2]
    r = imgsz / max(h, w)
    nh, nw = round(h * r), round(w * r)
    canvas = np.full((imgsz, imgsz, 3), 114, np.uint8)
    top, left = (imgsz - nh) // 2, (imgsz - nw) // 2
    canvas[top : top + nh, left : left + nw] = cv2.resize(bgr, (nw, nh), interpolation=cv2.INTER_LINEAR)
    rgb = canvas[..., ::-1].transpose(2, 0, 1)
    return np.ascontiguousarray(rgb[None], dtype=np.float32) / 255.0


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


def summarize(engine: str, device: str, times: list[float]) -> LatencyRow:
    s = sorted(times)
    p50 = statistics.median(s)
    p95 = s[min(len(s) - 1, max(0, round(0.95 * len(s)) - 1))]
    return LatencyRow(
        engine, device, round(p50, 2), round(p95, 2), round(statistics.fmean(s), 2), round(1000 / p50, 1), len(s)
    )


def torch_forward_times(net: Any, x: np.ndarray, *, runs: int, warmup: int, half: bool = False) -> list[float]:
    """Forward of a (fused) DetectionModel on its own device; `half` runs an fp16 copy (CUDA only)."""
    import copy

    import torch

    device = next(net.parameters()).device
    if half:
        net = copy.deepcopy(net).half()
    inp = torch.from_numpy(x).to(device, dtype=torch.float16 if half else torch.float32)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    with torch.inference_mode():
        return time_calls(lambda: net(inp), runs=runs, warmup=warmup, sync=sync)


def onnx_session(onnx_path: Path, threads: int | None = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


def onnx_forward_times(session: Any, x: np.ndarray, *, runs: int, warmup: int) -> list[float]:
    name = session.get_inputs()[0].name
    return time_calls(lambda: session.run(None, {name: x}), runs=runs, warmup=warmup)


def latency_table(backend: Any, entry: Any, *, imgsz: int = 640, runs: int = 30, warmup: int = 5) -> list[LatencyRow]:
    """PyTorch (the residency-managed model, on its device) vs ONNX Runtime (CPU) for the Export section."""
    onnx_path = export_onnx(backend, entry, imgsz)
    x = letterboxed_input(imgsz)

    def torch_times(model: Any) -> tuple[str, list[float]]:
        model.model.fuse(verbose=False)  # what the predictor and the ONNX export do too (Conv+BN folded)
        return str(next(model.model.parameters()).device), torch_forward_times(model.model, x, runs=runs, warmup=warmup)

    device, t_torch = backend.ctx.residency.run(backend._register(entry), torch_times)
    rows = [summarize("PyTorch fp32", device, t_torch)]
    rows.append(
        summarize("ONNX Runtime fp32", "cpu", onnx_forward_times(onnx_session(onnx_path), x, runs=runs, warmup=warmup))
    )
    return rows


def compare_boxes(a: np.ndarray, b: np.ndarray) -> float:
    """Largest coordinate difference (pixels) between two (N, 4) box sets matched greedily by IoU; inf if N differs."""
    if a.shape != b.shape:
        return float("inf")
    if not len(a):
        return 0.0
    used, worst = set(), 0.0
    for box in a:
        diffs = [(np.abs(box - other).max(), j) for j, other in enumerate(b) if j not in used]
        d, j = min(diffs)
        used.add(j)
        worst = max(worst, float(d))
    return worst
