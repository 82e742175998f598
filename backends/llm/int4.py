"""int4 weight-only linears on torch's own kernel ("tinygemm", `aten._weight_int4pack_mm`) and a loader that
quantises a Llama checkpoint tensor by tensor while it streams from the safetensors files.

Format: each output row is cut into groups of `group` input columns; per group a bf16 scale and zero, and
w ~= (q - 8) * scale + zero with q in 0..15 (the convention of the aten kernels). Scales and zeros come from HQQ
(half-quadratic optimisation of the zero point, a few iterations from the min/max start), which lowers the
rounding error of plain min/max at no cost at run time. The packed weight's layout belongs to the device kind:
- CUDA (sm80+): tile layout of `_convert_weight_to_int4pack`, (N/8, K/(16*k_tiles), 32, k_tiles/2) int32, where
  rows can be sliced in steps of 8 (used to run q/k/v or gate/up alone from one fused weight);
- CPU: `_convert_weight_to_int4pack_for_cpu`, (N, K/2) uint8, not sliceable by rows (a part runs the whole
  fused matmul and keeps its columns; the CPU path exists for the correctness tests).
A CUDA-packed model moves through pinned RAM as plain bytes (residency swaps, plain buffers, no tensor subclass),
but computes only on CUDA.

Fusion: q/k/v of each layer are quantised as ONE (q+k+v, K) matrix (`qkv_proj`), gate/up as one (`gate_up_proj`);
the original module names become `Int4Part`s that compute their own rows, so transformers' forward, `generate`
and the studio's static decoder keep working, while the fused decoder (compact.py) makes one matmul of each.
Memory while loading: the int4 tensors so far plus the bf16 tensors of one fused group (largest: the embedding).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
SINGLE = ("o_proj", "down_proj")
SUPPORTED_TYPES = ("llama",)  # plain Llama blocks: no biases, rotate-half rope (SmolLM2, Llama 3.x)


# ---- capability -----------------------------------------------------------------------------------------------
def int4_supported(device: str | torch.device) -> bool:
    """Does torch's int4 kernel run here? CUDA needs compute capability 8.0+ (Ampere and newer)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available() or not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
            return False
        return torch.cuda.get_device_capability(dev) >= (8, 0)
    return dev.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def config_supported(config: Any) -> str | None:
    """None if the int4 loader and the fused decoder handle this config, else the reason why not."""
    if getattr(config, "model_type", "") not in SUPPORTED_TYPES:
        return f"model type {getattr(config, 'model_type', '?')!r} (int4 covers {SUPPORTED_TYPES})"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "linear layers with biases"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for k in (config.hidden_size, config.intermediate_size, config.num_attention_heads * head_dim):
        if k % 32:
            return f"a layer width ({k}) that is not a multiple of 32"
    return None


def group_for(in_features: int, wanted: int = 128) -> int:
    """The largest group size <= `wanted` among 128/64/32 that divides the input width."""
    for g in (128, 64, 32):
        if g <= wanted and in_features % g == 0:
            return g
    raise ValueError(f"input width {in_features} is not a multiple of 32: no int4 group size fits")


def _k_tiles(in_features: int) -> int:
    for t in (8, 4, 2):
        if in_features % (16 * t) == 0:
            return t
    raise ValueError(f"input width {in_features} is not a multiple of 32")


