"""Ultralytics YOLO: detect, segment and classify images and video, train on your own labelled data (imported from
labelling tools), export to ONNX / TensorRT / OpenVINO and time every engine.

Modules: detection (DetectionBackend: models, detect/segment/classify, video, entry points), types (options, results,
model records), yolo (Ultralytics set-up), draw (decode and drawing), data (YOLO dataset validation, safe unzip),
task_data (classification datasets), importers + dataset_import (COCO / VOC / YOLO exports -> a YOLO dataset),
options (training settings, presets, suggestions), train (training jobs), checkpoints (atomic, resumable, AMP check),
export (ONNX, TensorRT, OpenVINO), latency (the engine table), video (annotated video), synth (synthetic datasets).
"""

from backends.vision.dataset_import import FORMAT_TITLES as IMPORT_FORMATS
from backends.vision.dataset_import import ImportOptions, parse_mapping
from backends.vision.detection import DetectionBackend, create
from backends.vision.export import TITLES as EXPORT_TITLES
from backends.vision.export import openvino_available, tensorrt_available
from backends.vision.latency import CELL_HEADERS as LATENCY_HEADERS
from backends.vision.options import AUGMENT_PRESETS, HELP, TrainOptions
from backends.vision.synth import make_synthetic_dataset
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
    "AUGMENT_PRESETS", "EXPORT_TITLES", "HELP", "IMPORT_FORMATS", "LATENCY_HEADERS", "TRUST_WARNING", "Box",
    "DetectOptions", "DetectionBackend", "DetectionError", "DetectionResult", "DetectorModel", "ImportOptions",
    "TrainOptions", "VideoProgress", "create", "make_synthetic_dataset", "openvino_available", "parse_mapping",
    "tensorrt_available",
]  # fmt: skip
