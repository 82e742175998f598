"""Models and timed runs shared by the LLM decode benchmark (studio/bench/llm.py) and its checks (llm_checks.py):
architecture-true Llama configs with random weights, and greedy runs through `generate` or the studio's decoder."""

from __future__ import annotations

import time
from typing import Any

import torch

GB = 1e9


LLAMA_8B = dict(
    hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
    vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=False,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
    bos_token_id=128000, eos_token_id=128001,
)  # fmt: skip


TINY = dict(
    hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=688,
    vocab_size=4096, max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)  # fmt: skip


def build_nf4_llama(cfg_kwargs: dict, device: str, lm_head_std: float = 0.2) -> Any:
    """Random-weight Llama with nf4 (double-quant) linears, built on meta and quantised one matrix at a time."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**cfg_kwargs)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    nf4_linears(model.model, device)
    _materialise_rest(model, device, lm_head_std)
    return model.eval()


def nf4_linears(root: Any, device: str) -> None:
    """Replace every nn.Linear under `root` with a random nf4 (double-quant) Linear4bit, one matrix at a time."""
    import bitsandbytes as bnb

    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      compress_statistics=True, quant_type="nf4", device="meta")  # fmt: skip
                w = torch.randn(child.out_features, child.in_features, dtype=torch.bfloat16, device=device) * 0.02
                q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                             module=q).to(device)  # fmt: skip
                setattr(parent, name, q)


def build_fp32_llama(cfg_kwargs: dict, lm_head_std: float = 0.2) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg_kwargs)).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, lm_head_std)  # peaked logits, so greedy choices are well separated
    return model


def _materialise_rest(model: Any, device: str, lm_head_std: float) -> None:
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.device.type != "meta":
                continue
            if "norm" in type(module).__name__.lower():
                data = torch.ones(p.shape, dtype=torch.bfloat16, device=device)
            else:
                std = lm_head_std if module is model.lm_head else 0.02
                data = torch.randn(p.shape, dtype=torch.bfloat16, device=device) * std
            setattr(module, name, torch.nn.Parameter(data, requires_grad=False))
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"tensors left on meta: {left[:5]}")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class _Timer:
    """A `generate` streamer that records when each new token arrives (the first `put` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_generate(model: Any, ids: torch.Tensor, new: int, **kw: Any) -> tuple[list[int], dict]:
    device = ids.device.type
    timer = _Timer()
    mask = torch.ones_like(ids)
    _sync(device)
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         streamer=timer, pad_token_id=model.config.eos_token_id, **kw)  # fmt: skip
    _sync(device)
    t_end = time.perf_counter()
    return out[0, ids.shape[1] :].tolist(), _timing(t0, timer.times[0], t_end, new)


def run_ours(decoder: Any, ids: torch.Tensor, new: int, *, reuse: bool = False) -> tuple[list[int], dict]:
    """The studio's own generation loop (backends/llm_generate.stream_tokens), greedy, no EOS. Without `reuse` the
    decoder forgets what its cache holds first, so repeated runs of one prompt time a first turn, not a regenerate."""
    from backends.llm.generate import GenerationOptions, GenerationStats, stream_tokens

    if not reuse:
        getattr(decoder, "forget", lambda: None)()
    stats = GenerationStats()
    tokens: list[int] = []
    opts = GenerationOptions(temperature=0.0, max_new_tokens=new)
    _sync(ids.device.type)
    for _ in stream_tokens(decoder, _IdsTokenizer(tokens), ids[0].tolist(), opts, eos_ids=set(), stats=stats):
        pass
    _sync(ids.device.type)
    return tokens, {
        "ttft_s": stats.ttft_s, "decode_tok_s": stats.decode_tokens_per_s, "total_s": stats.total_s,
        "new_tokens": stats.new_tokens, "decoder": stats.decoder,
    }  # fmt: skip


class _IdsTokenizer:
    """Stands in for a tokenizer on random-weight models: records ids, 'decodes' to their digits."""

    def __init__(self, sink: list[int]) -> None:
        self.sink = sink

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if len(ids) > len(self.sink):
            self.sink.append(ids[-1])
        return " ".join(map(str, ids[-64:]))


def _timing(t0: float, t_first: float, t_end: float, new: int) -> dict:
    return {"ttft_s": t_first - t0, "decode_tok_s": (new - 1) / (t_end - t_first), "total_s": t_end - t0,
            "new_tokens": new}  # fmt: skip


def first_mismatch(a: list[int], b: list[int]) -> int:
    """Number of leading tokens two greedy runs agree on."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
