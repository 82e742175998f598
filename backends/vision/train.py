"""Train a YOLO detector on the user's dataset as a background job, recorded as a run.

Flow: the dataset (zip or folder) is validated first (`yolo_data.validate_dataset`); a clean data.yaml is written
into the run folder; Ultralytics trains with callbacks that report progress per batch, log loss and mAP per epoch
into the run's metrics.jsonl, and turn a cancel into `trainer.stop = True`. Ultralytics then finishes the current
epoch's validation and writes last.pt (and best.pt), so a cancelled run keeps its last checkpoint.
Training runs under a preemptible training lease (`ctx.residency.training`): Ultralytics' on_train_batch_end is the
step boundary where it gives the card to an interactive request and comes back (trainer.model, trainer.ema and
trainer.optimizer move with it). On CUDA, idle models on the GPU are first moved off (the trainer builds its model
before the lease can make room).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backends.vision.data import DatasetError, DatasetReport, ZipLimits, safe_extract_zip, validate_dataset
from backends.vision.data import write_training_yaml as _write_yaml
from backends.vision.types import RUN_KIND, DetectionError, DetectorModel
from backends.vision.yolo import prepare_ultralytics
from studio.safety import atomic_path, atomic_write_bytes

if TYPE_CHECKING:
    from studio.services import Services

log = logging.getLogger(__name__)
GB = 2**30


@dataclass(frozen=True)
class TrainOptions:
    base: str = "yolov8s-person"  # start point: shipped weights (transfer learning) or "<arch>-untrained"
    epochs: int = 50
    imgsz: int = 640
    batch: int = 16
    patience: int = 20  # early stopping: epochs without a better mAP before stopping
    seed: int = 0
    amp: bool = True  # mixed precision; only used on CUDA
    augment: bool = True  # mosaic, flips, HSV, scale/translate (Ultralytics defaults); off = plain images
    close_mosaic: int = 10  # last epochs without mosaic
    warmup_epochs: float = 3.0
    workers: int = 2  # dataloader processes on CUDA; 0 (in-process) on CPU

    def __post_init__(self) -> None:
        checks = [
            (1 <= self.epochs <= 10_000, f"epochs must be 1-10000, got {self.epochs}"),
            (
                32 <= self.imgsz <= 2048 and self.imgsz % 32 == 0,
                f"image size must be a multiple of 32, got {self.imgsz}",
            ),
            (1 <= self.batch <= 512, f"batch must be 1-512, got {self.batch}"),
            (0 <= self.patience <= 10_000, f"patience must be >= 0, got {self.patience}"),
            (self.close_mosaic >= 0 and self.warmup_epochs >= 0, "close_mosaic and warmup_epochs must be >= 0"),
            (0 <= self.workers <= 32, f"workers must be 0-32, got {self.workers}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise DetectionError(msg)


@dataclass
class TrainResult:
    run_id: str
    status: str  # "done" | "cancelled"
    epochs_done: int
    best_map50: float | None
    final_map50: float | None
    best_weights: Path | None
    last_weights: Path | None


# ---- suggestions -----------------------------------------------------------------------------------------
def _gb_per_image_at_640(entry: DetectorModel) -> float:
    """Rough training memory per image at 640 px (activations + grads), from Ultralytics' own batch probing."""
    name = entry.id + str(entry.yaml or "")
    return 0.25 if ("v8n" in name or "11n" in name) else 0.4


def vram_budget_bytes(ctx: Services) -> int | None:
    """What training may use on the GPU: the residency manager's live budget; None on a CPU-only machine."""
    if not str(ctx.residency.device).startswith("cuda"):
        return None
    return ctx.residency.capacity_bytes()


def suggest_settings(ctx: Services, n_images: int, entry: DetectorModel) -> dict[str, Any]:
    """Epochs, image size and batch that fit the VRAM budget (or keep a CPU run short), with the reason."""
    budget = vram_budget_bytes(ctx)
    epochs = 100 if n_images < 300 else 60 if n_images < 3000 else 30
    if budget is None:
        return {
            "epochs": min(epochs, 20),
            "imgsz": 320,
            "batch": 8,
            "reason": "No GPU: 320 px, batch 8 and at most 20 epochs keep a CPU run to minutes per epoch.",
        }
    imgsz = 640
    per_image = _gb_per_image_at_640(entry) * GB
    usable = 0.8 * budget - 1 * GB  # model, optimizer state, CUDA context
    batch = 2 ** int(math.log2(max(2, usable / per_image))) if usable > 2 * per_image else 2
    batch = min(batch, 64)
    if batch < 8:
        imgsz, batch = 480, max(2, 2 ** int(math.log2(max(2, usable / (per_image * 0.56)))))
    return {
        "epochs": epochs,
        "imgsz": imgsz,
        "batch": int(batch),
        "reason": f"GPU budget {budget / GB:.1f} GB: about {per_image / GB * (imgsz / 640) ** 2:.2f} GB per image "
        f"at {imgsz} px leaves room for batch {batch}; {epochs} epochs for {n_images} images (early stopping on).",
    }


