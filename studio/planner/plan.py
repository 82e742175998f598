"""Estimate -> verdict -> advice: the planner as a function.

    est = plan(preset("llama-3.1-8b-instruct"), Chat(context=8192), budget=11 * 2**30)
    est.verdict     # "fits" | "fits with these settings" | "does not fit"
    est.advice      # the seed's advice, each re-estimated, ranked by the bytes it saves

Advice per task (the seed's rules of thumb): a shorter context or sequence, 4-bit weights, gradient checkpointing and
chunked loss, a smaller micro-batch or batch, a lower resolution or image size, VAE tiling, beam 1; for an LLM chat
that does not fit even at the shortest context, decoder layers streamed from pinned RAM (`offload_split`).
"Fits with these settings" names the cheapest single change that fits, and for lengths the longest that fits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from studio.planner.formulas import (
    decode_working_bytes,
    image_component_bytes,
    image_modes,
    layer_bytes,
    parts_for,
    unet_working_bytes,
    vae_dtype_bytes,
)
from studio.planner.models import ModelInfo
from studio.planner.tasks import Chat, DetectTrain, ImageGen, ImageLora, LoraTrain, Task, Transcribe
from studio.units import fmt_bytes

FITS, FITS_WITH, NO_FIT = "fits", "fits with these settings", "does not fit"
PCIE_PINNED_BPS = 25e9  # pinned host -> GPU on a PCIe 4.0 x16 consumer card (the H200 measured 55 GB/s)


@dataclass(frozen=True)
class Advice:
    change: str  # "1,024 tokens", "micro-batch 1", "4-bit (nf4) weights"
    task: Task
    total: int
    saves: int
    fits: bool | None


@dataclass(frozen=True)
class OffloadSplit:
    """Decoder layers kept on the GPU vs streamed from pinned RAM, and what streaming costs per token."""

    layers: int
    resident: int
    layer_bytes: int
    streamed_bytes: int  # per token
    gpu_bytes: int  # resident weights + working + the streaming buffers
    seconds_per_token_moving: float

    @property
    def streamed(self) -> int:
        return self.layers - self.resident


@dataclass(frozen=True)
class Estimate:
    model: ModelInfo
    task: Task
    parts: dict[str, int]
    budget: int | None = None
    correction: tuple[float, float, int] | None = None  # (weights factor, working factor, measurements) applied
    advice: tuple[Advice, ...] = ()
    offload: OffloadSplit | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.total <= self.budget

    @property
    def verdict(self) -> str:
        if self.budget is None or self.fits:
            return FITS
        return FITS_WITH if any(a.fits for a in self.advice) or self.offload is not None else NO_FIT

    def best(self) -> Advice | None:
        """The advice that fits and keeps the job closest to what was asked (the smallest saving that fits)."""
        fitting = [a for a in self.advice if a.fits]
        return min(fitting, key=lambda a: a.saves) if fitting else None

    def summary(self) -> str:
        head = f"{self.task.label()} on {self.model.name}: **{fmt_bytes(self.total)}**"
        if self.budget is not None:
            head += f" of {fmt_bytes(self.budget)} available: **{self.verdict}**"
        parts = ", ".join(f"{k.replace('_', ' ')} {fmt_bytes(v)}" for k, v in self.parts.items())
        return f"{head}. {parts}."


def estimate_parts(model: ModelInfo, task: Task, correction: tuple[float, float, int] | None = None) -> dict[str, int]:
    parts = parts_for(model, task)
    if correction:
        fw, fk, _ = correction
        parts = {k: int(v * (fw if k == "weights" else fk)) for k, v in parts.items()}
    return parts


def plan(model: ModelInfo, task: Task, budget: int | None = None, *,
         correction: Callable[[ModelInfo, Task], tuple[float, float, int] | None] | None = None) -> Estimate:  # fmt: skip
    """Size `task` on `model` against `budget` bytes (None: no verdict); `correction(model, task)` gives learned
    factors (weights, working, n measurements) from the footprint store."""
    if isinstance(task, ImageGen) and budget is not None:
        task = image_task_at(model, task, budget)
    corr = correction(model, task) if correction else None
    parts = estimate_parts(model, task, corr)
    total = sum(parts.values())
    advice: list[Advice] = []
    for change, alt in alternatives(model, task):
        alt_total = sum(estimate_parts(model, alt, corr).values())
        if alt_total < total:
            advice.append(
                Advice(change, alt, alt_total, total - alt_total, None if budget is None else alt_total <= budget)
            )
    advice.sort(key=lambda a: -a.saves)
    split = None
    if budget is not None and total > budget and task.kind == "chat" and not any(a.fits for a in advice):
        split = offload_split(model, task, budget, corr)
    return Estimate(model, task, parts, budget, corr, tuple(advice), split)


def image_task_at(model: ModelInfo, task: ImageGen, budget: int) -> ImageGen:
    """`task` in the memory mode the image backend would pick at `budget` (it parks the text encoders and tiles
    the decode by itself when the budget is short): what will actually sit on the card."""
    b = image_component_bytes(model)
    text = sum(v for k, v in b.items() if k.startswith("text_encoder"))
    unet_work = unet_working_bytes(task.width, task.height, task.batch, True, 2)
    decode = decode_working_bytes(task.width, task.height, 1, vae_dtype_bytes(model), False)
    parked, tiled, _ = image_modes(text, b.get("unet", 0), b.get("vae", 0), unet_work, decode, budget)
    return replace(task, parked=task.parked or parked, tiled=task.tiled or tiled)


def _halvings(value: int, floor: int, step: int = 1) -> Iterator[int]:
    v = value // 2
    while v >= floor:
        yield max(floor, v // step * step)
        v //= 2


def alternatives(model: ModelInfo, task: Task) -> list[tuple[str, Task]]:
    """(change, task with the change) for each of the seed's remedies that applies."""
    out: list[tuple[str, Task]] = []
    if isinstance(task, Chat):
        out += [(f"{n:,} tokens of context", replace(task, context=n, new_tokens=min(task.new_tokens, n // 2)))
                for n in _halvings(task.context, 512)]  # fmt: skip
        out += [("4-bit (nf4) weights", replace(task, precision="nf4"))] if task.precision in ("16bit", "fp32") else []
        out += [("batch 1", replace(task, batch=1))] if task.batch > 1 else []
    elif isinstance(task, LoraTrain):
        out += [(f"sequence {n:,} tokens", replace(task, seq=n)) for n in _halvings(task.seq, 256)]
        out += [("micro-batch 1", replace(task, micro_batch=1))] if task.micro_batch > 1 else []
        out += [("4-bit base weights (QLoRA)", replace(task, quant="nf4"))] if task.quant != "nf4" else []
        out += [("gradient checkpointing", replace(task, checkpointing=True))] if not task.checkpointing else []
        out += [("chunked loss", replace(task, chunked_loss=True))] if not task.chunked_loss else []
        out += [("rank 8", replace(task, rank=8))] if task.rank > 8 else []
    elif isinstance(task, ImageGen):
        if not task.tiled:  # with a budget `plan` has already applied the modes the backend picks by itself
            out.append(("tiled VAE decode", replace(task, parked=True, tiled=True)))
        for side in (768, 512):
            if side < max(task.width, task.height):
                out.append((f"{side}x{side} px", replace(task, width=side, height=side)))
        out += [("batch 1", replace(task, batch=1))] if task.batch > 1 else []
    elif isinstance(task, ImageLora):
        out += [(f"{n} px", replace(task, resolution=n)) for n in _halvings(task.resolution, 256, 64)]
        out += [("batch 1", replace(task, batch=1))] if task.batch > 1 else []
    elif isinstance(task, DetectTrain):
        out += [(f"batch {n}", replace(task, batch=n)) for n in _halvings(task.batch, 1)]
        out += [(f"{n} px", replace(task, imgsz=n)) for n in (480, 320) if n < task.imgsz]
    elif isinstance(task, Transcribe):
        out += [(f"batch {n}", replace(task, batch=n)) for n in _halvings(task.batch, 1)]
        out += [("beam 1 (greedy)", replace(task, beam=1))] if task.beam > 1 else []
    return out


def offload_split(model: ModelInfo, task: Chat, budget: int, correction: Any = None,
                  bandwidth: float = PCIE_PINNED_BPS) -> OffloadSplit | None:  # fmt: skip
    """How many decoder layers stay on the GPU when the rest stream from pinned RAM (two layer buffers for the
    streamed ones); None when even zero resident layers do not fit (the head, embeddings and working memory)."""
    parts = estimate_parts(model, task, correction)
    c = model.config
    per = layer_bytes(c, task.precision)
    if correction:
        per = int(per * correction[0])
    n = c["num_hidden_layers"]
    fixed = parts["weights"] - n * per  # embeddings, head, norms
    other = sum(v for k, v in parts.items() if k != "weights")
    room = budget - fixed - other - 2 * per
    if room < 0:
        return None
    resident = min(n, room // per)
    streamed = (n - resident) * per
    gpu = fixed + other + resident * per + (2 * per if resident < n else 0)
    return OffloadSplit(n, int(resident), per, streamed, gpu, streamed / bandwidth)


def oom_advice(est: Estimate) -> str:
    """One sentence with numbers for an out-of-memory message: what the job needs and the nearest setting that
    fits ("at 2,048 tokens this needs 10.8 GB; 1,024 tokens fits in 8.9 GB")."""
    line = f"Planner: {est.task.label()} needs about {fmt_bytes(est.total)}"
    if est.budget is not None:
        line += f" against a budget of {fmt_bytes(est.budget)}"
    best = est.best()
    if best is not None:
        return f"{line}; {best.change} fits in {fmt_bytes(best.total)}."
    if est.offload is not None:
        s = est.offload
        return (f"{line}; nothing shorter fits, but with {s.streamed} of {s.layers} layers streamed from pinned RAM "
                f"it needs {fmt_bytes(s.gpu_bytes)} on the GPU.")  # fmt: skip
    if est.advice:
        a = est.advice[0]
        return f"{line}; even {a.change} needs {fmt_bytes(a.total)}: free the GPU or use a smaller model."
    return line + "."
