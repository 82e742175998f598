"""Models larger than the card: decoder layers streamed from host pools (studio/residency/stream.py), on the CPU
with a tiny Llama config and the simulated card, against the same model run without streaming."""

from __future__ import annotations

import pytest
import torch

from studio.planner import Chat, from_config, layer_bytes, offload_split, parts_for
from studio.residency.simulated import FakeProbe, SimulatedAccelerator
from studio.residency.stream import LayerStreamer, decoder_layers

TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=256, max_position_embeddings=256, tie_word_embeddings=False)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


def _greedy(model, ids: torch.Tensor, new: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             pad_token_id=0)  # fmt: skip
    return out[0, ids.shape[1] :].tolist()


def test_streamed_layers_give_the_same_tokens_and_hold_one_layer_at_a_time(tiny_llama):
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want_logits = tiny_llama(ids).logits
    want = _greedy(tiny_llama, ids, 8)
    accel = SimulatedAccelerator(FakeProbe(64 * 2**20))
    layers = decoder_layers(tiny_llama)
    streamer = LayerStreamer(layers, accel, resident=1)
    try:
        per_layer = streamer._streamed[0].pool.total
        assert streamer.pool_bytes == 3 * per_layer and accel.allocated() == 0
        accel.reset_peak()
        with torch.no_grad():
            got_logits = tiny_llama(ids).logits
        assert torch.equal(got_logits, want_logits)
        assert accel.peak() == per_layer and accel.allocated() == 0  # one streamed layer on the card at a time
        assert _greedy(tiny_llama, ids, 8) == want
        s = streamer.stats()
        assert s.layers_streamed == 3 and s.uploads == 3 * (1 + 8) and s.bytes_moved == s.uploads * per_layer
        assert 0 < s.share_moving < 1
    finally:
        streamer.close()
    with torch.no_grad():
        assert torch.equal(tiny_llama(ids).logits, want_logits)  # detached: the layers run from their pools


def test_streaming_refuses_a_bad_split_and_non_decoder_models(tiny_llama):
    accel = SimulatedAccelerator(FakeProbe(64 * 2**20))
    with pytest.raises(ValueError, match=r"resident layers must be 0\.\.4"):
        LayerStreamer(decoder_layers(tiny_llama), accel, resident=5)
    with pytest.raises(ValueError, match=r"has no model\.layers"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_the_planner_predicts_the_split_the_streamer_runs():
    info = from_config(TINY, "tiny")
    task = Chat(context=256, precision="fp32", new_tokens=16)
    need = sum(parts_for(info, task).values())
    per = layer_bytes(info.config, "fp32")
    split = offload_split(info, task, budget=need - per)  # one layer short of fitting whole
    assert (split.resident, split.streamed) == (1, 3)  # two layer buffers are set aside for streaming
    assert split.gpu_bytes == need - per and split.streamed_bytes == 3 * per
    assert offload_split(info, task, budget=need - 4 * per) is None  # not even the head and the buffers fit


def test_streaming_keeps_bitsandbytes_nf4_quant_states_working():
    """The GPU benchmark's path (nf4 layers parked as built) on the CPU: quant-state tensors stream with their
    weights, the shared code tables stay put, and the logits equal those of the same model run from its pools."""
    pytest.importorskip("bitsandbytes")
    from transformers import LlamaConfig, LlamaForCausalLM

    from studio.bench.llm_models import _materialise_rest, nf4_linears

    cfg = dict(TINY, hidden_size=256, intermediate_size=512, vocab_size=512)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.bfloat16)
    accel = SimulatedAccelerator(FakeProbe(2**30))
    streamer = LayerStreamer([], accel, 0)
    for i, layer in enumerate(model.model.layers):
        nf4_linears(layer, "cpu")
        for module in layer.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if p.device.type == "meta":
                    setattr(
                        module, name, torch.nn.Parameter(torch.ones(p.shape, dtype=torch.bfloat16), requires_grad=False)
                    )
        if i >= 2:
            streamer.stream(layer)
    _materialise_rest(model, "cpu", 0.2)
    ids = torch.randint(3, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        streamed = model(ids).logits
    per_layer = streamer._streamed[0].pool.total
    assert streamer.stats().uploads == 2 and accel.peak() == per_layer
    streamer.close()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, streamed)


def test_a_checkpoint_loads_layer_by_layer_with_the_planners_split(tiny_llama, tmp_path):
    """Real weights from safetensors, one layer at a time, the layers past the split streamed: same logits as the
    model loaded whole."""
    from backends.llm.streamed import load_streamed_causal_lm, resident_layers

    tiny_llama.save_pretrained(tmp_path / "tiny")
    info = from_config(TINY, "tiny")
    task = Chat(context=256, precision="fp32")
    per = layer_bytes(info.config, "fp32")
    resident = resident_layers(tmp_path / "tiny", sum(parts_for(info, task).values()) - per, 256, cuda=False)
    assert resident == 1
    accel = SimulatedAccelerator(FakeProbe(64 * 2**20))
    model, streamer = load_streamed_causal_lm(tmp_path / "tiny", "cpu", resident=resident, accel=accel)
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, want = model(ids).logits, tiny_llama(ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert streamer.stats().uploads == 3 and accel.allocated() == 0
    streamer.close()
