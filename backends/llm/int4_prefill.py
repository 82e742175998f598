"""Fast prefill for int4 linears on CUDA: unpack the tinygemm tile layout to bf16 with one Triton kernel, then
let cuBLAS do the (tokens x K) @ W.T product.

tinygemm (`_weight_int4pack_mm`) is built for a few rows; for a 4,096-token prompt it runs at ~33 TFLOP/s on an
H200, so prompts of more than `DEQUANT_ABOVE_ROWS` tokens unpack each weight into a scratch bf16 matrix first (read
0.5 byte + write 2 bytes per weight: ~5 ms for an 8B model) and run the bf16 GEMM (several hundred TFLOP/s).

The tile layout is not documented, so it is read off the packing op itself, once per card and tile width: an
(8 x 16*k_tiles) tile of known values is packed three times (4 bits of each position's index per pass), which
gives, for every position of a tile, the int32 word and nibble that holds it. Tiles are laid out as the packed
tensor's shape says, (N/8, K/(16*k_tiles), 32, k_tiles/2). `dequant_ok` checks the whole path against tinygemm on
random data before it is used; if the check fails, prefill stays on tinygemm (the log says why).
"""

from __future__ import annotations

import functools
import logging

import torch

from backends.llm.kernels import triton

log = logging.getLogger(__name__)
DEQUANT_ABOVE_ROWS = 16

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _unpack_kernel(p_ptr, map_ptr, sz_ptr, w_ptr, n, k, k_tiles_per_row, group, TILE_K: tl.constexpr,
                       BLOCK_N: tl.constexpr):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        tk = tl.program_id(1)
        c = tl.arange(0, TILE_K)
        ok = rows[:, None] < n
        slot = tl.load(map_ptr + (rows % 8)[:, None] * TILE_K + c[None, :])  # word * 8 + nibble within a tile
        word = ((rows // 8)[:, None] * k_tiles_per_row + tk) * TILE_K + slot // 8
        q = (tl.load(p_ptr + word, mask=ok, other=0) >> ((slot % 8) * 4)) & 15
        cols = tk * TILE_K + c
        sz = ((cols // group)[None, :] * n + rows[:, None]) * 2
        scale = tl.load(sz_ptr + sz, mask=ok, other=0.0).to(tl.float32)
        zero = tl.load(sz_ptr + sz + 1, mask=ok, other=0.0).to(tl.float32)
        w = (q.to(tl.float32) - 8.0) * scale + zero
        tl.store(w_ptr + rows[:, None] * k + cols[None, :], w.to(w_ptr.dtype.element_ty), mask=ok)


def _pack(q: torch.Tensor, k_tiles: int) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), k_tiles)


@functools.cache
def tile_map(device: torch.device, k_tiles: int) -> torch.Tensor:
    """(8 * 16*k_tiles,) int32: for each position (row-major) of one tile, word * 8 + nibble in the packed tile."""
    tile_k = 16 * k_tiles
    idx = torch.arange(8 * tile_k, device=device, dtype=torch.int32).view(8, tile_k)
    shifts = torch.arange(0, 32, 4, device=device, dtype=torch.int32)
    source = torch.zeros(8 * tile_k, device=device, dtype=torch.int32)
    for p in range(3):  # 4 bits of the position index per pass; 3 passes cover the 1,024 positions of a tile
        packed = _pack((idx >> (4 * p)) & 15, k_tiles)
        nibbles = (packed.reshape(-1, 1) >> shifts) & 15  # (words, 8): slot = word * 8 + nibble
        source |= nibbles.reshape(-1).to(torch.int32) << (4 * p)
    if not torch.equal(source.sort().values, idx.reshape(-1)):
        raise RuntimeError("the int4 pack layout is not a permutation of its tile")
    slots = torch.empty_like(source)
    slots[source.long()] = torch.arange(source.numel(), device=device, dtype=torch.int32)
    return slots


def unpack(packed: torch.Tensor, scales_zeros: torch.Tensor, n: int, k: int, group: int) -> torch.Tensor:
    """The (n, k) weight in the scales' dtype, from the CUDA tile layout."""
    k_tiles = packed.shape[-1] * 2
    tile_k = 16 * k_tiles
    w = torch.empty((n, k), dtype=scales_zeros.dtype, device=packed.device)
    block_n = 32
    _unpack_kernel[(triton.cdiv(n, block_n), k // tile_k)](packed, tile_map(packed.device, k_tiles), scales_zeros,
                                                           w, n, k, k // tile_k, group, TILE_K=tile_k,
                                                           BLOCK_N=block_n)  # fmt: skip
    return w


@functools.cache
def dequant_ok(device: torch.device, k_tiles: int) -> bool:
    """Once per card and tile width: does unpack + bf16 matmul reproduce tinygemm on random int4 data?"""
    if triton is None:
        return False
    n, k, group = 104, 4 * 16 * k_tiles, 128  # 13 row tiles (not a multiple of the kernel's 32 rows), 4 column tiles
    try:
        q = torch.randint(0, 16, (n, k), device=device, dtype=torch.int32)
        sz = (torch.rand((k // group, n, 2), device=device) * 0.1).to(torch.bfloat16)
        packed = _pack(q, k_tiles)
        x = torch.randn(40, k, device=device, dtype=torch.bfloat16)
        ref = torch.ops.aten._weight_int4pack_mm(x, packed, group, sz).float()
        got = (x @ unpack(packed, sz, n, k, group).T).float()
        err = ((got - ref).norm() / ref.norm()).item()
    except Exception as e:  # no Triton build for this card, or the layout probe failed: keep tinygemm
        log.warning("int4 prefill unpacking unavailable (%s: %s); prefill stays on tinygemm", type(e).__name__, e)
        return False
    if err > 1e-2:
        log.warning("int4 prefill unpacking disagrees with tinygemm (rel. error %.3g); not used", err)
    return err <= 1e-2
