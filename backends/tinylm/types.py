"""Configs, presets and results of the Tiny LM lab (torch-free: the tab and the package API import this)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

POSITIONS = ("learned", "rope", "alibi")  # learned absolute table (GPT-2), rotary (RoFormer), linear biases (ALiBi)
TOKENIZERS = ("char", "bpe")
CORPORA = ("shakespeare", "tinyshakespeare", "python", "text")  # chosen works / nanoGPT-style plays / stdlib / yours
AMP_MODES = ("auto", "off", "bf16")


@dataclass(frozen=True)
class TinyLMConfig:
    vocab_size: int
    block_size: int = 128  # context in tokens; 128 characters is enough for verse lines and fits any card
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0  # tiny runs underfit rather than overfit; nanoGPT uses 0.2 for its 5,000-step runs
    pos: str = "learned"
    bias: bool = True  # nanoGPT's preset drops the biases (a little faster, no worse)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"rotary positions need an even head size, got {self.n_embd // self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.pos not in POSITIONS:
            raise ValueError(f"Unknown position encoding {self.pos!r}; choose one of {', '.join(POSITIONS)}.")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def n_params(self) -> int:
        """Parameters with the head tied to the embedding (the count nanoGPT prints, position table included)."""
        c, biases = self.n_embd, self.bias
        per_layer = 12 * c * c + (9 * c if biases else 0) + (4 * c if biases else 2 * c)  # linears + LayerNorms
        table = self.block_size * c if self.pos == "learned" else 0
        return self.n_layer * per_layer + self.vocab_size * c + table + (2 * c if biases else c)


PRESETS: dict[str, dict[str, object]] = {  # name -> model config without the vocabulary
    "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64},
    "small": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128},
    # nanoGPT's config/train_shakespeare_char.py: ~10.7 M parameters with a 65-character vocabulary
    "nanogpt": {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256, "dropout": 0.2, "bias": False},
}


@dataclass(frozen=True)
class DataSpec:
    """What to train on: a corpus (for "shakespeare", which works; for "text", the id of a text file the user
    uploaded, kept by the backend under its content hash) and how to cut it into tokens."""

    corpus: str = "shakespeare"
    works: tuple[str, ...] = ("hamlet", "macbeth", "romeo_and_juliet")
    text_id: str = ""  # corpus "text": 16 hex digits of the text's sha256 (never a path)
    tokenizer: str = "char"
    bpe_vocab: int = 512  # small: a 5 MB corpus cannot fill a large vocabulary with useful merges
    max_chars: int = 2_000_000  # the Python corpus takes stdlib files in name order up to this many characters

    def __post_init__(self) -> None:
        if self.corpus not in CORPORA:
            raise ValueError(f"Unknown corpus {self.corpus!r}; choose one of {', '.join(CORPORA)}.")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"Unknown tokenizer {self.tokenizer!r}; choose one of {', '.join(TOKENIZERS)}.")
        if not 260 <= self.bpe_vocab <= 32_768:
            raise ValueError(f"BPE vocabulary must be between 260 and 32768 tokens, got {self.bpe_vocab}")
        if self.max_chars < 10_000:
            raise ValueError(f"max_chars must be at least 10000, got {self.max_chars}")
        if self.corpus == "text" and not re.fullmatch(r"[0-9a-f]{16}", self.text_id):
            raise ValueError("Upload a text file first (the corpus 'your text file' trains on the file you upload).")


@dataclass(frozen=True)
class TrainOptions:
    works: tuple[str, ...] = ("hamlet", "macbeth", "romeo_and_juliet")  # kept for old callers: DataSpec.works
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3  # small transformers tolerate a high rate; cosine decay to min_lr
    min_lr: float | None = None  # None: lr / 10 (nanoGPT: 1e-3 -> 1e-4)
    warmup_steps: int = 50
    eval_every: int = 100
    eval_batches: int = 8
    seed: int = 1337
    weight_decay: float = 0.1
    beta2: float = 0.95  # nanoGPT's character preset uses 0.99 (few tokens per step)
    amp: str = "auto"  # auto: bf16 autocast where the card supports it, else fp32
    compile: bool = False  # torch.compile the model (GPU; the first steps then take tens of seconds)
    data: DataSpec | None = None  # None: the Shakespeare works above, character tokens

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0 or self.eval_every <= 0 or self.eval_batches <= 0:
            raise ValueError("steps, batch_size, eval_every and eval_batches must be positive")
        if not 0 < self.lr < 1:
            raise ValueError(f"learning rate must be in (0, 1), got {self.lr}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be between 0 and lr ({self.lr}), got {self.min_lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")

    @property
    def dataset(self) -> DataSpec:
        return self.data if self.data is not None else DataSpec(works=self.works)

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr


@dataclass
class TrainResult:
    run_id: str
    steps_done: int
    best_val_loss: float
    stopped: str  # "finished", "cancelled" or "nan"
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class SampleResult:
    text: str
    new_tokens: int
    seconds: float
    cached: bool

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


@dataclass(frozen=True)
class ExtrapolationPoint:
    factor: int  # evaluation context / training context
    context: int  # tokens
    loss: float | None  # None: the encoding has no positions that far (a learned table ends at block_size)
    tokens: int  # tokens scored

    @property
    def perplexity(self) -> float | None:
        import math

        return None if self.loss is None else math.exp(self.loss)
