"""Object detection with Ultralytics YOLO: detect in images and video, train on your own labelled data, export to
ONNX and time it.

Modules: detection (DetectionBackend: models, detect, video), types (options, results, model records), yolo
(Ultralytics set-up), data (dataset validation, safe zip extraction), train (training jobs), export (ONNX, latency),
video (annotated video), synth (a synthetic labelled dataset).
"""

from backends.vision.detection import DetectionBackend, create
from backends.vision.export import tensorrt_available
from backends.vision.synth import make_synthetic_dataset
from backends.vision.train import TrainOptions
from backends.vision.types import (
    TRUST_WARNING,
    Box,
    DetectionError,
    DetectionResult,
    DetectOptions,
    DetectorModel,
    VideoProgress,
)

__all__ = [
    "TRUST_WARNING", "Box", "DetectOptions", "DetectionBackend", "DetectionError", "DetectionResult", "DetectorModel",
    "TrainOptions", "VideoProgress", "create", "make_synthetic_dataset", "tensorrt_available",
]  # fmt: skip
