"""Types shared inside backends/vlm (configs, results, errors, per-architecture facts); torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.safety import safe_filename

PRECISIONS = ("auto", "nf4", "16bit")
ROLES = ("system", "user", "assistant")


class VLMError(ValueError):
    """A user mistake or unusable input; the message names the bad value and the fix."""


@dataclass(frozen=True)
class Family:
    """What the studio knows about one transformers `model_type` of vision-language model."""

    skip_4bit: tuple[str, ...]  # full module names kept in 16-bit under nf4 (matched from the start)
    max_images: int  # per conversation kept in the prompt
    feature_cache: bool  # image features computed once per image and merged into the embeddings by us
    fast_decode: bool  # our static-cache + CUDA-graph decode step fits (1-D rotary positions)
    resolution: str  # what the user's image setting controls, in the UI's words
    projector: str = "model.multi_modal_projector"  # trained by QLoRA (module name)
    why_not_fast: str = ""


_SMOLVLM = Family(("model.vision_model", "model.connector", "lm_head"), 8, False, False, "max side (longest_edge)",
                  projector="model.connector",
                  why_not_fast="image splitting is not per-image separable for the feature cache")  # fmt: skip
_LLAVA_SKIP = ("model.vision_tower", "model.multi_modal_projector", "lm_head")
FAMILIES: dict[str, Family] = {
    "llava": Family(_LLAVA_SKIP, 4, True, True, "fixed by the vision tower (336 px, 576 tokens for LLaVA 1.5)"),
    "llava_next": Family(
        (*_LLAVA_SKIP, "model.image_newline"), 4, True, True, "max side: fewer 336 px tiles (up to 2,880 tokens)"
    ),
    "llava_onevision": Family(
        (*_LLAVA_SKIP, "model.image_newline"), 8, True, True, "max side: fewer 384 px tiles (up to 7,290 tokens)"
    ),
    "qwen2_5_vl": Family(
        ("model.visual", "lm_head"),
        16,
        False,
        False,
        "token budget (max_pixels = tokens x 28 x 28)",
        projector="model.visual.merger",
        why_not_fast="3-D multimodal rotary positions (M-RoPE)",
    ),
    "qwen3_vl": Family(
        ("model.visual", "lm_head"),
        16,
        False,
        False,
        "token budget (max_pixels = tokens x 32 x 32)",
        projector="model.visual.merger",
        why_not_fast="3-D multimodal rotary positions (M-RoPE)",
    ),
    "smolvlm": _SMOLVLM,
    "idefics3": _SMOLVLM,
}
UNKNOWN_FAMILY = Family(("lm_head",), 4, False, False, "max side only", projector="",
                        why_not_fast="an architecture the studio does not know")  # fmt: skip


def family_of(model_type: str) -> Family:
    return FAMILIES.get(model_type, UNKNOWN_FAMILY)


@dataclass(frozen=True)
class VLMConfig:
    model_id: str = "tiny-llava-demo"  # catalog id ("vlm" capability) or a folder name under models_dir
    precision: str = "auto"  # "auto": nf4 language model above ~3B params on CUDA (vision tower stays 16-bit)
    max_context_tokens: int = 4096  # bounds the KV cache; image tokens count against it
    fast_decode: bool = True  # static cache + CUDA graph on GPU where the architecture allows
    feature_cache: bool = True  # False: hand pixels to plain `generate` every turn (the baseline)
    max_images_per_message: int = 8

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}: choose one of {PRECISIONS}.")
        if not 256 <= self.max_context_tokens <= 131072:
            raise ValueError(f"max_context_tokens={self.max_context_tokens}: use 256 to 131072.")
        if not 1 <= self.max_images_per_message <= 64:
            raise ValueError(f"max_images_per_message={self.max_images_per_message}: use 1 to 64.")


@dataclass(frozen=True)
class ImageOptions:
    """The user's image setting: images are downscaled to `max_side` before the processor sees them; for
    dynamic-resolution models `max_tokens` (0 = the model's default) caps the visual tokens per image."""

    max_side: int = 1344
    max_tokens: int = 0

    def __post_init__(self) -> None:
        if not 28 <= self.max_side <= 4096:
            raise ValueError(f"max_side={self.max_side}: use 28 to 4096 pixels.")
        if not (self.max_tokens == 0 or 16 <= self.max_tokens <= 16384):
            raise ValueError(f"max_tokens={self.max_tokens}: use 0 (model default) or 16 to 16384.")


@dataclass
class VLMStats:
    prompt_tokens: int = 0
    image_tokens: int = 0
    images: int = 0
    images_encoded: int = 0  # vision-tower runs this turn (cache misses)
    new_tokens: int = 0
    ttft_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    total_s: float = 0.0
    finish_reason: str = ""
    decoder: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class VLMUpdate:
    text: str  # the whole reply so far
    delta: str = ""
    note: str = ""
    done: bool = False
    stats: VLMStats | None = None


@dataclass(frozen=True)
class PreparedImage:
    """An image checked, decoded and downscaled, with the hash its features are cached under."""

    image: Any  # PIL.Image in RGB
    digest: str
    name: str
    note: str = ""


@dataclass(frozen=True)
class VLMTrainConfig:
    dataset: Path
    output_name: str = "vlm-lora"
    steps: int = 200
    learning_rate: float = 2e-4
    projector_lr: float = 2e-5
    rank: int = 16
    alpha: int = 32
    max_length: int = 2048  # tokens per example, image tokens included
    dev_fraction: float = 0.1
    image_max_side: int = 1344
    seed: int = 0
    answer_tokens: int = 24

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= 100_000:
            raise VLMError(f"steps={self.steps}: use 1 to 100000.")
        if not (0 < self.learning_rate < 1 and 0 <= self.projector_lr < 1):
            raise VLMError(f"learning rates {self.learning_rate}/{self.projector_lr}: use values like 2e-4 / 2e-5.")
        if not 1 <= self.rank <= 256 or self.alpha < 1:
            raise VLMError(f"rank={self.rank}, alpha={self.alpha}: use rank 1 to 256 and alpha >= 1.")
        if not 64 <= self.max_length <= 32768:
            raise VLMError(f"max_length={self.max_length}: use 64 to 32768 tokens.")
        if not 0 <= self.dev_fraction <= 0.5:
            raise VLMError(f"dev_fraction={self.dev_fraction}: use 0 to 0.5.")
        if safe_filename(self.output_name, default="") != self.output_name:
            raise VLMError(f"output name {self.output_name!r}: use letters, digits, '-', '_' and '.' only.")