# ---- quantisation ----------------------------------------------------------------------------------------------
@torch.no_grad()
def quantize(w: torch.Tensor, group: int, hqq_iters: int = 20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) weight -> q (N, K) int32 in 0..15, scale and zero (N, K/group) float32, w ~= (q - 8) * s + z.

    Rows are done in chunks of ~32 M values, so the float32 temporaries stay near 1 GB even for a 128k-row head."""
    rows = max(1, (1 << 25) // w.shape[1])
    parts = [_quantize_rows(w[i : i + rows], group, hqq_iters) for i in range(0, w.shape[0], rows)]
    return tuple(torch.cat(x) for x in zip(*parts, strict=True))  # type: ignore[return-value]


def _quantize_rows(w: torch.Tensor, group: int, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, k = w.shape
    wg = w.float().reshape(n, k // group, group)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    ws = wg / scale
    start = zp = -lo / scale  # HQQ form: w ~= (q - zp) * scale; min/max start
    beta = 1e1
    for _ in range(iters):  # half-quadratic solver, lp (p = 0.7) shrinkage of the error (HQQ, Badri & Shaji 2023)
        q = (ws + zp).round_().clamp_(0, 15)
        err = (ws - q + zp).mul_(scale)
        mag = err.abs()
        shrunk = mag.sub_(mag.clamp(min=1e-8).pow_(-0.3).div_(beta)).relu_().mul_(err.sign_())
        zp = (q - ws + shrunk.div_(scale)).mean(-1, keepdim=True)
        beta *= 1.01
    better = _group_error(ws, zp) < _group_error(ws, start)  # per group: keep the solver's zero only if it helps
    zp = torch.where(better, zp, start)
    q = (ws + zp).round_().clamp_(0, 15)
    zero = (8 - zp) * scale  # tinygemm form: (q - 8) * scale + zero
    return q.reshape(n, k).to(torch.int32), scale.reshape(n, -1), zero.reshape(n, -1)


def _group_error(ws: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    """Squared rounding error of each group, in units of its scale."""
    return ((ws + zp).round().clamp(0, 15) - zp - ws).pow(2).sum(-1, keepdim=True)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """Inverse of `quantize` in float32 (for tests and error measurements)."""
    s, z = scale.repeat_interleave(group, 1), zero.repeat_interleave(group, 1)
    return (q.float() - 8) * s + z


class Int4Linear(nn.Module):
    """y = x @ W.T with W in int4 (tinygemm). `parts`: output widths of the matrices fused into W (q, k, v).

    On CUDA two properties of the card are checked once when the weight is packed (never inside a compiled or
    captured forward): `row_slices` (a part may run its own 8-row tiles) and `unpack_prefill` (inputs of more than
    16 rows go through int4_prefill: unpacked to bf16, then cuBLAS)."""

    row_slices = False
    unpack_prefill = False

    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor, shape: tuple[int, int], group: int,
                 parts: tuple[int, ...] = ()) -> None:  # fmt: skip
        super().__init__()
        self.out_features, self.in_features = shape
        self.group = group
        self.parts = parts or (self.out_features,)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", scales_zeros)  # (K/group, N, 2) in the compute dtype
        if packed.is_cuda:
            from backends.llm.int4_prefill import dequant_ok

            self.row_slices = _cuda_rows_sliceable(packed.device)
            self.unpack_prefill = dequant_ok(packed.device, packed.shape[-1] * 2)

    @classmethod
    def from_dense(cls, w: torch.Tensor, parts: tuple[int, ...] = (), dtype: torch.dtype | None = None,
                   hqq_iters: int = 20) -> Int4Linear:  # fmt: skip
        n, k = w.shape
        group = group_for(k)
        packed, sz = quantize_packed(w, group, hqq_iters, dtype or w.dtype)
        return cls(packed, sz, (n, k), group, parts)

    def matmul(self, x2: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """(M, K) @ W.T -> (M, N), or only the output rows `rows` (multiples of 8) when the layout allows it."""
        if not self.packed.is_cuda:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.packed, self.group,
                                                           self.scales_zeros)  # fmt: skip
            return y if rows is None else y[:, rows]
        if rows is not None and not self.row_slices:
            return self.matmul(x2)[:, rows]
        packed, sz, n = self.packed, self.scales_zeros, self.out_features
        if rows is not None:
            packed, sz, n = packed[rows.start // 8 : rows.stop // 8], sz[:, rows].contiguous(), rows.stop - rows.start
        if self.unpack_prefill and x2.shape[0] > 16:
            from backends.llm.int4_prefill import unpack

            return x2 @ unpack(packed, sz, n, self.in_features, self.group).T
        return torch.ops.aten._weight_int4pack_mm(x2.contiguous(), packed, self.group, sz)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x.reshape(-1, self.in_features).to(self.scales_zeros.dtype))
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, group={self.group}, parts={self.parts}"


def quantize_packed(w: torch.Tensor, group: int, hqq_iters: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(packed weight, scales_zeros (K/group, N, 2)) for the device of `w`. On CUDA each chunk of rows is packed
    as it is quantised (the layout is made of 8-row tiles), so the int32 temporaries never cover a whole 128k-row
    head; the CPU layout is packed in one piece."""
    n, k = w.shape
    rows = max(8, (1 << 25) // k // 8 * 8)
    packs, scales, zeros = [], [], []
    for i in range(0, n, rows):
        q, s, z = _quantize_rows(w[i : i + rows], group, hqq_iters)
        packs.append(_pack_cuda(q, _k_tiles(k)) if w.is_cuda else q.to(torch.uint8))
        scales.append(s)
        zeros.append(z)
    packed = torch.cat(packs)
    if not w.is_cuda:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(packed.to(torch.int32), _k_tiles(k))
    sz = torch.stack([torch.cat(scales), torch.cat(zeros)], -1).transpose(0, 1).contiguous().to(dtype)
    return packed, sz


def _pack_cuda(q: torch.Tensor, k_tiles: int) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), k_tiles)


