"""Tiny LM lab: a small GPT trained from scratch (nanoGPT-style), the torch-free public API.

Submodules (import them only from backends, benchmarks and tests; tabs use this module):
- types: configs, presets, results;  data: corpora (Shakespeare works, TinyShakespeare rebuilt, Python source) and
  tokenisers (characters, byte-level BPE);  model: TinyGPT with learned / rotary / ALiBi positions, the causal mask
  and the KV cache;  train: the recipe and the lab's loop under the training lease;  generate: timed sampling with
  and without the cache, perplexity at 1x/2x/4x the training context;  backend: TinyLMBackend (jobs, runs).
`TinyGPT`, `KVCache` and `causal_mask` need torch and are loaded on first use.
"""

from __future__ import annotations

from typing import Any

from backends.tinylm.backend import TinyLMBackend, create, run_label
from backends.tinylm.data import (
    CORPUS_PACKAGE,
    TINY_PLAYS,
    BPETokenizer,
    CharTokenizer,
    available_works,
    corpus_text,
    load_corpus,
)
from backends.tinylm.types import (
    CORPORA,
    POSITIONS,
    PRESETS,
    TOKENIZERS,
    DataSpec,
    ExtrapolationPoint,
    SampleResult,
    TinyLMConfig,
    TrainOptions,
    TrainResult,
)

_TORCH_NAMES = {"TinyGPT", "KVCache", "causal_mask"}


def __getattr__(name: str) -> Any:
    if name in _TORCH_NAMES:
        from backends.tinylm import model

        return getattr(model, name)
    raise AttributeError(f"module 'backends.tinylm' has no attribute {name!r}")


__all__ = [
    "CORPORA", "CORPUS_PACKAGE", "POSITIONS", "PRESETS", "TINY_PLAYS", "TOKENIZERS", "BPETokenizer", "CharTokenizer",
    "DataSpec", "ExtrapolationPoint", "SampleResult", "TinyLMBackend", "TinyLMConfig", "TrainOptions", "TrainResult",
    "available_works", "corpus_text", "create", "load_corpus", "run_label",
]  # fmt: skip
