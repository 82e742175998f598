"""Loading a causal LM larger than the card from its safetensors files, with the layers that do not fit streamed.

`load_streamed_causal_lm(folder, device, resident=k)` builds the model on the meta device, then loads it one decoder
layer at a time straight from the (memory-mapped) safetensors files: on CUDA every linear of a layer is quantised to
nf4 (double quantisation, bitsandbytes) on the card as it arrives, norms and the rest stay 16-bit; layers >= k go
into the residency manager's host pools as soon as they are built (studio/residency/stream.py), so the whole model
is never on the card at once. Embeddings, final norm and head load last. On the CPU the weights stay fp32 (the
streamer still moves the layers, which is what the tests check). The planner gives `k` (`studio.planner.offload_split`).
The returned `LayerStreamer` says how much moved and for how long; `close()` it before dropping the model.
Not wired into Chat yet: the residency manager does not account a partly resident model, so Chat still runs a model
larger than the budget on the CPU.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
LINEAR_SUFFIXES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight",
                   "up_proj.weight", "down_proj.weight")  # fmt: skip


def _keys_by_layer(folder: Path) -> tuple[dict[int, list[tuple[str, Path]]], list[tuple[str, Path]]]:
    from studio.safety import safetensors_header

    layers: dict[int, list[tuple[str, Path]]] = defaultdict(list)
    rest: list[tuple[str, Path]] = []
    for f in sorted(folder.glob("*.safetensors")):
        for key in safetensors_header(f):
            if key == "__metadata__":
                continue
            m = LAYER_KEY.match(key)
            (layers[int(m.group(1))] if m else rest).append((key, f))
    return layers, rest


def _place(model: Any, key: str, tensor: Any, device: str, dtype: Any) -> None:
    """Put one checkpoint tensor into the meta model: nf4 for a decoder linear on CUDA, else `dtype` on `device`."""
    import torch

    *path, leaf = key.split(".")
    parent = model.get_submodule(".".join(path[:-1])) if len(path) > 1 else model
    module = model.get_submodule(".".join(path)) if path else model
    if device.startswith("cuda") and key.endswith(LINEAR_SUFFIXES) and LAYER_KEY.match(key):
        import bitsandbytes as bnb

        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False, compute_dtype=dtype,
                              compress_statistics=True, quant_type="nf4", device="meta")  # fmt: skip
        w = tensor.to(device=device, dtype=dtype)
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                     module=q).to(device)  # fmt: skip
        setattr(parent, path[-1], q)
        return
    setattr(module, leaf, torch.nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False))


def load_streamed_causal_lm(folder: Path | str, device: str, *, resident: int, accel: Any = None) -> tuple[Any, Any]:
    """(model, LayerStreamer) with layers [0, resident) on `device` and the rest streamed from host pools."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from studio.residency.accel import CpuAccelerator, CudaAccelerator
    from studio.residency.stream import LayerStreamer

    folder = Path(folder)
    t0 = time.perf_counter()
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    accel = accel or (CudaAccelerator() if cuda else CpuAccelerator())
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers, rest = _keys_by_layer(folder)
    n = config.get_text_config().num_hidden_layers
    if sorted(layers) != list(range(n)):
        raise ValueError(f"{folder}: the checkpoint has layers {sorted(layers)[:5]}..., the config {n}")
    handles = {f: safe_open(str(f), framework="pt") for f in {f for keys in layers.values() for _, f in keys} | {
        f for _, f in rest}}  # fmt: skip
    streamer = LayerStreamer([], accel, 0)
    decoder = model.model.layers
    for i in range(n):
        for key, f in layers[i]:
            _place(model, key, handles[f].get_tensor(key), device, dtype)
        if i >= resident:
            streamer.stream(decoder[i])
    for key, f in rest:
        _place(model, key, handles[f].get_tensor(key), device, dtype)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    left = [k for k, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise ValueError(f"{folder}: no weights in the checkpoint for {left[:5]}")
    streamer.resident = resident
    log.info("loaded %s with %d of %d layers on %s, %d streamed (%.1f GB in pools) in %.1f s", folder.name, resident,
             n, device, n - resident, streamer.pool_bytes / 1e9, time.perf_counter() - t0)  # fmt: skip
    return model.eval(), streamer


def resident_layers(folder: Path | str, budget_bytes: int, context: int, *, cuda: bool = True) -> int | None:
    """The planner's split for `folder` at `context` tokens within `budget_bytes` (None: not even the head fits)."""
    from studio.planner import Chat, from_config, offload_split

    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    split = offload_split(from_config(config, Path(folder).name), Chat(context=context, precision="nf4" if cuda else "fp32"),
                          budget_bytes)  # fmt: skip
    return None if split is None else split.resident