@functools.cache
def _cuda_rows_sliceable(device: torch.device) -> bool:
    """Once per device: does slicing the CUDA tile layout by 8-row tiles give the same rows as the full matmul?"""
    q = torch.randint(0, 16, (64, 256), device=device, dtype=torch.int32)
    packed = _pack_cuda(q, 8)
    sz = (torch.rand((2, 64, 2), device=device) * 0.1).to(torch.bfloat16)
    x = torch.randn(3, 256, device=device, dtype=torch.bfloat16)
    full = torch.ops.aten._weight_int4pack_mm(x, packed, 128, sz)
    part = torch.ops.aten._weight_int4pack_mm(x, packed[2:6], 128, sz[:, 16:48].contiguous())
    ok = torch.allclose(full[:, 16:48].float(), part.float(), rtol=1e-2, atol=1e-2)
    if not ok:
        log.warning("int4 tile layout is not row-sliceable on %s: parts run the fused matmul", device)
    return ok


class Int4Part(nn.Module):
    """Rows [start, stop) of a fused Int4Linear, under the original name (q_proj, ...). Owns no tensors."""

    def __init__(self, fused: Int4Linear, start: int, stop: int) -> None:
        super().__init__()
        object.__setattr__(self, "fused", fused)  # not a submodule: the tensors belong to the fused module
        self.rows = slice(start, stop)
        self.in_features, self.out_features = fused.in_features, stop - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.fused
        y = f.matmul(x.reshape(-1, self.in_features).to(f.scales_zeros.dtype), self.rows)
        return y.reshape(*x.shape[:-1], self.out_features)


def weight_format(model: Any) -> str:
    """ "int4", "nf4" or the dtype name: what the Chat tab and the model info show."""
    for m in model.modules():
        if isinstance(m, Int4Linear):
            return "int4"
        if type(m).__name__ == "Linear4bit":
            return "nf4"
    return str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")


