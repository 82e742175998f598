"""Correctness checks of the int4 decode benchmark (studio/bench/llm_int4.py).

- `teacher_forced_agreement`: our fused decoder fed the same tokens as one plain forward of the same int4 model.
- `swap_check`: the model goes GPU -> pinned RAM -> GPU through the residency manager's own mover (studio.residency.pinned);
  a fresh fused decoder must then give bit-identical logits.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from studio.bench.llm_checks import teacher_forced


def teacher_forced_agreement(model: Any, decoder: Any, ids: torch.Tensor, forced: list[int]) -> dict:
    pairs = teacher_forced(model, {"ours": decoder}, ids, forced)
    return {"positions": len(forced), **next(iter(pairs.values()))}


@torch.no_grad()
def _logits(model: Any, ids: torch.Tensor, steps: int = 4) -> torch.Tensor:
    from backends.llm.compact import FusedInt4Decoder

    dec = FusedInt4Decoder(model, ids.shape[1] + steps + 8)
    rows = [dec.prefill(ids).clone()]
    for _ in range(steps):
        rows.append(dec.step(rows[-1].argmax().view(1)).clone())
    return torch.stack(rows)


def swap_check(model: Any, ids: torch.Tensor, device: str) -> dict:
    from studio.residency.accel import CpuAccelerator, CudaAccelerator
    from studio.residency.pinned import move_down, move_up

    accel = CudaAccelerator() if device == "cuda" else CpuAccelerator()
    before = _logits(model, ids)
    t0 = time.perf_counter()
    down = move_down(model, None, accel, accel.host_buffer)
    t1 = time.perf_counter()
    on_gpu_while_down = sum(t.is_cuda for t in [*model.parameters(), *model.buffers()])
    up = move_up(model, down.pool, accel, accel.host_buffer)
    t2 = time.perf_counter()
    after = _logits(model, ids)
    return {
        "identical": bool(torch.equal(before, after)), "bytes": down.bytes, "pinned": down.pool.pinned if down.pool else None,
        "down_s": t1 - t0, "up_s": t2 - t1, "tensors_left_on_gpu_while_down": int(on_gpu_while_down),
        "copied_up": up.copied,
    }  # fmt: skip


def _replay_ms(fn: Any, reps: int = 50) -> float:
    """Milliseconds per replay of `fn` captured in a CUDA graph (after a warm-up)."""
    from backends.llm.fastdecode import capture_graph

    graph = capture_graph(fn, torch.device("cuda"))[0]
    if graph is None:
        return float("nan")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


@torch.no_grad()
def step_breakdown(decoder: Any) -> dict:
    """GPU time of one decode step against its int4 matmuls alone (the floor the glue ops add to), CUDA only."""
    d = decoder
    h = torch.randn((1, d.model.config.hidden_size), device=d.device, dtype=d.dtype)
    act = torch.randn((1, d.layers[0].down.in_features), device=d.device, dtype=d.dtype)

    def matmuls() -> None:
        for layer in d.layers:
            layer.qkv(h), layer.o(h), layer.gate_up(h), layer.down(act)
        d.model.lm_head(h)

    def layers_without_head() -> None:
        d._forward(d.ids_buf, d.pos_buf, prefill=False)

    return {
        "step_ms": _replay_ms(d._step_body),
        "int4_matmuls_ms": _replay_ms(matmuls),
        "step_without_lm_head_ms": _replay_ms(layers_without_head),
    }
