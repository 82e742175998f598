"""Configs and results of the Fine-tune package (plain dataclasses, torch-free, shared by every module in it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion")
OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "adamw")
SCHEDULES = ("cosine", "linear", "constant")


class FinetuneError(ValueError):
    """A fine-tune cannot start or go on; the message names the bad value and the fix."""


class DataError(FinetuneError):
    """The dataset cannot be used; the message gives file:line of the first problems."""


@dataclass(frozen=True)
class DataOptions:
    """How a dataset file becomes training examples."""

    path: str
    dev_path: str = ""  # a separate dev file; empty = split off `dev_fraction` by hash
    format: str = "auto"
    dev_fraction: float = 0.1  # the split is by a hash of each example: the same every run, whatever the order
    max_length: int = 1024  # tokens per example (after the chat template)
    overlong: str = "cut"  # "cut" (truncate) or "drop" examples over max_length
    loss_on: str = "assistant"  # "assistant" turns only, or "all" tokens
    packing: bool = False  # concatenate examples into max_length blocks (attention spans example boundaries)
    skip_invalid: bool = False  # False: any malformed record refuses the dataset (with file:line); True: skip them

    def __post_init__(self) -> None:
        if not self.path:
            raise DataError("No dataset file given: upload a JSONL, JSON, CSV or Parquet file.")
        if self.format not in FORMATS:
            raise DataError(f"format {self.format!r} is unknown: use one of {', '.join(FORMATS)}.")
        if not 0.0 <= self.dev_fraction <= 0.5:
            raise DataError(f"dev fraction {self.dev_fraction} is out of range: use 0 to 0.5 (0.1 is typical).")
        if not 16 <= self.max_length <= 262_144:
            raise DataError(f"max length {self.max_length} is out of range: use 16 to 262144 tokens.")
        if self.overlong not in ("cut", "drop"):
            raise DataError(f"overlong {self.overlong!r}: use 'cut' or 'drop'.")
        if self.loss_on not in ("assistant", "all"):
            raise DataError(f"loss_on {self.loss_on!r}: use 'assistant' or 'all'.")


@dataclass(frozen=True)
class LoraOptions:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    targets: tuple[str, ...] = ALL_LINEAR
    rslora: bool = False
    dora: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.rank <= 256:
            raise FinetuneError(f"LoRA rank {self.rank} is out of range: use 1 to 256 (16 is typical).")
        if not 1 <= self.alpha <= 1024:
            raise FinetuneError(f"LoRA alpha {self.alpha} is out of range: use 1 to 1024 (2 x rank is typical).")
        if not 0.0 <= self.dropout < 1.0:
            raise FinetuneError(f"LoRA dropout {self.dropout} is out of range: use 0 to 0.5.")
        if not self.targets:
            raise FinetuneError("No LoRA target modules: pick at least one (q_proj, v_proj, ...).")


@dataclass(frozen=True)
class TrainOptions:
    max_steps: int = 200  # optimizer steps
    batch_size: int = 1
    grad_accum: int = 8
    learning_rate: float = 2e-4
    schedule: str = "cosine"
    warmup_steps: int = 10
    optimizer: str = "adamw_8bit"  # on CPU plain AdamW is used and the log says so
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # 0 = only before and after
    save_every: int = 50  # checkpoint every N optimizer steps (and at the end, on cancel)
    gradient_checkpointing: bool = True
    chunked_loss: bool = True  # never materialise full-vocabulary logits
    offload_activations: str = "auto"  # "auto" (CUDA and length >= 4096), "on", "off"
    embeddings_in_ram: bool = True  # CUDA: a frozen untied input-embedding table stays in RAM (lookup on the CPU)
    precision: str = "auto"  # "auto": nf4 base + bf16 (fp16 without bf16) on CUDA, fp32 on CPU

    def __post_init__(self) -> None:
        if not 1 <= self.max_steps <= 1_000_000:
            raise FinetuneError(f"steps {self.max_steps} is out of range: use 1 to 1000000.")
        if not 1 <= self.batch_size <= 256 or not 1 <= self.grad_accum <= 1024:
            raise FinetuneError(f"batch {self.batch_size} x accumulation {self.grad_accum}: use 1-256 and 1-1024.")
        if not 0 < self.learning_rate <= 1e-2:
            raise FinetuneError(f"learning rate {self.learning_rate} is out of range: use (0, 0.01]; 2e-4 is typical.")
        if self.schedule not in SCHEDULES:
            raise FinetuneError(f"schedule {self.schedule!r}: use one of {', '.join(SCHEDULES)}.")
        if self.optimizer not in OPTIMIZERS:
            raise FinetuneError(f"optimizer {self.optimizer!r}: use one of {', '.join(OPTIMIZERS)}.")
        if self.warmup_steps < 0 or self.save_every < 0 or self.eval_every < 0 or self.log_every < 1:
            raise FinetuneError("warmup, save and eval intervals must be >= 0 and log_every >= 1.")
        if self.offload_activations not in ("auto", "on", "off"):
            raise FinetuneError(f"offload_activations {self.offload_activations!r}: use auto, on or off.")
        if self.precision not in ("auto", "fp32"):
            raise FinetuneError(f"precision {self.precision!r}: use 'auto' or 'fp32'.")


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tune run: base model, data, LoRA and training options, and what to call the adapter."""

    model: str
    data: DataOptions
    lora: LoraOptions = field(default_factory=LoraOptions)
    train: TrainOptions = field(default_factory=TrainOptions)
    output_name: str = "my-adapter"
    eval_prompts: tuple[str, ...] = ()  # generations before/after; empty = the first dev prompts
    eval_max_new_tokens: int = 48
    resume_from: str = ""  # a run id (its checkpoint/ folder) to continue

    def __post_init__(self) -> None:
        if not self.model:
            raise FinetuneError("No base model chosen: pick one from the list.")
        if not self.output_name or len(self.output_name) > 80:
            raise FinetuneError(f"adapter name {self.output_name!r}: use 1-80 letters, digits, '-' or '_'.")
        if not 1 <= self.eval_max_new_tokens <= 1024:
            raise FinetuneError(f"eval tokens {self.eval_max_new_tokens}: use 1 to 1024.")


