"""Train a YOLO model (detect, segment or classify: the base model's task) on the user's dataset as a background
job, recorded as a run; resume a stopped or crashed one.

Flow: the dataset (zip or folder) is validated first (`data.validate_dataset`, `task_data.validate_cls_dataset`); a
clean data.yaml is written into the run folder (classification takes the class-folder root); the settings
(`options.TrainOptions`: augmentation preset, AMP, patience, freeze, batch 0 = auto from the free budget) become
Ultralytics arguments; Ultralytics trains with callbacks that report progress per batch, log loss and mAP per epoch
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

from backends.vision.checkpoints import (
    RESUME_NAME,
    atomic_checkpoints,
    install_atomic_strip,
    install_offline_amp_check,
    keep_resumable,
    resume_checkpoint,
)
from backends.vision.data import DatasetError, DatasetReport, ZipLimits, safe_extract_zip, validate_dataset
from backends.vision.data import write_training_yaml as _write_yaml
from backends.vision.options import TrainOptions, augment_kwargs, auto_batch, suggest_settings, vram_budget_bytes
from backends.vision.task_data import validate_cls_dataset
from backends.vision.types import RUN_KINDS, DetectionError, DetectorModel
from backends.vision.yolo import prepare_ultralytics

if TYPE_CHECKING:
    from studio.services import Services

log = logging.getLogger(__name__)
GB = 2**30
__all__ = ["TrainOptions", "evaluate", "start_resume", "start_training", "suggest_settings", "train_detector"]
METRIC_KEYS = {  # Ultralytics' metric names -> ours (detect, segment, classify)
    "metrics/precision(B)": "precision", "metrics/recall(B)": "recall", "metrics/mAP50(B)": "map50",
    "metrics/mAP50-95(B)": "map50_95", "metrics/mAP50(M)": "mask_map50", "metrics/mAP50-95(M)": "mask_map50_95",
    "metrics/accuracy_top1": "top1", "metrics/accuracy_top5": "top5",
}  # fmt: skip


@dataclass
class TrainResult:
    run_id: str
    status: str  # "done" | "cancelled"
    epochs_done: int
    best_map50: float | None  # box mAP50 (detect, segment); None for classify
    final_map50: float | None
    best_weights: Path | None
    last_weights: Path | None
    best_top1: float | None = None  # classify


# ---- dataset ---------------------------------------------------------------------------------------------
def unpack(ctx: Services, source: Path) -> Path:
    """A folder as it is; a .zip extracted safely into the cache (once per content hash)."""
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
    return source


def prepare_dataset(ctx: Services, source: Path, task: str = "detect") -> DatasetReport:
    """Unzip (safely) if needed, then validate for `task`; the report carries every problem found."""
    source = unpack(ctx, source)
    if task == "classify":
        return validate_cls_dataset(source)
    report = validate_dataset(source)
    if task == "segment" and report.ok and not any(s.polygons for s in report.splits.values()):
        report.error("segmentation needs polygon labels ('class x1 y1 x2 y2 x3 y3 ...'); this dataset has boxes only")
    return report


def write_training_yaml(report: DatasetReport, dest: Path) -> Path:
    return _write_yaml(report, dest)


def _data_arg(report: DatasetReport, task: str, run_dir: Path) -> str:
    """Ultralytics' `data`: a clean data.yaml we write (detect, segment) or the class-folder root (classify)."""
    if task == "classify":
        report.raise_if_invalid()
        return str(report.root.resolve())
    return str(write_training_yaml(report, run_dir / "data.yaml"))


# ---- training --------------------------------------------------------------------------------------------
def _train_kwargs(opts: TrainOptions, device: str, task: str, batch: int) -> dict[str, Any]:
    cuda = device.startswith("cuda")
    return {
        "epochs": opts.epochs,
        "imgsz": opts.imgsz,
        "batch": batch,
        "patience": opts.patience,
        "seed": opts.seed,
        "deterministic": False,  # True flips torch's global deterministic mode for the whole studio process
        "device": 0 if cuda else "cpu",
        "amp": opts.amp and cuda,
        "workers": opts.workers if cuda else 0,
        "close_mosaic": opts.close_mosaic,
        "warmup_epochs": opts.warmup_epochs,
        "freeze": opts.freeze or None,
        "nbs": opts.nominal_batch,
        "plots": False,
        "verbose": False,
        "val": True,
        "exist_ok": True,
        **augment_kwargs(opts.augment, task),
    }


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
            self.job.log("stop requested: finishing this epoch's validation and saving last.pt (and resume.pt)")

    def fit_epoch_end(self, trainer: Any) -> None:
        losses = trainer.label_loss_items(trainer.tloss, prefix="train") if trainer.tloss is not None else {}
        row = {k.split("/", 1)[1]: float(v) for k, v in losses.items()}
        m = trainer.metrics or {}
        row |= {ours: float(m[theirs]) for theirs, ours in METRIC_KEYS.items() if theirs in m}
        if "val/box_loss" in m:
            row["val_box_loss"] = float(m["val/box_loss"])
        if trainer.epoch + 1 > self.epoch_in_progress:  # final_eval() reports best.pt at step epochs + 1
            self.best_eval = {k: v for k, v in row.items() if k in METRIC_KEYS.values()}
            self.job.log("best.pt on the val split: " + _metrics_text(self.best_eval))
            return
        self.rows.append(row)
        self.run.log_metrics(trainer.epoch + 1, **row)
        loss = " ".join(f"{k} {v:.3f}" for k, v in row.items() if k.endswith("loss") and not k.startswith("val"))
        self.job.log(f"epoch {trainer.epoch + 1}/{trainer.epochs}: {loss}; {_metrics_text(row)}")