# ---- dataset ---------------------------------------------------------------------------------------------
def prepare_dataset(ctx: Services, source: Path) -> DatasetReport:
    """Unzip (safely) if needed, then validate; the report carries every problem found."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".zip":
        from studio.runs import hash_dataset

        dest = ctx.settings.cache_dir / "datasets" / hash_dataset(source)[:16]
        if not (dest / ".complete").exists():
            limits = ZipLimits(max_total_bytes=4 * ctx.settings.max_upload_mb * 2**20)
            safe_extract_zip(source, dest, limits)
            (dest / ".complete").touch()
        source = dest
    elif source.is_file():
        raise DatasetError(f"{source.name}: give a .zip of the dataset or a folder path.")
    return validate_dataset(source)


def write_training_yaml(report: DatasetReport, dest: Path) -> Path:
    return _write_yaml(report, dest)


# ---- training --------------------------------------------------------------------------------------------
def _train_kwargs(opts: TrainOptions, device: str) -> dict[str, Any]:
    cuda = device.startswith("cuda")
    kwargs: dict[str, Any] = {
        "epochs": opts.epochs,
        "imgsz": opts.imgsz,
        "batch": opts.batch,
        "patience": opts.patience,
        "seed": opts.seed,
        "deterministic": False,  # True flips torch's global deterministic mode for the whole studio process
        "device": 0 if cuda else "cpu",
        "amp": opts.amp and cuda,
        "workers": opts.workers if cuda else 0,
        "close_mosaic": opts.close_mosaic,
        "warmup_epochs": opts.warmup_epochs,
        "plots": False,
        "verbose": False,
        "val": True,
        "exist_ok": True,
    }
    if not opts.augment:
        kwargs |= {k: 0.0 for k in ("mosaic", "fliplr", "hsv_h", "hsv_s", "hsv_v", "translate", "scale")}
    return kwargs


def _total_loss(tloss: Any) -> float:
    """Running mean training loss; Ultralytics 8.4 keeps it as {name: value}, older versions as a tensor."""
    if tloss is None:
        return float("nan")
    if isinstance(tloss, dict):
        return float(sum(float(v) for v in tloss.values()))
    return float(tloss.sum())


class _Reporter:
    """Ultralytics callbacks -> job progress, cancel and run metrics."""

    def __init__(self, job: Any, run: Any, epochs: int) -> None:
        self.job, self.run, self.epochs = job, run, epochs
        self.batch = 0
        self.epoch_in_progress = 0  # 1-based number of the epoch being trained
        self.rows: list[dict[str, float]] = []
        self.best_eval: dict[str, float] | None = None  # Ultralytics' final validation of best.pt

    def epoch_start(self, trainer: Any) -> None:
        self.batch = 0
        self.epoch_in_progress = trainer.epoch + 1  # set, not counted: an OOM retry restarts the same epoch

    def batch_end(self, trainer: Any) -> None:
        self.batch += 1
        nb = max(1, len(trainer.train_loader))
        done = (trainer.epoch + self.batch / nb) / max(1, trainer.epochs)
        loss = _total_loss(trainer.tloss)
        self.job.set_progress(
            done, f"epoch {trainer.epoch + 1}/{trainer.epochs}, batch {self.batch}/{nb}, loss {loss:.3f}"
        )
        if self.job.should_stop() and not trainer.stop:
            trainer.stop = True
            self.job.log("stop requested: finishing this epoch's validation and saving last.pt")

    def fit_epoch_end(self, trainer: Any) -> None:
        losses = trainer.label_loss_items(trainer.tloss, prefix="train") if trainer.tloss is not None else {}
        m = trainer.metrics or {}
        row = {
            "box_loss": float(losses.get("train/box_loss", float("nan"))),
            "cls_loss": float(losses.get("train/cls_loss", float("nan"))),
            "dfl_loss": float(losses.get("train/dfl_loss", float("nan"))),
            "val_box_loss": float(m.get("val/box_loss", float("nan"))),
            "precision": float(m.get("metrics/precision(B)", float("nan"))),
            "recall": float(m.get("metrics/recall(B)", float("nan"))),
            "map50": float(m.get("metrics/mAP50(B)", float("nan"))),
            "map50_95": float(m.get("metrics/mAP50-95(B)", float("nan"))),
        }
        if trainer.epoch + 1 > self.epoch_in_progress:  # final_eval() reports best.pt at step epochs + 1
            self.best_eval = {k: row[k] for k in ("precision", "recall", "map50", "map50_95")}
            self.job.log(f"best.pt on the val split: mAP50 {row['map50']:.3f} mAP50-95 {row['map50_95']:.3f}")
            return
        self.rows.append(row)
        self.run.log_metrics(trainer.epoch + 1, **row)
        self.job.log(
            f"epoch {trainer.epoch + 1}/{trainer.epochs}: loss {row['box_loss']:.3f}/{row['cls_loss']:.3f} "
            f"mAP50 {row['map50']:.3f} mAP50-95 {row['map50_95']:.3f}"
        )


class _LeaseCallbacks:
    """Ultralytics callbacks -> one preemptible training lease: opened once the trainer has its model, EMA and
    optimizer (on_pretrain_routine_end), a step boundary per batch (on_train_batch_end), closed at the end."""

    def __init__(self, residency: Any, key: str, label: str = "YOLO training") -> None:
        self.residency, self.key, self.label = residency, key, label
        self.lease: Any = None

    def attach(self, model: Any) -> None:
        model.add_callback("on_pretrain_routine_end", self.start)
        model.add_callback("on_train_batch_end", self.batch_end)
        model.add_callback("on_train_end", self.close)

    def start(self, trainer: Any) -> None:
        ema = getattr(getattr(trainer, "ema", None), "ema", None)
        modules = [m for m in (trainer.model, ema) if m is not None]
        optimizers = [trainer.optimizer] if getattr(trainer, "optimizer", None) is not None else []
        self.lease = self.residency.training(self.key, modules=modules, optimizers=optimizers, label=self.label)
        self.lease.__enter__()
        self.lease.boundary()

    def batch_end(self, trainer: Any) -> None:
        if self.lease is not None:
            self.lease.report(epoch=trainer.epoch + 1, loss=_total_loss(trainer.tloss))
            self.lease.boundary()

    def close(self, trainer: Any = None) -> None:
        if self.lease is not None:
            self.lease.__exit__(None, None, None)


def train_detector(
    backend: Any, job: Any, report: DatasetReport, base: DetectorModel, opts: TrainOptions
) -> TrainResult:
    """The job body: train, record, return paths and metrics. Raises on failure (the run is marked failed)."""
    ctx = backend.ctx
    prepare_ultralytics(ctx.settings)
    from ultralytics import YOLO

    config = {"base": base.id, "dataset": str(report.root), "names": report.names, **asdict(opts)}
    run = ctx.runs.create(RUN_KIND, config, seed=opts.seed, dataset_hash=report.dataset_hash)
    backend.job_runs[job.id] = run.id
    job.log(f"run {run.id}: {sum(s.images for s in report.splits.values())} images, classes {report.names}")
    data_yaml = write_training_yaml(report, run.dir / "data.yaml")
    device = str(ctx.residency.device)
    if device.startswith("cuda"):
        ctx.residency.offload(tiers=("gpu",))  # the trainer builds its model before its lease can make room
    model = YOLO(str(base.path), task="detect") if base.path else YOLO(base.yaml, task="detect")
    reporter = _Reporter(job, run, opts.epochs)
    model.add_callback("on_train_epoch_start", reporter.epoch_start)
    model.add_callback("on_train_batch_end", reporter.batch_end)
    model.add_callback("on_fit_epoch_end", reporter.fit_epoch_end)
    model.add_callback("on_train_start", atomic_checkpoints)
    install_atomic_strip()
    lease = _LeaseCallbacks(ctx.residency, f"train:yolo:{run.id}")
    lease.attach(model)
    t = time.perf_counter()
    try:
        model.train(data=str(data_yaml), project=str(run.dir), name="ultralytics", **_train_kwargs(opts, device))
    except BaseException as e:
        run.finish("failed", error=f"{type(e).__name__}: {e}", epochs_done=len(reporter.rows))
        raise
    finally:
        lease.close()
    if lease.lease is not None and lease.lease.pauses:
        job.log(f"paused {lease.lease.pauses}x for interactive requests, {lease.lease.paused_s:.1f} s in all")
    return _finish(run, job, reporter, time.perf_counter() - t)


class AtomicPath(type(Path())):  # type: ignore[misc]
    """A Path whose write_bytes is atomic: Ultralytics writes last.pt/best.pt with `path.write_bytes(...)`."""

    def write_bytes(self, data: bytes) -> int:  # type: ignore[override]
        atomic_write_bytes(Path(self), data)
        return len(data)


def atomic_checkpoints(trainer: Any) -> None:
    """on_train_start: every epoch's last.pt / best.pt goes through a temp file + fsync + rename."""
    trainer.last, trainer.best = AtomicPath(trainer.last), AtomicPath(trainer.best)


