"""What the user asks the image generator for, checked before any model is touched (diffusers' "raise concise
errors rather than silently correct input"), and what comes back."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.safety import MAX_IMAGE_PIXELS

# UI name -> (diffusers scheduler class, extra config). "Default" keeps the model's own scheduler.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Default": ("", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "PNDM": ("PNDMScheduler", {}),
}
MAX_SIDE = 2048
MAX_BATCH = 8
MAX_STEPS = 150


class RequestError(ValueError):
    """A bad request value; the message names it and says how to fix it."""


class GenerationCancelled(RuntimeError):
    """The user stopped the generation; nothing was saved."""


@dataclass(frozen=True)
class LoraChoice:
    path: str
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not str(self.path).strip():
            raise RequestError("A LoRA entry has no file: choose a .safetensors LoRA or remove the entry.")
        if not -4.0 <= float(self.scale) <= 4.0:
            raise RequestError(f"LoRA scale {self.scale} is out of range: use a value between -4 and 4 (1 = full).")


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    negative_prompt: str = ""
    model: str = "tiny-sd-demo"
    width: int = 512
    height: int = 512
    steps: int = 25
    guidance: float = 7.0
    seed: int | None = None  # None or negative: a random seed, recorded in the PNG
    batch: int = 1
    scheduler: str = "Euler a"
    init_image: Any = None  # path or PIL image: img2img, or inpainting together with mask_image
    mask_image: Any = None  # white = repaint, black = keep
    strength: float = 0.75  # img2img/inpaint: how much of the init image is re-noised (1 = all)
    loras: tuple[LoraChoice, ...] = ()

    def __post_init__(self) -> None:
        prompt = self.prompt.replace("\x00", "") if isinstance(self.prompt, str) else ""
        if not prompt.strip():
            raise RequestError("The prompt is empty: describe the image you want (e.g. 'a lighthouse at dusk').")
        object.__setattr__(self, "prompt", prompt.strip())
        object.__setattr__(self, "negative_prompt", (self.negative_prompt or "").replace("\x00", "").strip())
        for name in ("width", "height"):
            value = getattr(self, name)
            if not isinstance(value, int) or value % 8 or not 64 <= value <= MAX_SIDE:
                raise RequestError(
                    f"{name} {value} is not usable: it must be a multiple of 8 between 64 and {MAX_SIDE} "
                    f"(e.g. {max(64, min(MAX_SIDE, int(value or 0) // 8 * 8))})."
                )
        if not 1 <= int(self.steps) <= MAX_STEPS:
            raise RequestError(f"steps {self.steps} is out of range: use 1 to {MAX_STEPS} (20-30 is typical).")
        if not 0.0 <= float(self.guidance) <= 30.0:
            raise RequestError(f"guidance {self.guidance} is out of range: use 0 to 30 (5-8 is typical).")
        if not 1 <= int(self.batch) <= MAX_BATCH:
            raise RequestError(f"batch {self.batch} is out of range: make 1 to {MAX_BATCH} images at a time.")
        if self.scheduler not in SCHEDULERS:
            raise RequestError(f"Unknown scheduler {self.scheduler!r}; choose one of: {', '.join(SCHEDULERS)}.")
        if self.mask_image is not None and self.init_image is None:
            raise RequestError("A mask was given without an init image: inpainting needs both.")
        if self.init_image is not None and not 0.0 < float(self.strength) <= 1.0:
            raise RequestError(f"strength {self.strength} is out of range: use a value in (0, 1].")
        if self.seed is not None and self.seed >= 2**63:
            raise RequestError(f"seed {self.seed} is too large: use 0 to 2^63-1, or -1 for a random seed.")

    @property
    def mode(self) -> str:
        if self.init_image is None:
            return "txt2img"
        return "inpaint" if self.mask_image is not None else "img2img"

    @property
    def cfg(self) -> bool:
        return float(self.guidance) > 1.0


@dataclass(frozen=True)
class GeneratedImage:
    image: Any  # PIL.Image
    path: Path
    seed: int


@dataclass(frozen=True)
class GenerationResult:
    images: tuple[GeneratedImage, ...]
    model: str
    model_title: str
    demo: bool  # True: the untrained demo model made these (noise-like pictures)
    mode: str
    memory: str  # the memory mode used, for the UI
    seconds: float
    steps_per_second: float

    @property
    def label(self) -> str:
        what = "untrained demo model" if self.demo else self.model_title
        return f"{what} · {self.mode} · {self.steps_per_second:.1f} it/s · {self.memory}"


def load_image(value: Any, what: str, size: tuple[int, int], mode: str = "RGB") -> Any:
    """A path or PIL image -> a PIL image of `size`; unreadable files raise RequestError naming `what`."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, Image.Image):
        image = value
    else:
        try:
            with Image.open(Path(value)) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:  # PIL only warns up to twice this
                    raise RequestError(
                        f"The {what} ({Path(str(value)).name}) is {im.width}x{im.height}: over "
                        f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels are refused; resize it."
                    )
                im.load()  # decode now: a truncated file fails here, not halfway through generation
                image = im.copy()
        except RequestError:
            raise
        except Image.DecompressionBombError:
            raise RequestError(f"The {what} is too large to open safely (decompression bomb?).") from None
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
            raise RequestError(
                f"The {what} ({Path(str(value)).name}) is not a readable image (corrupt, truncated or not an "
                "image): upload a PNG or JPEG."
            ) from None
    image = image.convert(mode)
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image
