"""Loading a causal LM larger than the card from its safetensors files, with the layers that do not fit streamed.

`load_streamed_causal_lm(folder, device, resident=k)` builds the model on the meta device, then loads it one decoder
layer at a time straight from the (memory-mapped) safetensors files: on CUDA every linear of a layer is quantised to
nf4 (double quantisation, bitsandbytes) on the card as it arrives, norms and the rest stay 16-bit; layers >= k go
into the residency manager's host pools as soon as they are built (studio/residency/stream.py), so the whole model
is never on the card at once. Embeddings, final norm and head load last. On the CPU the weights stay fp32 (the
streamer still moves the layers, which is what the tests check). The planner gives `k` (`studio.planner.offload_split`).
The returned `LayerStreamer` says how much moved and for how long; `close()` it before dropping the model.
Chat uses it through the residency manager: `ChatModelLoader.load_partial` -> `load_partial` here, called when the
model can never fit the budget whole (studio/residency/planner.py `plan_partial`); the manager counts only the
resident part on the card and the streamed layers' pools in RAM, and such a model goes to disk when evicted.
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


def can_stream(folder: Path | str) -> bool:
    """A folder that `load_streamed_causal_lm` can build: config.json and safetensors with `model.layers.N.` keys."""
    folder = Path(folder)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        return False
    try:
        layers, _ = _keys_by_layer(folder)
    except Exception as e:  # an unreadable header: the loader's own checks word it when it loads
        log.debug("%s cannot stream: %s", folder, e)
        return False
    return bool(layers)


def load_partial(folder: Path | str, accel: Any, room_bytes: int, context: int) -> tuple[Any, Any]:
    """The residency manager's partly resident load: as many decoder layers as the planner fits in `room_bytes` at
    `context` tokens stay on the card, the rest stream from host pools. On the simulated card (tests) the model is
    built in fp32 on the CPU and the manager uploads what is not streamed, as it does for any load there."""
    from studio.units import fmt_bytes

    cuda = getattr(accel, "kind", "") == "cuda"
    resident = resident_layers(folder, room_bytes, context, cuda=cuda)
    if resident is None:
        raise ValueError(f"{Path(folder).name}: not even its embeddings and head fit in {fmt_bytes(room_bytes)}")
    model, streamer = load_streamed_causal_lm(folder, accel.load_device if cuda else "cpu", resident=resident,
                                              accel=accel)  # fmt: skip
    model.studio_streamer = streamer  # the LLM backend decodes such a model eagerly and says it streams
    return model, streamer


def streamer_of(model: Any) -> Any:
    """The LayerStreamer of a partly resident model, or None."""
    return getattr(model, "studio_streamer", None)


def streaming_note(model: Any) -> list[str]:
    """What Chat says of a partly resident model (its speed is in the stats line beside it)."""
    s = streamer_of(model)
    if s is None:
        return []
    streamed = s.stats().layers_streamed
    return [f"larger than the GPU budget: {streamed} of {s.resident + streamed} layers stream from RAM at every "
            f"token ({s.pool_bytes / 1e9:.1f} GB), so replies are slower"]  # fmt: skip