def install_atomic_strip() -> None:
    """Ultralytics' final strip_optimizer rewrites last.pt/best.pt with torch.save in place; wrap it (once) so it
    writes a temp file beside the target and renames it over, like every other checkpoint the studio lists."""
    import ultralytics.engine.trainer as trainer_module

    original = trainer_module.strip_optimizer
    if getattr(original, "studio_atomic", False):
        return

    def strip_optimizer(f: Any = "best.pt", s: str = "", updates: dict | None = None) -> Any:
        target = Path(s or f)
        with atomic_path(target) as tmp:
            result = original(f, str(tmp), updates=updates)
        log.info("checkpoint %s written atomically (%d bytes)", target, target.stat().st_size)
        return result

    strip_optimizer.studio_atomic = True  # type: ignore[attr-defined]
    trainer_module.strip_optimizer = strip_optimizer


def _finish(run: Any, job: Any, reporter: _Reporter, seconds: float) -> TrainResult:
    weights = run.dir / "ultralytics" / "weights"
    best, last = weights / "best.pt", weights / "last.pt"
    for p in (best, last):
        if p.is_file():
            run.add_artifact(p, name=p.name)
    maps = [r["map50"] for r in reporter.rows if not math.isnan(r["map50"])]
    status = "cancelled" if job.should_stop() else "done"
    best_map = reporter.best_eval["map50"] if reporter.best_eval else (max(maps) if maps else None)
    result = TrainResult(
        run.id,
        status,
        len(reporter.rows),
        best_map,
        maps[-1] if maps else None,
        best if best.is_file() else None,
        last if last.is_file() else None,
    )
    run.finish(
        status,
        epochs_done=result.epochs_done,
        best_map50=result.best_map50,
        final_map50=result.final_map50,
        best_map50_95=(reporter.best_eval or {}).get("map50_95"),
        seconds=round(seconds, 1),
    )
    shown = "n/a" if result.best_map50 is None else f"{result.best_map50:.3f}"
    job.set_progress(1.0 if status == "done" else job.progress, f"{status}: {result.epochs_done} epochs, mAP50 {shown}")
    return result


