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
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from backends.vision.draw import array_rgb, check_file, decode_file, load_bgr, read_bgr, result_from
from backends.vision.types import (
    DEMO_MODELS,
    RUN_KINDS,
    TASKS,
    TRUST_WARNING,
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
    if isinstance(image, str | Path):
        return np.ascontiguousarray(read_bgr(image)[..., ::-1])
    return array_rgb(image)


def check_trusted(path: Path, settings: Any) -> Path:
    """The resolved path if it lies in a folder the owner trusts with pickles; DetectionError otherwise."""
    try:
        return allowed_path(path, settings.model_dirs(), what="weights file")
    except UnsafePathError as e:
        raise DetectionError(f"Refused {Path(path).name}: {e} {TRUST_WARNING}") from None


# ---- loader ----------------------------------------------------------------------------------------------
def _check_and_decode(path: str | Path) -> np.ndarray:
    return decode_file(check_file(path))


class YoloLoader:
    """Residency loader for one YOLO model; the manager itself moves the (nn.Module) YOLO object."""

    def __init__(self, entry: DetectorModel, settings: Any, on_load: Any = None) -> None:
        self.entry = entry
        self.key = entry.key
        self._settings = settings
        self._on_load = on_load  # on_load(key, class names) after each load

    def estimate_bytes(self) -> int:
        if self.entry.path is not None and self.entry.path.is_file():
            return max(self.entry.vram_bytes, 2 * self.entry.path.stat().st_size)
        return self.entry.vram_bytes

    def load(self, device: str) -> Any:
        prepare_ultralytics(self._settings)
        from ultralytics import YOLO

        t = time.perf_counter()
        task = self.entry.task
        if self.entry.path is None:
            model = YOLO(self.entry.yaml, task=task)
        else:
            check_weights_file(self.entry.path)
            if self.entry.kind == "trusted":  # checked again at load: the settings may have changed since
                check_trusted(self.entry.path, self._settings)
            try:
                model = YOLO(str(self.entry.path), task=task)
            except Exception as e:
                raise DetectionError(f"Could not load {self.entry.path.name} as a YOLO model: {e}") from None
        if model.task != task:
            raise DetectionError(f"{self.entry.title} is a '{model.task}' model; this section needs a '{task}' one.")
        model.model.eval()
        model.to(device)
        n = sum(p.numel() for p in model.model.parameters())
        log.info("loaded %s (%d params, %d bytes) on %s in %.2fs", self.key, n, 4 * n, device, time.perf_counter() - t)
        if self._on_load is not None:
            self._on_load(self.key, dict(model.names))
        return model

    def release(self, obj: Any) -> None:
        obj.predictor = None


# ---- backend ---------------------------------------------------------------------------------------------
class DetectionBackend:
    def __init__(self, ctx: Services) -> None:
        self.ctx = ctx
        self._trusted: dict[str, DetectorModel] = {}
        self._known: dict[str, DetectorModel] = {}  # get_model's memory
        self.job_runs: dict[str, str] = {}  # job id -> run id, for the tab's live plots
        self._names: dict[str, dict[int, str]] = {}  # residency key -> class names, set by each load
        self._decoder: ThreadPoolExecutor | None = None  # detect()'s file decodes, started on first use
        # decode on a worker thread while the lease is taken: None = only with a GPU tier, where the lease reads the
        # card (~0.8 ms on the H200); on a CPU the lease costs ~0.02 ms and a thread hand-off can cost more
        self.overlap_decode: bool | None = None
        self._lock = threading.Lock()

    # ---- models
    def models(self, task: str | None = "detect") -> list[DetectorModel]:
        """Every model of `task` (all tasks with None) usable now: catalog specs present on disk, the untrained demo
        models of the other tasks, the user's trainings, trusted files."""
        out = [m for m in self._all_models() if task is None or m.task == task]
        return out

    def _all_models(self) -> list[DetectorModel]:
        out = [DetectorModel(i, title, "untrained", yaml=y, task=t) for i, title, t, y in DEMO_MODELS]
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
        tasks = {kind: task for task, kind in RUN_KINDS.items()}
        for run in self.ctx.runs.list():
            if run.kind not in tasks:
                continue
            weights = run.dir / "ultralytics" / "weights"
            path = next((p for p in (weights / "best.pt", weights / "last.pt") if p.is_file()), None)
            if path is not None:
                title = f"trained: {run.id} ({run.status}, {path.name})"
                out.append(DetectorModel(f"run-{run.id}", title, "trained", path=path, task=tasks[run.kind]))
        return out

    def get_model(self, model_id: str) -> DetectorModel:
        """The model record; ids seen before are answered from memory while their weights file is still there
        (listing every run's folder on each detect() call would cost more than drawing the boxes)."""
        with self._lock:
            known = self._known.get(model_id)
        if known is not None and (known.path is None or known.path.is_file()):
            return known
        for entry in self.models(None):
            if model_id in (entry.id, entry.key, entry.title):
                with self._lock:
                    self._known[model_id] = entry
                return entry
        raise DetectionError(f"Unknown detection model {model_id!r}; choose one from the list.")

    def trusted_files(self) -> list[Path]:
        """.pt files in the trusted folders that are not already in the list (for the tab's dropdown)."""
        known = {m.path for m in self.models(None) if m.path is not None}
        found: list[Path] = []
        for root in self.ctx.settings.model_dirs():
            for p in sorted(root.rglob("*.pt")) if root.is_dir() else []:
                if p.resolve() not in known and p.resolve() not in found and len(found) < MAX_TRUSTED_LISTED:
                    found.append(p.resolve())
        return found

    def add_trusted_weights(self, path: str | Path, task: str = "detect") -> DetectorModel:
        """Register a .pt file from a trusted folder of the settings as a `task` model (checked when it loads);
        anything else (an upload) is refused."""
        if task not in TASKS:
            raise DetectionError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        path = check_trusted(Path(str(path).strip()), self.ctx.settings)
        if path.suffix != ".pt":
            raise DetectionError(f"{path.name}: expected an Ultralytics .pt file.")
        check_weights_file(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
        title = f"trusted file: {path.name} ({digest})"
        entry = DetectorModel(f"file-{digest}", title, "trusted", path=path.resolve(), task=task)
        with self._lock:
            self._trusted[entry.id] = entry
        log.info("registered trusted weights %s as %s", path, entry.key)
        return entry

    def _register(self, entry: DetectorModel) -> str:
        if not self.ctx.residency.is_registered(entry.key):
            self.ctx.residency.register(YoloLoader(entry, self.ctx.settings, self._loaded))
        return entry.key

    def _loaded(self, key: str, names: dict[int, str]) -> None:
        with self._lock:
            self._names[key] = names

    def key_for(self, model_id: str) -> str:
        """The residency key of a model, registering its loader first (for `ctx.residency.run(key, fn)`)."""
        return self._register(self.get_model(model_id))

    def class_names(self, model_id: str) -> dict[int, str]:
        """The model's class names: those its loader read at the last load (no lease: the tab asks on every click),
        else from the model under a lease (which loads it)."""
        key = self._register(self.get_model(model_id))
        with self._lock:
            names = self._names.get(key)
        if names is None:
            names = self.ctx.residency.run(key, lambda m: dict(m.names))
        return dict(names)

    # ---- inference
    def _predict(self, model: Any, frames: list[np.ndarray], opts: DetectOptions) -> list[Any]:
        """Ultralytics predict on BGR frames (what its own loader reads from files)."""
        nc = len(model.names)
        if opts.classes is not None and any(c >= nc for c in opts.classes):
            raise DetectionError(f"class filter {list(opts.classes)} has ids beyond this model's {nc} classes")
        return model.predict(
            frames,
            device=model_device(model),
            conf=opts.conf,
            iou=opts.iou,
            classes=list(opts.classes) if opts.classes is not None else None,
            imgsz=opts.imgsz,
            max_det=opts.max_det,
            verbose=False,
        )

    def detect(
        self, model_id: str, image: Any, opts: DetectOptions | None = None, *, top_k: int = 5
    ) -> DetectionResult:
        """Detect objects (or segment, or classify: the model's task decides) in one image (RGB array or file);
        returns boxes (masks, top-k classes) and the annotated RGB image (drawn when first read).

        On a GPU a file's header is checked first when the model is not on the card yet (a non-image or an
        oversized one is refused before any model moves; with the model resident the check runs with the decode);
        the decode runs on a worker thread while this thread takes the residency lease (which reads the card), and
        the lease waits for it before predicting: the two overlap instead of adding up."""
        opts = opts or DetectOptions()
        entry = self.get_model(model_id)
        frame = self._decode_soon(image, entry.key)
        key = self._register(entry)

        def run(model: Any) -> tuple[Any, float]:
            bgr = frame.result()  # a decode error (a corrupt middle) is raised here, inside the lease
            t = time.perf_counter()
            res = self._predict(model, [bgr], opts)[0]
            return res, (time.perf_counter() - t) * 1000

        res, ms = self.ctx.residency.run(key, run)
        return result_from(res, entry, ms, top_k)

    def _decode_soon(self, image: Any, key: str) -> Future:
        """The BGR frame of `image` as a future: a file decodes on the decoder thread (see `overlap_decode`), an
        array converts now. The header check runs here when the model `key` would have to move for this image (a
        bad file then costs no move), on the decoder thread with the rest when it is already on the card."""
        overlap = self.overlap_decode
        if overlap is None:
            overlap = str(self.ctx.residency.device).startswith("cuda")
        if not overlap or not isinstance(image, str | Path):
            done: Future = Future()
            done.set_result(load_bgr(image))
            return done
        resident = self.ctx.residency.is_resident(key)
        path = image if resident else check_file(image)
        with self._lock:
            if self._decoder is None:
                self._decoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="vision-decode")
            return self._decoder.submit(_check_and_decode if resident else decode_file, path)

    def detect_video(
        self, model_id: str, path: str | Path, opts: DetectOptions | None = None, *, stride: int = 1, chunk: int = 16
    ) -> Iterator[VideoProgress]:
        """Annotate a video; detects on every `stride`-th frame (boxes held in between). Streams progress."""
        from backends.vision.video import annotate_video

        opts = opts or DetectOptions()
        entry = self.get_model(model_id)
        key = self._register(entry)
        out_dir = self.ctx.settings.outputs_dir / "vision"

        def predict(frames: list[np.ndarray]) -> list[Any]:  # RGB frames from the video reader
            import cv2

            bgr = [cv2.cvtColor(f, cv2.COLOR_RGB2BGR) for f in frames]
            return self.ctx.residency.run(key, lambda m: self._predict(m, bgr, opts))

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

    def resume_training(self, run_id: str) -> Any:
        from backends.vision.train import start_resume

        return start_resume(self, run_id)

    def resumable_runs(self) -> list[tuple[str, str]]:
        """(title, run id) of stopped, failed or interrupted YOLO trainings that left a checkpoint."""
        from backends.vision.checkpoints import resume_checkpoint

        out = []
        for run in self.ctx.runs.list():
            weights = run.dir / "ultralytics" / "weights"
            ckpt = resume_checkpoint(weights, run.status) if run.kind in RUN_KINDS.values() else None
            if ckpt is not None and run.status in ("cancelled", "failed", "interrupted"):
                out.append((f"{run.id} ({run.status}, from {ckpt.name})", run.id))
        return out

    def suggest_training(self, n_images: int, base_model_id: str, amp: bool = False) -> dict[str, Any]:
        from backends.vision.options import suggest_settings

        return suggest_settings(self.ctx, n_images, self.get_model(base_model_id), amp)

    def make_sample_dataset(self, n_train: int = 48, n_val: int = 12, task: str = "detect") -> Path:
        """A synthetic circles/squares/triangles dataset (exact labels) to try training on: its folder (under
        data/ingest, so the dataset-folder check of `check_dataset_folder` accepts it)."""
        from backends.vision.synth import make_synthetic_cls_dataset, make_synthetic_dataset

        root = self.ctx.settings.data_dir / "ingest" / f"vision-sample-{task}"
        if task == "classify":
            if not (root / "val").is_dir():
                make_synthetic_cls_dataset(root, n_train=max(1, n_train // 3), n_val=max(1, n_val // 3), seed=0)
        elif not (root / "data.yaml").is_file():
            make_synthetic_dataset(root, n_train=n_train, n_val=n_val, imgsz=160, seed=0, polygons=task == "segment")
        return root

    def check_dataset_folder(self, folder: str | Path) -> Path:
        """A dataset folder a request named, if the settings' data roots hold it (never models, cache, config)."""
        s = self.ctx.settings
        try:
            return allowed_path(folder, s.data_roots(), s.protected_paths(), what="dataset folder")
        except UnsafePathError as e:
            raise DetectionError(str(e)) from None

    def check_dataset(self, source: str | Path, task: str = "detect") -> Any:
        """Unzip (safely) if it is a zip, then validate; returns the DatasetReport (problems inside, no raise)."""
        from backends.vision.train import prepare_dataset

        return prepare_dataset(self.ctx, Path(source), task)

    def import_dataset(self, source: str | Path, name: str, opts: Any = None) -> Any:
        """A labelling tool's export (.zip, or a folder under the data roots) -> a YOLO dataset in data/ingest/<name>;
        returns the ImportReport (errors inside; nothing written when there are any)."""
        from backends.vision.dataset_import import import_dataset
        from backends.vision.train import unpack
        from studio.safety import safe_filename

        dest = self.ctx.settings.data_dir / "ingest" / safe_filename(name or "", "imported")
        return import_dataset(unpack(self.ctx, Path(source)), dest, opts)

    def export(self, model_id: str, fmt: str = "onnx", imgsz: int = 640, *, for_download: bool = False) -> Path:
        """Exported model in the cache (batch 1); with `for_download` a copy in outputs/vision (the only folder the
        UI serves; an OpenVINO folder is zipped)."""
        from backends.vision.export import export_model

        path = export_model(self, self.get_model(model_id), fmt, imgsz)
        if not for_download:
            return path
        dest = self.ctx.settings.outputs_dir / "vision" / f"{model_id}-{imgsz}-{unguessable_stamp()}{path.suffix}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            return Path(shutil.make_archive(str(dest.with_name(dest.name + path.name[-15:])), "zip", path))
        shutil.copyfile(path, dest)
        return dest

    def export_formats(self) -> list[tuple[str, str, str | None]]:
        """(title, format, why it is not available or None) for the Export section; torch-free."""
        from backends.vision.export import TITLES, openvino_available, tensorrt_available

        cuda = str(self.ctx.residency.device).startswith("cuda")
        trt = None if tensorrt_available() and cuda else "needs the tensorrt package and a CUDA GPU"
        if cuda and not tensorrt_available():
            trt = "TensorRT is not installed (pip install tensorrt)"
        why = {"onnx": None, "engine": trt, "openvino": None if openvino_available() else "openvino is not installed"}
        return [(TITLES[f], f, why[f]) for f in TITLES]

    def export_onnx(self, model_id: str, imgsz: int = 640, *, for_download: bool = False) -> Path:
        return self.export(model_id, "onnx", imgsz, for_download=for_download)

    def latency(self, model_id: str, imgsz: int = 640, runs: int = 30, *, batches: tuple[int, ...] = (1, 8),
                half: bool = True, cpu_runs: int | None = None) -> tuple[list[Any], list[str]]:  # fmt: skip
        """(rows, notes) of the latency table: every engine usable here, batch sizes `batches`."""
        from backends.vision.latency import latency_table

        entry = self.get_model(model_id)
        if entry.task != "detect":
            raise DetectionError(f"the latency table compares detection heads; {entry.title} is a {entry.task} model")
        return latency_table(self, entry, imgsz=imgsz, runs=runs, batches=batches, half=half, cpu_runs=cpu_runs)


def result_json(result: DetectionResult) -> str:
    return json.dumps(result.to_json(), indent=2)


def create(ctx: Services) -> DetectionBackend:
    """Cheap: imports no torch/Ultralytics; `prepare_ultralytics` runs on the first load, export or training."""
    return DetectionBackend(ctx)