@dataclass(frozen=True)
class Problem:
    where: str  # "file.jsonl:12"
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class DatasetReport:
    """What validation found, before any GPU work."""

    path: Path
    format: str
    records: int = 0
    valid: int = 0
    problems: list[Problem] = field(default_factory=list)
    duplicates: int = 0
    overlong: int = 0  # counted when a tokenizer measured them
    overlong_action: str = "cut"
    train: int = 0
    dev: int = 0
    tokens: int = 0  # total tokens after cutting/dropping
    max_tokens: int = 0
    preview: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.valid} of {self.records} records usable ({self.format})"]
        if self.problems:
            parts.append(f"{len(self.problems)} with problems")
        if self.duplicates:
            parts.append(f"{self.duplicates} duplicates dropped")
        if self.overlong:
            verb = "cut to the max length" if self.overlong_action == "cut" else "dropped as too long"
            parts.append(f"{self.overlong} {verb}")
        if self.train or self.dev:
            parts.append(f"train {self.train} / dev {self.dev}")
        if self.tokens:
            parts.append(f"{self.tokens:,} tokens, longest {self.max_tokens}")
        return "; ".join(parts)


@dataclass(frozen=True)
class FitEstimate:
    """Bytes a run needs on the GPU, by part, against what the card has."""

    weights: int
    lora: int
    optimizer: int
    activations: int
    logits: int
    overhead: int
    available: int | None

    @property
    def total(self) -> int:
        return self.weights + self.lora + self.optimizer + self.activations + self.logits + self.overhead

    @property
    def fits(self) -> bool | None:
        return None if self.available is None else self.total <= self.available


@dataclass
class FinetuneResult:
    run_id: str
    status: str  # done, cancelled, stopped (NaN), failed
    steps_done: int
    adapter: Path | None
    message: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)


def config_from_dict(d: dict[str, Any]) -> FinetuneConfig:
    """The inverse of `dataclasses.asdict(FinetuneConfig)` (for run records and `launch --config`)."""
    lora = dict(d.get("lora") or {})
    if "targets" in lora:
        lora["targets"] = tuple(lora["targets"])
    rest = {k: v for k, v in d.items() if k not in ("data", "lora", "train")}
    if "eval_prompts" in rest:
        rest["eval_prompts"] = tuple(rest["eval_prompts"])
    return FinetuneConfig(data=DataOptions(**d["data"]), lora=LoraOptions(**lora), train=TrainOptions(**d.get("train", {})),
                          **rest)  # fmt: skip
