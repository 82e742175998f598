"""Export a YOLO model to ONNX, a TensorRT engine (when `tensorrt` is installed, on CUDA) or OpenVINO (when
`openvino` is installed), cached by content hash, format, image size, batch and precision.

Export works on a private CPU copy of the weights file (Ultralytics writes its output beside its input, and the
shipped file lives inside site-packages), under cache_dir/detection-export/<model id>/. Shapes are static (the
batch is part of the cache key): ONNX Runtime and TensorRT are fastest that way, and the download is the batch-1
file most deployments want. Missing optional engines are said plainly, never attempted (Ultralytics would try to
pip-install them).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from backends.vision.types import DetectionError

log = logging.getLogger(__name__)
FORMATS = {"onnx": ".onnx", "engine": ".engine", "openvino": "_openvino_model"}
TITLES = {"onnx": "ONNX", "engine": "TensorRT engine", "openvino": "OpenVINO"}


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def _has_onnx() -> bool:
    return importlib.util.find_spec("onnx") is not None


def engine_status() -> dict[str, str | None]:
    """Why each optional format cannot be used here (None = it can)."""
    import torch

    trt = None if tensorrt_available() else "TensorRT is not installed (pip install tensorrt; NVIDIA GPUs only)"
    if trt is None and not torch.cuda.is_available():
        trt = "TensorRT needs a CUDA GPU; this studio runs on the CPU"
    return {
        "onnx": None if _has_onnx() else "the 'onnx' package is not installed (pip install onnx)",
        "engine": trt,
        "openvino": None if openvino_available() else "OpenVINO is not installed (pip install openvino)",
    }


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()[:12]


def export_model(
    backend: Any, entry: Any, fmt: str = "onnx", imgsz: int = 640, *, batch: int = 1, half: bool = False
) -> Path:
    """The exported file (a folder for OpenVINO) of `entry` (a DetectorModel with weights); cached."""
    from backends.vision.yolo import prepare_ultralytics

    if fmt not in FORMATS:
        raise DetectionError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if entry.path is None:
        raise DetectionError(f"{entry.title} has no weights (untrained, built from yaml); train it first, then export.")
    if imgsz % 32 or not 32 <= imgsz <= 2048:
        raise DetectionError(f"export image size must be a multiple of 32 in 32-2048, got {imgsz}")
    if not 1 <= batch <= 64:
        raise DetectionError(f"export batch must be 1-64, got {batch}")
    why_not = engine_status()[fmt]
    if why_not:
        raise DetectionError(f"{TITLES[fmt]} export is not available: {why_not}.")
    half = half or fmt == "engine"  # a TensorRT engine is built in fp16
    prepare_ultralytics(backend.ctx.settings)
    from ultralytics import YOLO

    work = backend.ctx.settings.cache_dir / "detection-export" / entry.id
    stem = f"{_file_hash(entry.path)}-{imgsz}-b{batch}{'-fp16' if half else ''}"
    out_path = work / (stem + FORMATS[fmt])
    if out_path.exists():
        return out_path
    work.mkdir(parents=True, exist_ok=True)
    copy = work / f"{stem}.pt"
    shutil.copyfile(entry.path, copy)
    device = 0 if fmt == "engine" else "cpu"
    extra = {"simplify": False} if fmt in ("onnx", "engine") else {}  # (OpenVINO refuses the argument)
    t = time.perf_counter()
    try:
        out = YOLO(str(copy), task=entry.task).export(format=fmt, imgsz=imgsz, batch=batch, half=half, device=device,
                                                     dynamic=False, verbose=False, **extra)  # fmt: skip
    finally:
        copy.unlink(missing_ok=True)
        if fmt == "engine":
            (work / f"{stem}.onnx").unlink(missing_ok=True)  # the intermediate ONNX file
    if Path(out) != out_path:
        shutil.move(out, out_path)
    log.info("exported %s to %s (%s) in %.1fs", entry.key, out_path, fmt, time.perf_counter() - t)
    return out_path


def export_onnx(backend: Any, entry: Any, imgsz: int = 640, batch: int = 1) -> Path:
    """ONNX (fp32, static shape); cached by content hash."""
    return export_model(backend, entry, "onnx", imgsz, batch=batch)


def letterboxed_input(imgsz: int = 640, image: Path | None = None) -> Any:
    """(1, 3, imgsz, imgsz) float32 in 0-1: ultralytics' bus.jpg letterboxed (grey borders), as the models expect."""
    import cv2
    import numpy as np
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


def image_batch(imgsz: int, batch: int) -> Any:
    """(batch, 3, imgsz, imgsz): bus.jpg and zidane.jpg letterboxed, alternating: the same images for every engine."""
    import numpy as np
    from ultralytics.utils import ASSETS

    pair = [letterboxed_input(imgsz, ASSETS / name) for name in ("bus.jpg", "zidane.jpg")]
    return np.ascontiguousarray(np.concatenate([pair[i % 2] for i in range(batch)]))
