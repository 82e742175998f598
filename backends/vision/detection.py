"""Object detection with Ultralytics YOLO, through the residency manager (keys "detection:<model id>").

Models: the catalog's detection specs (the shipped YOLOv8s person detector, untrained yolov8n/s and yolo11n built
from their yaml, COCO weights from the Hub once downloaded), the user's own trainings (runs of kind
"detection-train") and .pt files in the folders the owner's settings trust (`models_dir`, `trusted_model_dirs`).

Pickle policy: an Ultralytics .pt file is a Python pickle; loading it can run code. The backend loads only
(1) files shipped inside an installed package or downloaded by the Models tab from the catalog's named repo,
(2) training outputs under our own runs folder, (3) .pt files inside the trusted folders of the settings
(`Settings.model_dirs()`), registered with `add_trusted_weights(path)`. Trust is the machine owner's decision, never a
request's: an uploaded file is not in those folders, so it is refused with TRUST_WARNING before anything unpickles it.

Ultralytics is kept offline: YOLO_OFFLINE/YOLO_AUTOINSTALL/YOLO_CONFIG_DIR are set before it is imported, its
settings turn telemetry and logger integrations off, and the plotting font it would download is copied from
matplotlib's DejaVu Sans into its config folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from backends.vision.types import (
    RUN_KIND,
    TRUST_WARNING,
    Box,
    DetectionError,
    DetectionResult,
    DetectOptions,
    DetectorModel,
    VideoProgress,
)
from backends.vision.yolo import model_device, prepare_ultralytics
from studio.safety import (
    UnsafePathError,
    allowed_path,
    atomic_write_json,
    check_image_file,
    check_weights_file,
    unguessable_stamp,
)

if TYPE_CHECKING:
    from studio.services import Services

log = logging.getLogger(__name__)

MAX_TRUSTED_LISTED = 200  # .pt files listed from the trusted folders


# ---- options and results ---------------------------------------------------------------------------------


def load_rgb(image: Any) -> np.ndarray:
    """RGB uint8 (H, W, 3) from a numpy array (RGB, gray or RGBA) or an image file; clear error otherwise."""
    from PIL import Image, ImageOps

    if isinstance(image, str | Path):
        try:
            check_image_file(image)  # header only: refuses non-images and more than 89 megapixels before decoding
        except ValueError as e:
            raise DetectionError(str(e)) from None
        try:
            with Image.open(image) as im:
                im.load()
                return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))  # phone photos: honour rotation
        except Image.DecompressionBombError:
            raise DetectionError(f"{Path(image).name}: image is too large (over 89 megapixels); resize it.") from None
        except Exception as e:
            raise DetectionError(
                f"{Path(image).name} is not a readable image (corrupt, truncated or not an image): {e}"
            ) from None
    if not isinstance(image, np.ndarray) or image.size == 0:
        raise DetectionError("No image given: upload an image first.")
    arr = image
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise DetectionError(f"Expected an RGB image, got an array of shape {arr.shape}.")
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255 if arr.max() <= 1.0 else 1), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr[..., :3])


def check_trusted(path: Path, settings: Any) -> Path:
    """The resolved path if it lies in a folder the owner trusts with pickles; DetectionError otherwise."""
    try:
        return allowed_path(path, settings.model_dirs(), what="weights file")
    except UnsafePathError as e:
        raise DetectionError(f"Refused {Path(path).name}: {e} {TRUST_WARNING}") from None


# ---- loader ----------------------------------------------------------------------------------------------
class YoloLoader:
    """Residency loader for one YOLO model; the manager itself moves the (nn.Module) YOLO object."""

    def __init__(self, entry: DetectorModel, settings: Any) -> None:
        self.entry = entry
        self.key = entry.key
        self._settings = settings

    def estimate_bytes(self) -> int:
        if self.entry.path is not None and self.entry.path.is_file():
            return max(self.entry.vram_bytes, 2 * self.entry.path.stat().st_size)
        return self.entry.vram_bytes

    def load(self, device: str) -> Any:
        prepare_ultralytics(self._settings)
        from ultralytics import YOLO

        t = time.perf_counter()
        if self.entry.path is None:
            model = YOLO(self.entry.yaml, task="detect")
        else:
            check_weights_file(self.entry.path)
            if self.entry.kind == "trusted":  # checked again at load: the settings may have changed since
                check_trusted(self.entry.path, self._settings)
            try:
                model = YOLO(str(self.entry.path), task="detect")
            except Exception as e:
                raise DetectionError(f"Could not load {self.entry.path.name} as a YOLO model: {e}") from None
        if model.task != "detect":
            raise DetectionError(f"{self.entry.title} is a '{model.task}' model; the Vision tab needs a detect model.")
        model.model.eval()
        model.to(device)
        n = sum(p.numel() for p in model.model.parameters())
        log.info("loaded %s (%d params, %d bytes) on %s in %.2fs", self.key, n, 4 * n, device, time.perf_counter() - t)
        return model

    def release(self, obj: Any) -> None:
        obj.predictor = None


# ---- backend ---------------------------------------------------------------------------------------------
class DetectionBackend:
    def __init__(self, ctx: Services) -> None:
        self.ctx = ctx
        self._trusted: dict[str, DetectorModel] = {}
        self.job_runs: dict[str, str] = {}  # job id -> run id, for the tab's live plots
        self._lock = threading.Lock()

    # ---- models
    def models(self) -> list[DetectorModel]:
        """Every model usable now: catalog specs present on disk, the user's trainings, trusted files."""
        out = []
        for spec in self.ctx.catalog.by_capability("detection"):
            if spec.demo:
                yaml_name = spec.id.removesuffix("-untrained") + ".yaml"
                out.append(DetectorModel(spec.id, spec.title, "untrained", yaml=yaml_name, vram_bytes=spec.vram_bytes))
                continue
            path = self.ctx.catalog.local_path(spec)
            if path is not None and path.is_dir():
                path = next(iter(sorted(path.glob(f"{spec.id.split('-')[0]}.pt")) or sorted(path.glob("*.pt"))), None)
            if path is not None:
                kind = "shipped" if spec.package else "hub"
                out.append(DetectorModel(spec.id, spec.title, kind, path=path, vram_bytes=spec.vram_bytes))
        out += self.trained_models()
        with self._lock:
            out += list(self._trusted.values())
        return out

    def trained_models(self) -> list[DetectorModel]:
        out = []
        for run in self.ctx.runs.list():
            if run.kind != RUN_KIND:
                continue
            weights = run.dir / "ultralytics" / "weights"
            path = next((p for p in (weights / "best.pt", weights / "last.pt") if p.is_file()), None)
            if path is not None:
                title = f"trained: {run.id} ({run.status}, {path.name})"
                out.append(DetectorModel(f"run-{run.id}", title, "trained", path=path))
        return out

    def get_model(self, model_id: str) -> DetectorModel:
        for entry in self.models():
            if model_id in (entry.id, entry.key, entry.title):
                return entry
        raise DetectionError(f"Unknown detection model {model_id!r}; choose one from the list.")

    def trusted_files(self) -> list[Path]:
        """.pt files in the trusted folders that are not already in the list (for the tab's dropdown)."""
        known = {m.path for m in self.models() if m.path is not None}
        found: list[Path] = []
        for root in self.ctx.settings.model_dirs():
            for p in sorted(root.rglob("*.pt")) if root.is_dir() else []:
                if p.resolve() not in known and p.resolve() not in found and len(found) < MAX_TRUSTED_LISTED:
                    found.append(p.resolve())
        return found

    def add_trusted_weights(self, path: str | Path) -> DetectorModel:
        """Register a .pt file from a trusted folder of the settings; anything else (an upload) is refused."""
        path = check_trusted(Path(str(path).strip()), self.ctx.settings)
        if path.suffix != ".pt":
            raise DetectionError(f"{path.name}: expected an Ultralytics .pt file.")
        check_weights_file(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
        entry = DetectorModel(f"file-{digest}", f"trusted file: {path.name} ({digest})", "trusted", path=path.resolve())
        with self._lock:
            self._trusted[entry.id] = entry
        log.info("registered trusted weights %s as %s", path, entry.key)
        return entry

    def _register(self, entry: DetectorModel) -> str:
        if not self.ctx.residency.is_registered(entry.key):
            self.ctx.residency.register(YoloLoader(entry, self.ctx.settings))
        return entry.key

    def key_for(self, model_id: str) -> str:
        """The residency key of a model, registering its loader first (for `ctx.residency.run(key, fn)`)."""
        return self._register(self.get_model(model_id))

    def class_names(self, model_id: str) -> dict[int, str]:
        entry = self.get_model(model_id)
        return self.ctx.residency.run(self._register(entry), lambda m: dict(m.names))

    # ---- inference
    def _predict(self, model: Any, frames: list[np.ndarray], opts: DetectOptions) -> list[Any]:
        import cv2

        nc = len(model.names)
        if opts.classes is not None and any(c >= nc for c in opts.classes):
            raise DetectionError(f"class filter {list(opts.classes)} has ids beyond this model's {nc} classes")
        bgr = [cv2.cvtColor(f, cv2.COLOR_RGB2BGR) for f in frames]  # Ultralytics reads arrays as BGR
        return model.predict(
            bgr,
            device=model_device(model),
            conf=opts.conf,
            iou=opts.iou,
            classes=list(opts.classes) if opts.classes is not None else None,
            imgsz=opts.imgsz,
            max_det=opts.max_det,
            verbose=False,
        )

    def detect(self, model_id: str, image: Any, opts: DetectOptions | None = None) -> DetectionResult:
        """Detect objects in one image (RGB array or file); returns boxes and an annotated RGB image."""
        opts = opts or DetectOptions()
        rgb = load_rgb(image)
        entry = self.get_model(model_id)

        def run(model: Any) -> tuple[Any, float]:
            t = time.perf_counter()
            res = self._predict(model, [rgb], opts)[0]
            return res, (time.perf_counter() - t) * 1000

        res, ms = self.ctx.residency.run(self._register(entry), run)
        return _result(res, entry.id, ms)

    def detect_video(
        self, model_id: str, path: str | Path, opts: DetectOptions | None = None, *, stride: int = 1, chunk: int = 16
    ) -> Iterator[VideoProgress]:
        """Annotate a video; detects on every `stride`-th frame (boxes held in between). Streams progress."""
        from backends.vision.video import annotate_video

        opts = opts or DetectOptions()
        entry = self.get_model(model_id)
        key = self._register(entry)
        out_dir = self.ctx.settings.outputs_dir / "vision"

        def predict(frames: list[np.ndarray]) -> list[Any]:
            return self.ctx.residency.run(key, lambda m: self._predict(m, frames, opts))

        yield from annotate_video(Path(path), out_dir, predict, stride=stride, chunk=chunk)

    def save_json(self, result: DetectionResult, name: str = "detections") -> Path:
        from studio.safety import safe_filename

        path = self.ctx.settings.outputs_dir / "vision" / f"{safe_filename(name)}-{unguessable_stamp()}.json"
        atomic_write_json(path, result.to_json())
        return path

    # ---- training and export live in their own modules; these are the entry points the tab uses
    def start_training(self, dataset: str | Path, opts: Any) -> Any:
        from backends.vision.train import start_training

        return start_training(self, Path(dataset), opts)

    def suggest_training(self, n_images: int, base_model_id: str) -> dict[str, Any]:
        from backends.vision.train import suggest_settings

        return suggest_settings(self.ctx, n_images, self.get_model(base_model_id))

    def make_sample_dataset(self, n_train: int = 48, n_val: int = 12) -> Path:
        """A synthetic circles/squares/triangles dataset (exact labels) to try training on: its folder (under
        data/ingest, so the dataset-folder check of `check_dataset_folder` accepts it)."""
        from backends.vision.synth import make_synthetic_dataset

        root = self.ctx.settings.data_dir / "ingest" / "vision-sample-shapes"
        if not (root / "data.yaml").is_file():
            make_synthetic_dataset(root, n_train=n_train, n_val=n_val, imgsz=160, seed=0)
        return root

    def check_dataset_folder(self, folder: str | Path) -> Path:
        """A dataset folder a request named, if the settings' data roots hold it (never models, cache, config)."""
        s = self.ctx.settings
        try:
            return allowed_path(folder, s.data_roots(), s.protected_paths(), what="dataset folder")
        except UnsafePathError as e:
            raise DetectionError(str(e)) from None

    def check_dataset(self, source: str | Path) -> Any:
        """Unzip (safely) if it is a zip, then validate; returns the DatasetReport (problems inside, no raise)."""
        from backends.vision.train import prepare_dataset

        return prepare_dataset(self.ctx, Path(source))

    def export_onnx(self, model_id: str, imgsz: int = 640, *, for_download: bool = False) -> Path:
        """ONNX file in the cache; with `for_download` a copy in outputs/vision (the only folder the UI serves)."""
        from backends.vision.export import export_onnx

        path = export_onnx(self, self.get_model(model_id), imgsz)
        if not for_download:
            return path
        dest = self.ctx.settings.outputs_dir / "vision" / f"{model_id}-{imgsz}-{unguessable_stamp()}.onnx"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
        return dest

    def latency(self, model_id: str, imgsz: int = 640, runs: int = 30) -> list[Any]:
        from backends.vision.export import latency_table

        return latency_table(self, self.get_model(model_id), imgsz=imgsz, runs=runs)


def _result(res: Any, model_id: str, ms: float) -> DetectionResult:
    names = res.names
    boxes = []
    if res.boxes is not None and len(res.boxes):
        xyxy = res.boxes.xyxy.cpu().numpy().astype(float)
        conf = res.boxes.conf.cpu().numpy().astype(float)
        cls = res.boxes.cls.cpu().numpy().astype(int)
        for (x1, y1, x2, y2), c, k in zip(xyxy, conf, cls, strict=True):
            boxes.append(Box(int(k), str(names[int(k)]), float(c), float(x1), float(y1), float(x2), float(y2)))
    annotated = draw_boxes(np.ascontiguousarray(res.orig_img[..., ::-1]), boxes)  # orig_img is BGR
    h, w = res.orig_shape
    return DetectionResult(boxes, annotated, int(w), int(h), model_id, ms)


PALETTE = ((255, 56, 56), (56, 56, 255), (255, 157, 151), (255, 112, 31), (72, 249, 10), (0, 194, 255))


def draw_boxes(rgb: np.ndarray, boxes: list[Box]) -> np.ndarray:
    """Boxes with 'class 0.87' labels kept inside the image: above the box when there is room, else inside it,
    and shifted left at the right edge (Ultralytics' plot() cuts them off at the border)."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.fromarray(rgb)
    draw = ImageDraw.Draw(img)
    size = max(12, round(min(img.size) / 40))
    try:
        import matplotlib

        font = ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        font = ImageFont.load_default()
    line = max(2, size // 6)
    for b in boxes:
        colour = PALETTE[b.class_id % len(PALETTE)]
        draw.rectangle((b.x1, b.y1, b.x2, b.y2), outline=colour, width=line)
        text = f"{b.name} {b.confidence:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 6, bottom - top + 6
        x = min(max(0.0, b.x1), max(0.0, img.width - tw))
        y = b.y1 - th if b.y1 - th >= 0 else min(b.y1, img.height - th)
        draw.rectangle((x, y, x + tw, y + th), fill=colour)
        draw.text((x + 3, y + 3 - top), text, fill=(255, 255, 255), font=font)
    return np.asarray(img)


def result_json(result: DetectionResult) -> str:
    return json.dumps(result.to_json(), indent=2)


def create(ctx: Services) -> DetectionBackend:
    """Cheap: imports no torch/Ultralytics; `prepare_ultralytics` runs on the first load, export or training."""
    return DetectionBackend(ctx)