# ---- building and loading -------------------------------------------------------------------------------------
def meta_model(config: Any, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")


def _targets(model: Any, quantize_head: bool) -> dict[str, tuple[nn.Module, str, tuple[str, ...]]]:
    """Checkpoint key of each member weight -> (parent module, fused name, member names)."""
    out: dict[str, tuple[nn.Module, str, tuple[str, ...]]] = {}
    for name, parent in model.named_modules():
        for fused, members in [*FUSED.items(), *((s, (s,)) for s in SINGLE)]:
            if all(isinstance(getattr(parent, m, None), nn.Linear) for m in members):
                for m in members:
                    out[f"{name}.{m}.weight"] = (parent, fused, members)
    if quantize_head:
        out["lm_head.weight"] = (model, "lm_head", ("lm_head",))
    return out


def _set_tensor(model: Any, key: str, t: torch.Tensor) -> None:
    mod_name, _, attr = key.rpartition(".")
    mod = model.get_submodule(mod_name)
    if attr in mod._parameters:
        setattr(mod, attr, nn.Parameter(t, requires_grad=False))
    else:
        mod._buffers[attr] = t


@torch.no_grad()
def quantize_stream(model: Any, tensors: Iterator[tuple[str, torch.Tensor]], device: str, dtype: torch.dtype,
                    *, quantize_head: bool = True, hqq_iters: int = 20) -> Any:  # fmt: skip
    """Fill a meta-device model from (checkpoint key, tensor) pairs, quantising each linear group on arrival."""
    targets = _targets(model, quantize_head)
    pending: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    seen: set[str] = set()
    for key, t in tensors:
        t = t.to(device=device, dtype=dtype)
        seen.add(key)
        if key not in targets:
            _set_tensor(model, key, t)
            continue
        parent, fused, members = targets[key]
        group = pending.setdefault((id(parent), fused), {})
        group[key.rsplit(".", 2)[-2]] = t
        if len(group) == len(members):
            _install(parent, fused, members, [group[m] for m in members], dtype, hqq_iters)
            del pending[(id(parent), fused)]
    if quantize_head and "lm_head.weight" not in seen and model.config.tie_word_embeddings:
        emb = model.get_input_embeddings().weight
        _install(model, "lm_head", ("lm_head",), [emb], dtype, hqq_iters)
    elif not quantize_head and "lm_head.weight" not in seen:
        model.lm_head.weight = model.get_input_embeddings().weight
    if pending:
        raise ValueError(f"checkpoint is missing parts of {len(pending)} linear groups")
    model.config.tie_word_embeddings = False  # the head, if quantised, is its own int4 tensor now
    _finish(model, device)
    return model


def _install(parent: nn.Module, fused: str, members: tuple[str, ...], weights: list[torch.Tensor],
             dtype: torch.dtype, hqq_iters: int) -> None:  # fmt: skip
    w = torch.cat(weights) if len(weights) > 1 else weights[0]
    lin = Int4Linear.from_dense(w, tuple(x.shape[0] for x in weights), dtype, hqq_iters)
    del w, weights
    if members == (fused,):
        setattr(parent, fused, lin)
        return
    setattr(parent, fused, lin)
    start = 0
    for m, width in zip(members, lin.parts, strict=True):
        setattr(parent, m, Int4Part(lin, start, start + width))
        start += width


def _finish(model: Any, device: str) -> None:
    """Rebuild the non-persistent buffers (rotary frequencies) on the device; refuse anything left on meta."""
    for module in model.modules():
        if hasattr(module, "inv_freq") and module.inv_freq.device.type == "meta":
            with torch.device(device):
                fresh = type(module)(config=model.config)
            for name, buf in fresh.named_buffers(recurse=False):
                module._buffers[name] = buf
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise ValueError(f"checkpoint lacks {len(left)} tensors, e.g. {left[:3]}")
    model.eval()


def safetensors_stream(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a checkpoint folder, one at a time, read on the CPU."""
    from safetensors import safe_open

    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
                yield key, fh.get_tensor(key)


def load_int4_causal_lm(folder: Path, device: str, *, dtype: torch.dtype = torch.bfloat16,
                        quantize_head: bool = True, hqq_iters: int = 20) -> Any:  # fmt: skip
    """A transformers Llama model from a bf16/fp32 safetensors folder, quantised to int4 while loading."""
    from transformers import AutoConfig, GenerationConfig

    t0 = time.perf_counter()
    config = AutoConfig.from_pretrained(folder)
    reason = config_supported(config)
    if reason:
        raise ValueError(f"int4 does not support {reason}")
    model = quantize_stream(meta_model(config, dtype), safetensors_stream(folder), device, dtype,
                            quantize_head=quantize_head, hqq_iters=hqq_iters)  # fmt: skip
    if (Path(folder) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    log.info("loaded %s as int4 on %s in %.2f s", Path(folder).name, device, time.perf_counter() - t0)
    return model


def int4_bytes(model: Any) -> int:
    """Bytes of every tensor of the model (int4 packs, scales, the rest) as it sits on its device."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