def _metrics_text(row: dict[str, float]) -> str:
    return " ".join(f"{k} {row[k]:.3f}" for k in ("map50", "map50_95", "mask_map50", "top1", "top5") if k in row)


class _LeaseCallbacks:
    """Ultralytics callbacks -> one preemptible training lease: opened once the trainer has its model, EMA and
    optimizer (on_pretrain_routine_end), a step boundary per batch (on_train_batch_end), closed at the end."""

    def __init__(self, residency: Any, key: str, label: str = "YOLO training") -> None:
        self.residency, self.key, self.label = residency, key, label
        self.lease: Any = None
        self.closed = False

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
        if self.lease is not None and not self.closed:  # on_train_end, then train_detector's finally
            self.closed = True
            self.lease.__exit__(None, None, None)


def _pick_batch(ctx: Services, opts: TrainOptions, base: DetectorModel, device: str, job: Any) -> int:
    if opts.batch:
        return opts.batch
    budget = vram_budget_bytes(ctx) if device.startswith("cuda") else None
    batch = auto_batch(budget, base, opts.imgsz, opts.amp) if budget else 8
    job.log(f"auto batch: {batch} (" + (f"{budget / GB:.1f} GB free for training)" if budget else "no GPU)"))
    return batch


def train_detector(
    backend: Any,
    job: Any,
    report: DatasetReport,
    base: DetectorModel,
    opts: TrainOptions,
    resume: Path | None = None,
    callbacks: dict[str, Any] | None = None,
) -> TrainResult:
    """The job body: train (or resume from a checkpoint), record, return paths and metrics. Raises on failure
    (the run is marked failed). Despite the name it trains every task: the base model's task decides.
    `callbacks` ({Ultralytics event: fn}) are added after ours (the benchmark times batches with them)."""
    ctx, task = backend.ctx, base.task
    prepare_ultralytics(ctx.settings)
    from ultralytics import YOLO

    config = {"base": base.id, "task": task, "dataset": str(report.root), "names": report.names, **asdict(opts)}
    run = ctx.runs.create(RUN_KINDS[task], config | ({"resumed_from": str(resume)} if resume else {}),
                          seed=opts.seed, dataset_hash=report.dataset_hash)  # fmt: skip
    backend.job_runs[job.id] = run.id
    job.log(f"run {run.id}: {sum(s.images for s in report.splits.values())} images, classes {report.names}")
    data = _data_arg(report, task, run.dir)
    device = str(ctx.residency.device)
    if device.startswith("cuda"):
        ctx.residency.offload(tiers=("gpu",))  # the trainer builds its model before its lease can make room
    start = resume or base.path
    model = YOLO(str(start), task=task) if start else YOLO(base.yaml, task=task)
    reporter = _Reporter(job, run, opts.epochs)
    for event, fn in (("on_train_epoch_start", reporter.epoch_start), ("on_train_batch_end", reporter.batch_end),
                      ("on_fit_epoch_end", reporter.fit_epoch_end), ("on_train_start", atomic_checkpoints),
                      ("on_model_save", keep_resumable(job.should_stop))):  # fmt: skip
        model.add_callback(event, fn)
    for event, fn in (callbacks or {}).items():
        model.add_callback(event, fn)
    install_atomic_strip()
    install_offline_amp_check()
    lease = _LeaseCallbacks(ctx.residency, f"train:yolo:{run.id}")
    lease.attach(model)
    kwargs = _train_kwargs(opts, device, task, _pick_batch(ctx, opts, base, device, job))
    if resume is not None:
        kwargs["resume"] = str(resume)
    t = time.perf_counter()
    try:
        model.train(data=data, project=str(run.dir), name="ultralytics", save_dir=str(run.dir / "ultralytics"),
                    **kwargs)  # fmt: skip
    except BaseException as e:
        run.finish("failed", error=f"{type(e).__name__}: {e}", epochs_done=len(reporter.rows))
        raise
    finally:
        lease.close()
    paused = lease.lease
    if paused is not None and paused.pauses:
        job.log(f"paused {paused.pauses}x for interactive requests, {paused.paused_s:.1f} s in all")
    result = _finish(run, job, reporter, time.perf_counter() - t)
    if resume is not None and result.status == "done" and resume.name == RESUME_NAME:
        resume.rename(resume.with_name(RESUME_NAME + ".used"))  # resumed to the end: no longer offered
    return result


