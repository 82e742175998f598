"""The CUDA paths, on a real GPU (marker `gpu`, deselected by default): `python launch.py test -m gpu` on a machine
with an NVIDIA card. They check what the CPU suite can only simulate: the NVML probe's readings, pinned host buffers
and device moves, and the CUDA-graph decode step against plain `generate`."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with -m gpu on one)"),
]
MiB = 2**20


def test_nvml_probe_reads_the_card_and_sees_our_allocation():
    from studio.residency.probes import NvmlProbe

    probe = NvmlProbe(0)
    before = probe.read()
    assert before is not None and before.total_bytes > 0 and before.used_bytes + before.free_bytes <= before.total_bytes
    block = torch.empty(512 * MiB, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    after = probe.read()
    assert after.used_bytes - before.used_bytes >= 400 * MiB  # NVML sees what the allocator took from the driver
    if after.per_process:
        assert after.process(os.getpid()) is not None
    del block


def test_accelerator_pins_host_buffers_and_moves_at_pinned_speed():
    from studio.residency.accel import CudaAccelerator

    accel = CudaAccelerator(0)
    host = accel.host_buffer(256 * MiB)
    assert host.pinned
    dev = accel.alloc(256 * MiB)
    assert accel.on_device(dev) and accel.allocated() >= 256 * MiB
    host.tensor.fill_(7)
    dev.copy_(host.tensor, non_blocking=True)
    accel.synchronize()
    assert int(dev[-1]) == 7
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(4):
        dev.copy_(host.tensor, non_blocking=True)
    end.record()
    accel.synchronize()
    gbps = 4 * 256 * MiB / (start.elapsed_time(end) / 1000) / 1e9
    assert gbps > 10, f"pinned host-to-device copy ran at {gbps:.1f} GB/s; pageable memory would be ~6-8"
    host.close()


def test_swap_in_copy_runs_beside_other_streams_kernels_and_is_complete_on_return():
    """`start_copy_in` (the mover's host -> device copy) waits for its own copy only: a long kernel queued on another
    stream after it is still running when it returns, and the bytes are all there."""
    from studio.residency.accel import CudaAccelerator

    accel = CudaAccelerator(0)
    host = accel.host_buffer(256 * MiB)
    host.tensor.random_(0, 255)
    dev = accel.alloc(256 * MiB)
    busy, a = torch.cuda.Stream(), torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(busy):
        for _ in range(200):  # ~0.1 s of matmuls
            a = a @ a / 64
        done = torch.cuda.Event()
        done.record(busy)
    accel.start_copy_in(dev, host.tensor, host.pinned)()
    still_running = not done.query()
    assert torch.equal(dev.cpu(), host.tensor)
    assert still_running, "start_copy_in's wait waited for another stream's kernels (a device-wide synchronize)"
    torch.cuda.synchronize()
    host.close()


def test_cuda_graph_decoder_matches_generate_token_for_token():
    from transformers import LlamaConfig, LlamaForCausalLM

    from backends.llm.fastdecode import StaticDecoder
    from backends.llm.generate import GenerationOptions, stream_tokens

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=688, vocab_size=4096, max_position_embeddings=2048)  # fmt: skip
    model = LlamaForCausalLM(cfg).to("cuda", torch.float32).eval()
    ids = torch.randint(3, cfg.vocab_size, (1, 40), device="cuda")
    n = 48
    ref = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, ids.shape[1] :].tolist()

    class Ids:
        def __init__(self) -> None:
            self.ids: list[int] = []

        def decode(self, ids, skip_special_tokens=True):
            self.ids = list(ids)
            return " ".join(map(str, ids))

    decoder = StaticDecoder(model, ids.shape[1] + n + 8, use_graph=True)
    rec = Ids()
    opts = GenerationOptions(temperature=0.0, max_new_tokens=n)
    for _ in stream_tokens(decoder, rec, ids[0].tolist(), opts, eos_ids=set()):
        pass
    assert rec.ids == ref and "graph" in decoder.name


def test_vlm_feature_path_with_cuda_graph_matches_plain_generate(tmp_path):
    """The VLM tab's path (cached image features merged into the prompt embeddings, Chat's CUDA-graph decode step)
    gives plain `generate`'s greedy tokens on a small random LLaVA in fp32, and reuses the features next turn."""
    from transformers import LlavaForConditionalGeneration

    from backends.vlm.decode import FeatureCache
    from studio.bench.vlm import _Holder, build_llava_7b, make_inputs, next_turn, ours, plain

    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=56,
                  patch_size=14, projection_dim=32, hidden_act="quick_gelu")  # fmt: skip
    text = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=32064, max_position_embeddings=4096)  # fmt: skip
    folder = build_llava_7b(tmp_path / "llava", vision, text, "cuda")
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).cuda().eval()
    inputs, digests = make_inputs(model, 2, 16)
    cache, holder = FeatureCache(), _Holder()
    got, timing = ours(model, cache, inputs, digests, 24, holder)
    want, _ = plain(model, inputs, 24)
    assert timing["decoder"] == "cuda-graph" and got == want
    again, timing = ours(model, cache, inputs, digests, 8, holder, reuse=True)
    assert timing["images_encoded"] == 0 and timing["reused_tokens"] == inputs["input_ids"].shape[1] - 1
    turn2 = next_turn(inputs, again, 8, seed=2)  # the history turn: the cached prompt and reply are not recomputed
    got2, timing2 = ours(model, cache, turn2, digests, 16, holder, reuse=True)
    assert timing2["reused_tokens"] == inputs["input_ids"].shape[1] + len(again) - 1  # its last token never fed
    assert got2 == plain(model, turn2, 16)[0]
