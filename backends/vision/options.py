"""Training settings of the vision trainers: the options record, augmentation presets mapped to Ultralytics'
hyperparameters, what each setting does (shown in the tab), and batch/image-size suggestions from the live budget.

Memory model for the suggestions (an estimate, not a measurement): training memory per image grows with the
square of the image size and with the model's width; mixed precision keeps activations in fp16 (about 0.6x).
The per-image figures are Ultralytics AutoBatch-style probes rounded up; the GPU benchmark
(`studio.bench.vision_train`) records the real peak of YOLOv8s at 640 px, batch 16, with and without AMP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from backends.vision.types import DetectionError, DetectorModel

if TYPE_CHECKING:
    from studio.services import Services

GB = 2**30
# fmt: off
_OFF = {"hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0, "degrees": 0.0, "translate": 0.0, "scale": 0.0, "shear": 0.0,
        "fliplr": 0.0, "flipud": 0.0, "mosaic": 0.0, "mixup": 0.0, "copy_paste": 0.0, "erasing": 0.0,
        "auto_augment": None}
AUGMENT_PRESETS: dict[str, dict[str, Any]] = {
    "none": dict(_OFF),
    "light": _OFF | {"hsv_h": 0.01, "hsv_s": 0.3, "hsv_v": 0.2, "translate": 0.05, "scale": 0.2, "fliplr": 0.5,
                     "mosaic": 0.5, "erasing": 0.1},
    "default": _OFF | {"hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4, "translate": 0.1, "scale": 0.5, "fliplr": 0.5,
                       "mosaic": 1.0, "erasing": 0.4, "auto_augment": "randaugment"},  # Ultralytics' own defaults
    "heavy": _OFF | {"hsv_h": 0.02, "hsv_s": 0.8, "hsv_v": 0.5, "degrees": 10.0, "translate": 0.2, "scale": 0.7,
                     "shear": 2.0, "fliplr": 0.5, "flipud": 0.05, "mosaic": 1.0, "mixup": 0.15, "copy_paste": 0.1,
                     "erasing": 0.5, "auto_augment": "randaugment"},
}
# fmt: on

HELP = {
    "augment": "Augmentation: random changes to the training images so the model does not memorise them. "
    "**none** = the images as they are (to check that a model can fit the data at all); **light** = small colour, "
    "shift and scale changes, mosaic half the time (small or very uniform datasets); **default** = Ultralytics' "
    "defaults (colour, flips, ±10 % shift, ±50 % scale, 4-image mosaic); **heavy** = adds rotation ±10°, shear, "
    "MixUp 15 % and copy-paste (large, varied datasets that overfit on default).",
    "amp": "Mixed precision (AMP): trains in float16 where it is safe; about 1.5-2x faster and ~40 % less memory "
    "on a modern GPU, same accuracy. Only used on CUDA; turn it off if losses become NaN.",
    "patience": "Early stopping: stop when validation mAP has not improved for this many epochs (0 = never stop "
    "early). best.pt is the epoch with the best mAP, whatever happened after it.",
    "imgsz": "Image size: images are resized to this square (multiple of 32). Larger finds small objects better; "
    "memory and time grow with its square (640 -> 320 is 4x less).",
    "batch": "Batch: images per step. 0 = auto: the largest power of two that fits the GPU budget the studio has "
    "free when the training starts. Larger batches train faster per epoch; too large runs out of memory.",
    "freeze": "Frozen layers: the first N layers keep their pretrained weights (10 = the whole YOLOv8 backbone). "
    "With a few hundred images this trains faster and overfits less; 0 trains everything.",
    "resume": "Resume: continue a stopped or crashed training from its last checkpoint, with its own settings "
    "(epochs, augmentation, learning-rate schedule, optimizer state).",
    "epochs": "Epochs: passes over the training images. Early stopping usually ends the run sooner.",
}


@dataclass(frozen=True)
class TrainOptions:
    base: str = "yolov8s-person"  # start point: shipped weights (transfer learning) or "<arch>-untrained"
    epochs: int = 50
    imgsz: int = 640
    batch: int = 16  # 0 = auto from the free GPU budget at start
    patience: int = 20  # early stopping: epochs without a better mAP before stopping
    seed: int = 0
    amp: bool = True  # mixed precision; only used on CUDA
    augment: str = "default"  # a key of AUGMENT_PRESETS
    freeze: int = 0  # first N layers frozen (transfer learning on small datasets)
    close_mosaic: int = 10  # last epochs without mosaic
    warmup_epochs: float = 3.0
    workers: int = 2  # dataloader processes on CUDA; 0 (in-process) on CPU
    nominal_batch: int = 64  # Ultralytics' nbs: gradients are accumulated to this many images per optimizer step

    def __post_init__(self) -> None:
        if isinstance(self.augment, bool):  # older callers: True/False
            object.__setattr__(self, "augment", "default" if self.augment else "none")
        checks = [
            (1 <= self.epochs <= 10_000, f"epochs must be 1-10000, got {self.epochs}"),
            (32 <= self.imgsz <= 2048 and self.imgsz % 32 == 0, f"image size must be a multiple of 32, got {self.imgsz}"),
            (0 <= self.batch <= 512, f"batch must be 0 (auto) to 512, got {self.batch}"),
            (0 <= self.patience <= 10_000, f"patience must be >= 0, got {self.patience}"),
            (self.augment in AUGMENT_PRESETS, f"augmentation {self.augment!r}: choose {', '.join(AUGMENT_PRESETS)}"),
            (0 <= self.freeze <= 30, f"frozen layers must be 0-30 (YOLOv8's backbone is 10), got {self.freeze}"),
            (self.close_mosaic >= 0 and self.warmup_epochs >= 0, "close_mosaic and warmup_epochs must be >= 0"),
            (0 <= self.workers <= 32, f"workers must be 0-32, got {self.workers}"),
            (1 <= self.nominal_batch <= 1024, f"nominal batch must be 1-1024, got {self.nominal_batch}"),
        ]  # fmt: skip
        for ok, msg in checks:
            if not ok:
                raise DetectionError(msg)


def augment_kwargs(preset: str, task: str) -> dict[str, Any]:
    """Ultralytics hyperparameters of a preset; `auto_augment`/`erasing` only mean something for classify."""
    out = dict(AUGMENT_PRESETS[preset])
    if task != "classify":
        out.pop("auto_augment")
        out.pop("erasing")
    elif out["auto_augment"] is None:
        out["auto_augment"] = ""  # Ultralytics: an empty policy means none
    if task != "segment":
        out.pop("copy_paste")
    return out


# ---- suggestions -----------------------------------------------------------------------------------------
def gb_per_image(entry: DetectorModel, imgsz: int, amp: bool) -> float:
    """Estimated training memory per image (activations + gradients) in GB."""
    name = (entry.id + str(entry.yaml or "") + str(entry.path or "")).lower()
    width = 0.25 if any(t in name for t in ("v8n", "11n", "yolo11n")) else 0.7 if "v8m" in name else 0.4
    if entry.task == "segment":
        width *= 1.3  # the mask prototypes and their loss
    per = width * (imgsz / 640) ** 2
    if entry.task == "classify":
        per = width * 0.1 * (imgsz / 224) ** 2
    return per * (0.6 if amp else 1.0)


def vram_budget_bytes(ctx: Services) -> int | None:
    """What training may use on the GPU: the residency manager's live budget; None on a CPU-only machine."""
    if not str(ctx.residency.device).startswith("cuda"):
        return None
    return ctx.residency.capacity_bytes()