def _finish(run: Any, job: Any, reporter: _Reporter, seconds: float) -> TrainResult:
    weights = run.dir / "ultralytics" / "weights"
    best, last = weights / "best.pt", weights / "last.pt"
    for p in (best, last):
        if p.is_file():
            run.add_artifact(p, name=p.name)
    maps = [r["map50"] for r in reporter.rows if not math.isnan(r.get("map50", math.nan))]
    tops = [r["top1"] for r in reporter.rows if "top1" in r]
    best_eval = reporter.best_eval or {}
    status = "cancelled" if job.should_stop() else "done"
    result = TrainResult(
        run.id,
        status,
        len(reporter.rows),
        best_eval.get("map50", max(maps) if maps else None),
        maps[-1] if maps else None,
        best if best.is_file() else None,
        last if last.is_file() else None,
        best_eval.get("top1", max(tops) if tops else None),
    )
    run.finish(
        status,
        epochs_done=result.epochs_done,
        best_map50=result.best_map50,
        final_map50=result.final_map50,
        best_map50_95=best_eval.get("map50_95"),
        best_mask_map50=best_eval.get("mask_map50"),
        best_top1=result.best_top1,
        seconds=round(seconds, 1),
    )
    shown = _metrics_text(best_eval) or ("n/a" if result.best_map50 is None else f"map50 {result.best_map50:.3f}")
    job.set_progress(1.0 if status == "done" else job.progress, f"{status}: {result.epochs_done} epochs, {shown}")
    return result


def start_training(backend: Any, dataset: Path, opts: TrainOptions) -> Any:
    """Validate now (errors raise at once), then queue the training as a GPU job; returns the Job."""
    base = backend.get_model(opts.base)
    report = prepare_dataset(backend.ctx, dataset, base.task)
    report.raise_if_invalid()
    name = f"YOLO {base.task} training: {base.id} on {report.root.name} ({opts.epochs} epochs)"
    unique = f"yolo:{report.dataset_hash}:{opts!r}"  # the same training twice (a double click) makes one run
    return backend.ctx.jobs.submit(
        name, lambda job: train_detector(backend, job, report, base, opts), gpu=True, unique=unique
    )


def start_resume(backend: Any, run_id: str) -> Any:
    """Queue the continuation of a stopped or crashed run from its checkpoint, with the run's own settings."""
    try:
        run = backend.ctx.runs.get(run_id)
    except (KeyError, FileNotFoundError, ValueError):
        raise DetectionError(f"Unknown run {run_id!r}; pick one from the list.") from None
    if run.kind not in RUN_KINDS.values():
        raise DetectionError(f"run {run_id} is a '{run.kind}' run, not a YOLO training")
    if run.status == "running":
        raise DetectionError(f"run {run_id} is still running; stop it first or wait for it")
    if run.status == "done":
        raise DetectionError(f"run {run_id} finished all its epochs; start a new training from its best.pt instead")
    ckpt = resume_checkpoint(run.dir / "ultralytics" / "weights", run.status)
    if ckpt is None:
        raise DetectionError(f"run {run_id} left no resumable checkpoint (it stopped before its first epoch ended, "
                             "or was resumed already)")  # fmt: skip
    keys = set(TrainOptions.__dataclass_fields__)
    opts = TrainOptions(**{k: v for k, v in run.config.items() if k in keys})
    base = backend.get_model(opts.base)
    report = prepare_dataset(backend.ctx, Path(run.config["dataset"]), base.task)
    report.raise_if_invalid()
    name = f"YOLO {base.task} training: resume {run_id} from {ckpt.name}"
    return backend.ctx.jobs.submit(
        name, lambda job: train_detector(backend, job, report, base, opts, resume=ckpt), gpu=True,
        unique=f"yolo-resume:{run_id}",
    )  # fmt: skip


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
