"""The jobs the planner sizes, one frozen dataclass each, validated on construction (bad values name the fix)."""

from __future__ import annotations

from dataclasses import dataclass

LLM_PRECISIONS = ("nf4", "int4", "16bit", "fp32")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


@dataclass(frozen=True)
class Chat:
    """Chat at `context` tokens (the KV cache's length; the prompt fills it less `new_tokens`), batch `batch`."""

    context: int = 4096
    batch: int = 1
    precision: str = "nf4"
    new_tokens: int = 64
    kind = "chat"

    def __post_init__(self) -> None:
        _check(128 <= self.context <= 262_144, f"context {self.context}: use 128 to 262,144 tokens")
        _check(1 <= self.batch <= 256, f"batch {self.batch}: use 1 to 256")
        _check(self.precision in LLM_PRECISIONS, f"precision {self.precision!r}: choose one of {LLM_PRECISIONS}")
        _check(1 <= self.new_tokens < self.context, f"new_tokens {self.new_tokens}: must be below the context")

    def label(self) -> str:
        return f"chat at {self.context:,} tokens, batch {self.batch}, {self.precision}"


@dataclass(frozen=True)
class LoraTrain:
    """LoRA (16-bit base) or QLoRA (nf4 base) at sequence `seq`, micro-batch `micro_batch`, rank `rank`."""

    seq: int = 2048
    micro_batch: int = 1
    rank: int = 16
    quant: str = "nf4"
    checkpointing: bool = True
    chunked_loss: bool = True
    kind = "lora"

    def __post_init__(self) -> None:
        _check(64 <= self.seq <= 131_072, f"sequence length {self.seq}: use 64 to 131,072 tokens")
        _check(1 <= self.micro_batch <= 64, f"micro-batch {self.micro_batch}: use 1 to 64")
        _check(1 <= self.rank <= 256, f"LoRA rank {self.rank}: use 1 to 256")
        _check(self.quant in ("nf4", "16bit"), f"base weights {self.quant!r}: nf4 (QLoRA) or 16bit (LoRA)")

    def label(self) -> str:
        what = "QLoRA" if self.quant == "nf4" else "LoRA"
        return f"{what} at {self.seq:,} tokens, micro-batch {self.micro_batch}, rank {self.rank}"


@dataclass(frozen=True)
class ImageGen:
    """An image request. `parked`/`tiled`: the image backend's memory modes (backends/image/memory.py), which it
    picks by itself from the live budget: text encoders waiting in pinned RAM while the UNet and VAE work, and the
    VAE decoding in tiles."""

    width: int = 1024
    height: int = 1024
    batch: int = 1
    parked: bool = False
    tiled: bool = False
    kind = "image"

    def __post_init__(self) -> None:
        for name, v in (("width", self.width), ("height", self.height)):
            _check(64 <= v <= 4096 and v % 8 == 0, f"{name} {v}: use a multiple of 8 from 64 to 4096")
        _check(1 <= self.batch <= 16, f"batch {self.batch}: use 1 to 16 images")

    def label(self) -> str:
        modes = [m for on, m in ((self.parked, "text encoders parked"), (self.tiled, "tiled VAE")) if on]
        return f"image {self.width}x{self.height}, batch {self.batch}" + (f" ({', '.join(modes)})" if modes else "")


@dataclass(frozen=True)
class ImageLora:
    resolution: int = 512
    batch: int = 1
    rank: int = 16
    kind = "image_lora"

    def __post_init__(self) -> None:
        _check(64 <= self.resolution <= 2048 and self.resolution % 8 == 0,
               f"resolution {self.resolution}: use a multiple of 8 from 64 to 2048")  # fmt: skip
        _check(1 <= self.batch <= 32, f"batch {self.batch}: use 1 to 32")
        _check(1 <= self.rank <= 256, f"LoRA rank {self.rank}: use 1 to 256")

    def label(self) -> str:
        return f"LoRA training at {self.resolution} px, batch {self.batch}, rank {self.rank}"


@dataclass(frozen=True)
class DetectTrain:
    imgsz: int = 640
    batch: int = 16
    kind = "yolo_train"

    def __post_init__(self) -> None:
        _check(32 <= self.imgsz <= 2048 and self.imgsz % 32 == 0, f"image size {self.imgsz}: a multiple of 32, 32-2048")
        _check(1 <= self.batch <= 512, f"batch {self.batch}: use 1 to 512")

    def label(self) -> str:
        return f"YOLO training at {self.imgsz} px, batch {self.batch}"


@dataclass(frozen=True)
class Transcribe:
    batch: int = 16
    beam: int = 1
    tokens: int = 100  # per 30 s window
    kind = "transcribe"

    def __post_init__(self) -> None:
        _check(1 <= self.batch <= 256, f"batch {self.batch}: use 1 to 256 windows")
        _check(1 <= self.beam <= 10, f"beam {self.beam}: use 1 to 10")
        _check(1 <= self.tokens <= 440, f"tokens per window {self.tokens}: use 1 to 440")

    def label(self) -> str:
        return f"transcription, batch {self.batch} x 30 s, beam {self.beam}"


Task = Chat | LoraTrain | ImageGen | ImageLora | DetectTrain | Transcribe
TASKS_FOR = {"llm": (Chat, LoraTrain), "sd15": (ImageGen, ImageLora), "sdxl": (ImageGen, ImageLora),
             "yolo": (DetectTrain,), "whisper": (Transcribe,)}  # fmt: skip
