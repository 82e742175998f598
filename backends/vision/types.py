"""Options, results and model records of the vision package (shared by detection, training, export and video)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

RUN_KIND = "detection-train"
TASKS = ("detect", "segment", "classify")  # Ultralytics' task names
RUN_KINDS = {"detect": RUN_KIND, "segment": "segment-train", "classify": "classify-train"}
# Untrained demo models of the other tasks, built offline from Ultralytics' yaml (no COCO/ImageNet weights here).
DEMO_MODELS = (
    ("yolov8n-seg-untrained", "YOLOv8n-seg (untrained demo model, built from yaml)", "segment", "yolov8n-seg.yaml"),
    ("yolo11n-seg-untrained", "YOLO11n-seg (untrained demo model, built from yaml)", "segment", "yolo11n-seg.yaml"),
    ("yolov8n-cls-untrained", "YOLOv8n-cls (untrained demo model, built from yaml)", "classify", "yolov8n-cls.yaml"),
    ("yolo11n-cls-untrained", "YOLO11n-cls (untrained demo model, built from yaml)", "classify", "yolo11n-cls.yaml"),
)


TRUST_WARNING = (
    "Ultralytics .pt files are Python pickles: loading one can run any code its author put in it. "
    "Only files in the folders the studio's owner trusts (the models folder and `trusted_model_dirs` in "
    "studio.toml) are loaded."
)


class DetectionError(ValueError):
    """A user mistake (bad image, model, option): the message says what and how to fix it."""


@dataclass(frozen=True)
class DetectOptions:
    conf: float = 0.25  # Ultralytics' default; below ~0.1 the table fills with noise
    iou: float = 0.7  # NMS overlap threshold
    classes: tuple[int, ...] | None = None  # keep only these class ids
    imgsz: int = 640
    max_det: int = 300

    def __post_init__(self) -> None:
        if not 0.0 <= self.conf <= 1.0:
            raise DetectionError(f"confidence must be between 0 and 1, got {self.conf}")
        if not 0.0 < self.iou <= 1.0:
            raise DetectionError(f"IoU threshold must be in (0, 1], got {self.iou}")
        if not 32 <= self.imgsz <= 4096 or self.imgsz % 32:
            raise DetectionError(f"image size must be a multiple of 32 between 32 and 4096, got {self.imgsz}")
        if self.max_det < 1:
            raise DetectionError(f"max detections must be at least 1, got {self.max_det}")
        if self.classes is not None and any(c < 0 for c in self.classes):
            raise DetectionError(f"class ids must be >= 0, got {self.classes}")


@dataclass(frozen=True)
class Box:
    class_id: int
    name: str
    confidence: float
    x1: float
    y1: float
    x2: float
    y2: float


@dataclass
class DetectionResult:
    """What one image gave: boxes (mask count, top classes) read at once; the annotated image is drawn on the first
    read of `image` (once, by `draw`), so a caller that wants only boxes (the API, a benchmark) pays no drawing."""

    boxes: list[Box]
    width: int
    height: int
    model_id: str
    inference_ms: float
    task: str = "detect"
    masks: int = 0  # segmentation: masks drawn (one per box)
    top: list[tuple[str, float]] = field(default_factory=list)  # classification: (class, probability), best first
    draw: Callable[[], np.ndarray] | None = field(default=None, repr=False, compare=False)
    _image: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    @property
    def image(self) -> np.ndarray:
        """Annotated RGB uint8 (H, W, 3), possibly a reversed-channel view of the BGR frame; drawn once, on first use
        (the lock: two threads reading it at once must not draw the boxes twice onto the same frame)."""
        with self._lock:
            if self._image is None:
                if self.draw is None:
                    raise ValueError("this result has no image to draw")
                self._image, self.draw = self.draw(), None  # the drawing's references to the result go with it
            return self._image

    def rows(self) -> list[list[Any]]:
        if self.task == "classify":
            return [[name, round(p, 4)] for name, p in self.top]
        return [[b.name, round(b.confidence, 3), *(round(v, 1) for v in (b.x1, b.y1, b.x2, b.y2))] for b in self.boxes]

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model_id,
            "task": self.task,
            "width": self.width,
            "height": self.height,
            "inference_ms": round(self.inference_ms, 2),
            "boxes": [asdict(b) for b in self.boxes],
            **({"top": [{"name": n, "probability": round(p, 5)} for n, p in self.top]} if self.top else {}),
        }


@dataclass(frozen=True)
class DetectorModel:
    id: str
    title: str
    kind: str  # "shipped" | "untrained" | "hub" | "trained" | "trusted"
    path: Path | None = None  # weights file, None for yaml-built models
    yaml: str | None = None
    vram_bytes: int = 200 * 2**20
    task: str = "detect"  # "detect" | "segment" | "classify"

    @property
    def key(self) -> str:
        return f"detection:{self.id}"

    @property
    def untrained(self) -> bool:
        return self.kind == "untrained"


@dataclass
class VideoProgress:
    frames_read: int
    frames_total: int
    frames_detected: int
    boxes: int
    output: Path | None = None  # set on the last update
    json_path: Path | None = None
    per_frame: list[dict[str, Any]] = field(default_factory=list)
