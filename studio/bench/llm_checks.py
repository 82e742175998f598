"""Correctness checks for the LLM decode benchmark (studio/bench/llm.py).

- `teacher_forced`: the same tokens fed to each decoder; logits compared with one full forward pass.
- `fp32_exactness`: in fp32 the static-cache and CUDA-graph decoders must reproduce plain `generate` token for token.
- `product_check`: the studio's own path (backends.llm.backend, residency manager, precision policy) on this device.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from studio.bench.llm_models import TINY, build_fp32_llama, first_mismatch, run_generate, run_ours


@torch.no_grad()
def teacher_forced(model: Any, decoders: dict[str, Any], ids: torch.Tensor, forced: list[int]) -> dict:
    """Feed the same tokens to each decoder and compare its logits with one full forward pass (the reference).

    Random weights make greedy runs diverge after a near-tie from any rounding difference; forcing the tokens
    measures the logits themselves: argmax agreement and the largest difference relative to the logits' spread."""
    full = torch.cat([ids, torch.tensor([forced[:-1]], device=ids.device)], dim=1)
    ref = model(input_ids=full, logits_to_keep=len(forced)).logits[0].float()  # (K, V)
    got = {"reference (one forward, dynamic)": ref}
    for name, dec in decoders.items():
        rows = [dec.prefill(ids).clone()]
        for t in forced[:-1]:
            rows.append(dec.step(torch.tensor([t], device=ids.device)).clone())
        got[name] = torch.stack(rows)
    out = {}
    names = list(got)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            diff = (got[a] - got[b]).abs()
            out[f"{b} vs {a}"] = {
                "argmax_agree": (got[a].argmax(-1) == got[b].argmax(-1)).float().mean().item(),
                "max_abs_diff_over_std": (diff.max() / got[a].std()).item(),
                "mean_abs_diff_over_std": (diff.mean() / got[a].std()).item(),
            }
    return out


def fp32_exactness(device: str, new: int = 128) -> dict:
    """fp32 (no bf16 rounding): greedy tokens of plain generate, static no-graph and CUDA graph must be equal."""
    from backends.llm.fastdecode import StaticDecoder

    model = build_fp32_llama(dict(TINY, hidden_size=512, num_attention_heads=8, intermediate_size=1376)).to(device)
    ids = torch.randint(3, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(1)).to(device)
    plain, _ = run_generate(model, ids, new)
    result = {"new_tokens": new}
    for graph in (False, True):
        dec = StaticDecoder(model, 128 + new + 8, use_graph=graph)
        tokens, _ = run_ours(dec, ids, new)
        result[f"{dec.name}_vs_plain_leading_equal"] = first_mismatch(tokens, plain)
    return result


def product_check(tokenizer_dir: Path, work: Path, new: int = 64) -> dict:
    """The studio's own path on this device: save a small random Llama, load it through backends.llm.backend (residency
    manager, precision policy) and chat greedily with and without the fast decoder; the texts must agree."""
    from transformers import AutoTokenizer

    from backends.llm.backend import GenerationOptions, LLMBackend, LLMConfig
    from studio.catalog import Catalog
    from studio.context import StudioContext
    from studio.settings import Settings

    try:
        from studio.residency import ResidencyManager
    except ImportError as e:  # the residency module is being rewritten in the shared tree: use the minimal one
        print(f"studio.residency not importable ({e}); product check uses a minimal manager", flush=True)
        ResidencyManager = _MinimalResidency

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = dict(TINY, hidden_size=512, num_attention_heads=8, num_key_value_heads=4, intermediate_size=1376,
               vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    folder = work / "models" / "tiny-llama"
    build_fp32_llama(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    settings = Settings(data_dir=work / "data", models_dir=work / "models")
    ctx = StudioContext(
        settings,
        ResidencyManager("cuda" if torch.cuda.is_available() else "cpu"),
        Catalog(settings.models_dir),
        None,
        None,
    )
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    out: dict = {}
    for precision in ("nf4", "16bit"):
        backend = LLMBackend(ctx, LLMConfig(model_id="tiny-llama", precision=precision))
        texts = {}
        for fast in (True, True, False):
            backend.configure(fast_decode=fast)
            *_, last = backend.chat(msgs, GenerationOptions(temperature=0.0, max_new_tokens=new))
            texts.setdefault(last.stats.decoder, last.text)
            out[f"{precision}:{last.stats.decoder}"] = {
                "decode_tok_s": last.stats.decode_tokens_per_s, "ttft_s": last.stats.ttft_s,
                "new_tokens": last.stats.new_tokens,
                "graph_error": getattr(backend._decoder, "graph_error", None),
            }  # fmt: skip
        values = list(texts.values())
        out[f"{precision}:decoders"] = sorted(texts)
        out[f"{precision}:texts_agree"] = len(set(values)) == 1
        out[f"{precision}:leading_chars_equal"] = len(os.path.commonprefix(values))  # noqa: RUF071 (characters wanted)
        out[f"{precision}:chars"] = [len(v) for v in values]
        backend.release_decode_buffers()
    print("product check:", json.dumps(out, indent=1), flush=True)
    return out


class _MinimalResidency:
    """register/is_registered/use of studio.residency, loading once (only for the product check's fallback)."""

    def __init__(self, device: str) -> None:
        self.device, self._loaders, self._models = device, {}, {}

    def register(self, loader: Any) -> None:
        self._loaders[loader.key] = loader

    def is_registered(self, key: str) -> bool:
        return key in self._loaders

    def use(self, key: str, working_bytes: int | None = None) -> Any:
        if key not in self._models:
            self._models[key] = self._loaders[key].load(self.device)
        return contextlib.nullcontext(self._models[key])
