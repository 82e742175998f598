"""LoRA training for Stable Diffusion 1.5 / SDXL (DreamBooth-style), as a background job, to one .safetensors file.

Recipe (diffusers' train_dreambooth_lora, trimmed to what one 12 GB card needs):
- PEFT `LoraConfig` on the UNet attention projections (to_q, to_k, to_v, to_out.0), rank 4-16, alpha = rank;
- captions come from `<image>.txt` files beside the images, else the one instance prompt;
- the text encoders and the VAE run once up front (captions -> embeddings, images -> latent distributions), so
  during training only the UNet is on the GPU, with gradient checkpointing;
- mixed precision: the frozen UNet stays in the model's fp16/bf16, LoRA weights train in fp32 under autocast
  (fp16 with a gradient scaler); 8-bit AdamW when bitsandbytes runs on CUDA, plain AdamW otherwise;
- optional prior preservation: class images (given, or generated once with the base model and cached) are trained
  with the class prompt beside the instance images, `prior_loss_weight` times the loss.
The UNet is the generation UNet leased from the residency manager (no second copy on the GPU): the training adapter
is added for the job and deleted afterwards; meanwhile generation with this model is refused as busy.

Cancel (job.should_stop) saves what has been learnt so far; a NaN loss stops the job and keeps the last checkpoint.
The output uses kohya-ss key names (see backends/image/lora.py) and loads with diffusers' `load_lora_weights`.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends.image.lora import peft_to_kohya
from studio.safety import safe_filename, save_safetensors

log = logging.getLogger(__name__)

TRAIN_ADAPTER = "onecard_train"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
RECOMMENDED_MIN_IMAGES, MAX_IMAGES = 20, 150
LORA_SUBDIR = "loras"
BASE_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}


class TrainingDataError(ValueError):
    """The training images or captions cannot be used; the message says which files and what to do."""


@dataclass(frozen=True)
class LoraTrainConfig:
    dataset: tuple[str, ...]  # image files, .txt caption files and/or folders holding them
    model: str = "tiny-sd-demo"
    output_name: str = "my-lora"
    instance_prompt: str = ""  # caption for images without a .txt file, e.g. "a photo of sks dog"
    rank: int = 8
    steps: int = 500
    learning_rate: float = 1e-4
    batch_size: int = 1
    resolution: int = 512
    prior_preservation: bool = False
    class_prompt: str = ""  # e.g. "a photo of a dog"
    class_images: tuple[str, ...] = ()
    num_class_images: int = 50
    class_steps: int = 25  # steps used to generate missing class images
    prior_loss_weight: float = 1.0
    sample_every: int = 0  # 0 = no samples
    sample_prompt: str = ""
    gradient_checkpointing: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.dataset:
            raise TrainingDataError("No training images given: add 20-150 images (and optional .txt captions).")
        if not 4 <= self.rank <= 16:
            raise ValueError(f"rank {self.rank} is out of range: use 4 to 16 (8 is a good start).")
        if not 1 <= self.steps <= 20_000:
            raise ValueError(f"steps {self.steps} is out of range: use 1 to 20000 (about 100 per image).")
        if not 0 < self.learning_rate <= 1e-2:
            raise ValueError(f"learning rate {self.learning_rate} is out of range: use (0, 0.01]; 1e-4 is typical.")
        if not 1 <= self.batch_size <= 16:
            raise ValueError(f"batch size {self.batch_size} is out of range: use 1 to 16.")
        if self.resolution % 8 or not 64 <= self.resolution <= 1536:
            raise ValueError(f"resolution {self.resolution}: use a multiple of 8 between 64 and 1536.")
        if self.prior_preservation and not self.class_prompt.strip():
            raise ValueError("Prior preservation needs a class prompt (e.g. 'a photo of a dog').")
        if self.sample_every < 0:
            raise ValueError("sample_every must be 0 (off) or a number of steps.")
        safe_filename(self.output_name)  # never fails; the real check is contained_path at save time


@dataclass(frozen=True)
class TrainItem:
    image: Path
    caption: str


@dataclass
class LoraTrainResult:
    path: Path | None
    steps_done: int
    final_loss: float | None
    run_id: str
    status: str  # "done" | "cancelled" | "stopped: NaN loss"
    samples: list[Path] = field(default_factory=list)


def collect_items(paths: tuple[str, ...], default_caption: str, what: str = "training") -> list[TrainItem]:
    """Images with their captions (`x.png` + `x.txt`), in a stable order; refuses images with no caption."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise TrainingDataError(f"{what} file not found: {p}")
    captions = {f.stem: f for f in files if f.suffix.lower() == ".txt"}
    images = sorted({f for f in files if f.suffix.lower() in IMAGE_SUFFIXES}, key=lambda f: f.name)
    if not images:
        raise TrainingDataError(f"No {what} images found (PNG, JPEG, WebP or BMP).")
    if len(images) > MAX_IMAGES:
        raise TrainingDataError(f"{len(images)} {what} images: use at most {MAX_IMAGES} (20-150 works well).")
    items, missing = [], []
    for img in images:
        txt = captions.get(img.stem) or img.with_suffix(".txt")
        caption = _read_caption(txt) if txt.is_file() else ""
        caption = caption or default_caption.strip()
        if not caption:
            missing.append(img.name)
        items.append(TrainItem(img, caption))
    if missing:
        raise TrainingDataError(
            f"No caption for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}: add a .txt file with "
            "the same name, or give one instance prompt for all images."
        )
    return items