def auto_batch(budget: int, entry: DetectorModel, imgsz: int, amp: bool) -> int:
    """Largest power of two (2-64) whose estimated memory fits 80 % of `budget` after 1 GB for the model,
    optimizer state and CUDA context."""
    usable = 0.8 * budget - 1 * GB
    per = gb_per_image(entry, imgsz, amp) * GB
    return int(min(64, max(2, 2 ** int(math.log2(max(2.0, usable / per))))))


def suggest_settings(ctx: Services, n_images: int, entry: DetectorModel, amp: bool = False) -> dict[str, Any]:
    """Epochs, image size and batch that fit the VRAM budget (or keep a CPU run short), with the reason."""
    budget = vram_budget_bytes(ctx)
    epochs = 100 if n_images < 300 else 60 if n_images < 3000 else 30
    cls = entry.task == "classify"
    if budget is None:
        return {
            "epochs": min(epochs, 20),
            "imgsz": 128 if cls else 320,
            "batch": 16 if cls else 8,
            "reason": f"No GPU: {128 if cls else 320} px, small batches and at most 20 epochs keep a CPU run to "
            "minutes per epoch.",
        }
    imgsz = 224 if cls else 640
    batch = auto_batch(budget, entry, imgsz, amp)
    if batch < 8 and not cls:
        imgsz, batch = 480, auto_batch(budget, entry, 480, amp)
    per = gb_per_image(entry, imgsz, amp)
    return {
        "epochs": epochs,
        "imgsz": imgsz,
        "batch": batch,
        "reason": f"GPU budget {budget / GB:.1f} GB: about {per:.2f} GB per image at {imgsz} px"
        f"{' with mixed precision' if amp else ''} leaves room for batch {batch}; {epochs} epochs for "
        f"{n_images} images (early stopping on).",
    }
