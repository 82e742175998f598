"""Session-wide LLM fixtures: the real SmolLM2 converted once (GGUF -> safetensors) into the session cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from studio.settings import Settings


@pytest.fixture(scope="session")
def llm_ctx(shared_cache_dir: Path):
    """A StudioContext (CPU) whose data dir lives in the session cache, so the conversion runs once per session."""
    from studio.app import build_context

    root = shared_cache_dir / "llm-tests"
    settings = Settings(data_dir=root / "data", models_dir=root / "models", open_browser=False)
    ctx = build_context(settings)
    yield ctx
    ctx.jobs.shutdown(timeout=10)


@pytest.fixture(scope="session")
def llm(llm_ctx):
    """The LLM backend with the offline SmolLM2 loaded (first use converts the GGUF, ~20 s)."""
    backend = llm_ctx.backends.llm
    backend.complete([{"role": "user", "content": "Hi"}], max_new_tokens=1)
    return backend


@pytest.fixture(scope="session")
def smol_folder(llm) -> Path:
    """The converted SmolLM2 folder (config, safetensors, tokenizer)."""
    src = llm._source("smollm2-135m")
    return llm.model_folder(src)


def make_tiny_llama(folder: Path, tokenizer_folder: Path, *, hidden: int = 64, seed: int = 0) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer, saved as a transformers folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_folder)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)  # peaked logits: greedy choices are stable
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