def _read_caption(path: Path) -> str:
    data = path.read_bytes()
    for enc in ("utf-8", "utf-16", "latin-1"):
        try:
            return data.decode(enc).replace("\x00", "").strip()
        except UnicodeDecodeError:
            continue
    return ""


def dataset_hash(items: list[TrainItem]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(it.image.name.encode() + b"\0" + it.caption.encode() + b"\0" + it.image.read_bytes())
    return h.hexdigest()


def load_pixels(items: list[TrainItem], resolution: int, log_fn=log.warning) -> tuple[list[TrainItem], Any]:
    """Resize (shorter side) and centre-crop to a square; unreadable images are skipped with a log line."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    kept, arrays = [], []
    for it in items:
        try:
            with Image.open(it.image) as im:
                im.load()
                img = ImageOps.fit(ImageOps.exif_transpose(im).convert("RGB"), (resolution, resolution))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            log_fn(f"skipped {it.image.name}: not a readable image ({type(e).__name__})")
            continue
        kept.append(it)
        arrays.append(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
    if not kept:
        raise TrainingDataError("None of the training images could be read (corrupt or not images).")
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W) in [-1, 1]
    return kept, pixels


def lora_metadata(cfg: LoraTrainConfig, rec: Any, steps: int, n_images: int, run_id: str) -> dict[str, str]:
    """kohya-ss style metadata (read by A1111/ComfyUI model browsers) plus our own keys."""
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(cfg.rank),
        "ss_network_alpha": str(float(cfg.rank)),
        "ss_base_model_version": BASE_VERSION[rec.arch] if not rec.source.demo else f"onecard_{rec.source.id}",
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_steps": str(steps),
        "ss_learning_rate": str(cfg.learning_rate),
        "ss_num_train_images": str(n_images),
        "ss_output_name": cfg.output_name,
        "onecard_model": rec.source.id,
        "onecard_cross_attention_dim": str(rec.parts["unet_config"].get("cross_attention_dim")),
        "onecard_run_id": run_id,
    }


def save_lora(unet: Any, path: Path, alpha: float, metadata: dict[str, str]) -> Path:
    """The training adapter of `unet` -> one kohya-style .safetensors file, written atomically."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=TRAIN_ADAPTER)
    tensors = {k: v.detach().float().cpu() for k, v in peft_to_kohya(state, alpha).items()}
    bad = [k for k, v in tensors.items() if not bool(v.isfinite().all())]
    if bad:
        raise FloatingPointError(f"LoRA weights are not finite ({bad[0]}); not saved")
    save_safetensors(tensors, path, metadata=metadata)
    log.info("saved LoRA %s (%d tensors)", path, len(tensors))
    return path