def start_training(backend: Any, dataset: Path, opts: TrainOptions) -> Any:
    """Validate now (errors raise at once), then queue the training as a GPU job; returns the Job."""
    report = prepare_dataset(backend.ctx, dataset)
    report.raise_if_invalid()
    base = backend.get_model(opts.base)
    name = f"YOLO training: {base.id} on {report.root.name} ({opts.epochs} epochs)"
    unique = f"yolo:{report.dataset_hash}:{opts!r}"  # the same training twice (a double click) makes one run
    return backend.ctx.jobs.submit(
        name, lambda job: train_detector(backend, job, report, base, opts), gpu=True, unique=unique
    )


def evaluate(backend: Any, entry: DetectorModel, report: DatasetReport, *, imgsz: int, batch: int = 16) -> dict:
    """mAP of `entry` on the dataset's val split. An untrained yaml model gets the dataset's class count."""
    prepare_ultralytics(backend.ctx.settings)
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    data_yaml = write_training_yaml(report, backend.ctx.settings.cache_dir / "detection-eval" / "data.yaml")
    if entry.path is not None:
        model = YOLO(str(entry.path), task="detect")
        if len(model.names) != len(report.names):
            raise DetectionError(f"{entry.title} has {len(model.names)} classes; the dataset has {len(report.names)}")
    else:
        model = YOLO(entry.yaml, task="detect")
        model.model = DetectionModel(entry.yaml, nc=len(report.names), verbose=False)
    model.model.names = dict(enumerate(report.names))
    m = model.val(
        data=str(data_yaml),
        imgsz=imgsz,
        batch=batch,
        device="cpu",
        plots=False,
        verbose=False,
        workers=0,
        project=str(backend.ctx.settings.cache_dir / "ultralytics-runs"),
        exist_ok=True,
    )
    return {"map50": float(m.box.map50), "map50_95": float(m.box.map)}
