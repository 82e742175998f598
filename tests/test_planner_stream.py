"""Models larger than the card: decoder layers streamed from host pools (studio/residency/stream.py), on the CPU
with a tiny Llama config and the simulated card, against the same model run without streaming."""

from __future__ import annotations

import json

import pytest
import torch

from studio.planner import Chat, from_config, layer_bytes, offload_split, parts_for
from studio.residency.simulated import FakeProbe, SimulatedAccelerator
from studio.residency.stream import LayerStreamer, decoder_layers
from tests import _llm_support

llm_ctx, llm, smol_folder = _llm_support.llm_ctx, _llm_support.llm, _llm_support.smol_folder  # session fixtures

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


class _StreamingLoader:
    """A safetensors Llama folder registered with the residency manager; `load_partial` keeps as many layers as fit
    in the room the manager gives (the planner's split is tested above; here the manager's side is)."""

    def __init__(self, key: str, folder, per_layer: int, fixed: int) -> None:
        self.key, self.folder, self.per, self.fixed = key, folder, per_layer, fixed
        self.partial_loads, self.released = [], 0

    def estimate_bytes(self) -> int:
        return self.fixed + TINY["num_hidden_layers"] * self.per

    def load(self, device):
        raise AssertionError("a model larger than the budget must not be loaded whole")

    def load_partial(self, device, room, accel):
        from backends.llm.streamed import load_streamed_causal_lm

        resident = max(0, min(TINY["num_hidden_layers"], (room - self.fixed - 2 * self.per) // self.per))
        self.partial_loads.append((room, resident))
        return load_streamed_causal_lm(self.folder, "cpu", resident=resident, accel=accel)

    def release(self, obj) -> None:
        self.released += 1


def test_the_residency_manager_runs_a_model_larger_than_the_budget_partly_resident(tiny_llama, tmp_path):
    """The manager loads it partly resident instead of on the CPU, counts only that part on the card and the
    streamed layers' pools in RAM, evicts it to disk (a swap would bring it up whole), and loads it partly again."""
    from tests.test_residency_support import NetLoader, sim_manager

    tiny_llama.save_pretrained(tmp_path / "tiny")
    per = layer_bytes(from_config(TINY, "tiny").config, "fp32")
    fixed = 2 * TINY["vocab_size"] * TINY["hidden_size"] * 4 + TINY["hidden_size"] * 4  # embeddings, head, norm
    m, _probe, accel = sim_manager(total_mib=(fixed + 3.5 * per) / 2**20)
    loader = _StreamingLoader("llm:tiny", tmp_path / "tiny", per, fixed)
    m.register(loader)
    m.register(NetLoader("other", 0.1))
    m.register(NetLoader("big", 0.45))
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = tiny_llama(ids).logits
    m.run("other", lambda net: net, working_bytes=0)  # an idle model on the card: it must make room
    with m.use("llm:tiny", working_bytes=0) as model, torch.no_grad():
        got = model(ids).logits
        view = next(v for v in m.snapshot().models if v.key == "llm:tiny")
        on_card = accel.allocated()
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    room, resident = loader.partial_loads[0]
    assert resident == 1 and room <= m.capacity_bytes()
    assert view.tier == "gpu" and view.bytes < loader.estimate_bytes() and view.streamed_bytes >= 3 * per * 0.99
    assert on_card <= m.capacity_bytes() and next(v for v in m.snapshot().models if v.key == "other").tier != "gpu"
    assert not any(e.kind == "cpu_fallback" for e in m.snapshot().events)
    del model  # as the LLM backend forgets it when released: no reference outlives the lease
    m.run("big", lambda net: net, working_bytes=0)  # it does not fit beside: the idle LLM goes to disk, not RAM
    view = next(v for v in m.snapshot().models if v.key == "llm:tiny")
    assert view.tier == "disk" and view.streamed_bytes == 0 and view.pool_bytes == 0 and loader.released == 1
    with m.use("llm:tiny", working_bytes=0) as model, torch.no_grad():
        assert torch.allclose(model(ids).logits, want, atol=1e-5, rtol=1e-5)
    assert len(loader.partial_loads) == 2  # partly again, with the room there is now
    m.close()


def test_the_chat_loader_loads_partly_decodes_eagerly_and_gives_the_pools_back(llm_ctx, smol_folder):
    """ChatModelLoader's side of a model larger than the budget: it says it can stream a safetensors folder (not a
    16-bit choice), builds the planner's split in the room it is given, Chat then decodes eagerly (no static cache
    or CUDA graph over layers that come and go) and says so, and releasing it frees the streamed layers' pools."""
    from backends.llm.backend import ChatModelLoader, LLMBackend, LLMConfig
    from backends.llm.fastdecode import EagerDecoder
    from backends.llm.streamed import streaming_note

    folder = _llm_support.make_tiny_llama(llm_ctx.settings.models_dir / "tiny-llama-streamed", smol_folder)
    backend = LLMBackend(llm_ctx, LLMConfig(model_id="tiny-llama-streamed"))
    src = backend._source("tiny-llama-streamed")
    loader = ChatModelLoader(src, backend)
    assert loader.can_stream() and not ChatModelLoader(src, backend, precision="16bit").can_stream()
    cfg = json.loads((folder / "config.json").read_text())
    info, task = from_config(cfg, "tiny"), Chat(context=backend.config.max_context_tokens, precision="fp32")
    per = layer_bytes(cfg, "fp32")
    room = sum(parts_for(info, task).values()) + per  # streaming sets two layer buffers aside: room for one layer
    accel = SimulatedAccelerator(FakeProbe(2**30))
    model, streamer = loader.load_partial("cuda", room, accel)
    assert (streamer.resident, streamer.stats().layers_streamed) == (1, 1) and streamer.pool_bytes > 0
    assert isinstance(backend._get_decoder(src.key, model, 32, 1024), EagerDecoder)
    assert "1 of 2 layers stream from RAM" in streaming_note(model)[0]
    pools = [e.pool for e in streamer._streamed]
    loader.release(model)
    assert all(p.views == [] for p in pools) and streamer.pool_bytes == 0  # given back, not left to the collector
