"""The small ops of a Llama decode step, fused: Triton kernels for CUDA and plain torch twins for everything else.

Each op exists twice with the same signature and the same rounding points as transformers' Llama (bf16 results
where transformers rounds to bf16): `TorchOps` (any device, the reference) and `TritonOps` (CUDA, one kernel each):
- `add_rmsnorm(x, delta, w, eps)`: x += delta in place (the residual add), then RMSNorm(x) * w -> (x, h);
- `rope_cache(qkv, cos, sin, pos, k_cache, v_cache, n_heads, n_kv)`: rotary embedding of q and k (rotate-half
  form) from the (max_len, head_dim) cos/sin tables at positions `pos`, k and v written into the cache slots `pos`,
  q returned as (tokens, n_heads, head_dim);
- `silu_mul(gu)`: silu(gate) * up of a fused (tokens, 2*I) gate/up output;
- `attend(q, k_cache, v_cache, pos)`: one query token over cache slots 0..pos (split over the cache in chunks,
  flash-decoding style, then combined: the work follows the position, not the cache size).
`pick_ops(device)` checks the Triton kernels against the torch twins once on random inputs and falls back (with
the reason logged) if they fail to compile or disagree.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


class TorchOps:
    name = "torch"

    @staticmethod
    def add_rmsnorm(x: torch.Tensor, delta: torch.Tensor | None, w: torch.Tensor, eps: float):
        if delta is not None:
            x = x + delta
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return x, w * h.to(x.dtype)

    @staticmethod
    def rope_cache(qkv, cos, sin, pos, k_cache, v_cache, n_heads: int, n_kv: int) -> torch.Tensor:
        d = cos.shape[-1]
        m = qkv.shape[0]
        q, k, v = qkv.split([n_heads * d, n_kv * d, n_kv * d], -1)
        c, s = cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)  # (M, 1, d)
        q = _rotate(q.reshape(m, n_heads, d), c, s)
        k = _rotate(k.reshape(m, n_kv, d), c, s)
        k_cache.index_copy_(1, pos, k.transpose(0, 1))
        v_cache.index_copy_(1, pos, v.reshape(m, n_kv, d).transpose(0, 1))
        return q

    @staticmethod
    def silu_mul(gu: torch.Tensor) -> torch.Tensor:
        g, u = gu.chunk(2, -1)
        return F.silu(g) * u

    @staticmethod
    def attend(q, k_cache, v_cache, pos, slots: torch.Tensor) -> torch.Tensor:
        """q (1, H, d) over caches (n_kv, L, d): the query heads of one kv head act as queries of one sequence."""
        n_kv, _, d = k_cache.shape
        qg = q.view(1, n_kv, -1, d)
        mask = (slots <= pos).view(1, 1, 1, -1)
        out = F.scaled_dot_product_attention(qg, k_cache.unsqueeze(0), v_cache.unsqueeze(0), attn_mask=mask)
        return out.reshape(1, -1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat((-x2, x1), -1) * sin


if triton is not None:

    @triton.jit
    def _add_rmsnorm_kernel(x_ptr, d_ptr, w_ptr, out_ptr, n, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        m = offs < n
        x = tl.load(x_ptr + row * n + offs, mask=m, other=0.0)
        if HAS_DELTA:
            dx = tl.load(d_ptr + row * n + offs, mask=m, other=0.0)
            x = (x.to(tl.float32) + dx.to(tl.float32)).to(x_ptr.dtype.element_ty)
            tl.store(x_ptr + row * n + offs, x, mask=m)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / n + eps)
        h = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n + offs, (h * w).to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _rope_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_ptr, v_ptr, row_stride, n_heads, n_kv,
                           max_len, HALF: tl.constexpr):  # fmt: skip
        t = tl.program_id(0)
        h = tl.program_id(1)
        pos = tl.load(pos_ptr + t)
        offs = tl.arange(0, HALF)
        src = qkv_ptr + t * row_stride + h * 2 * HALF
        x1 = tl.load(src + offs).to(tl.float32)
        x2 = tl.load(src + HALF + offs).to(tl.float32)
        rot = h < n_heads + n_kv
        tab = pos * 2 * HALF + offs
        rot = (offs < HALF) & (h < n_heads + n_kv)  # v heads: no rotation (cos 1, sin 0)
        c1 = tl.load(cos_ptr + tab, mask=rot, other=1.0).to(tl.float32)
        c2 = tl.load(cos_ptr + tab + HALF, mask=rot, other=1.0).to(tl.float32)
        s1 = tl.load(sin_ptr + tab, mask=rot, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + tab + HALF, mask=rot, other=0.0).to(tl.float32)
        o1 = (x1 * c1 - x2 * s1).to(q_ptr.dtype.element_ty)
        o2 = (x2 * c2 + x1 * s2).to(q_ptr.dtype.element_ty)
        is_q = (offs < HALF) & (h < n_heads)
        is_k = (offs < HALF) & (h >= n_heads) & (h < n_heads + n_kv)
        is_v = (offs < HALF) & (h >= n_heads + n_kv)
        q_dst = q_ptr + (t * n_heads + tl.minimum(h, n_heads - 1)) * 2 * HALF + offs
        kv = tl.minimum(tl.maximum(tl.where(h < n_heads + n_kv, h - n_heads, h - n_heads - n_kv), 0), n_kv - 1)
        c_off = (kv * max_len + pos) * 2 * HALF + offs
        tl.store(q_dst, o1, mask=is_q)
        tl.store(q_dst + HALF, o2, mask=is_q)
        tl.store(k_ptr + c_off, o1, mask=is_k)
        tl.store(k_ptr + c_off + HALF, o2, mask=is_k)
        tl.store(v_ptr + c_off, o1, mask=is_v)
        tl.store(v_ptr + c_off + HALF, o2, mask=is_v)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, n, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        g = tl.load(gu_ptr + row * 2 * n + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * 2 * n + n + offs, mask=m, other=0.0).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * n + offs, (act * u).to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _attend_split_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, m_ptr, l_ptr, max_len, chunk, scale,
                             N_REP: tl.constexpr, REP_PAD: tl.constexpr, D: tl.constexpr,
                             BLOCK_N: tl.constexpr, N_SPLIT: tl.constexpr):  # fmt: skip
        kvh = tl.program_id(0)
        split = tl.program_id(1)
        n_valid = tl.load(pos_ptr) + 1
        start = split * chunk
        end = tl.minimum(start + chunk, n_valid)
        rows = tl.arange(0, REP_PAD)
        d = tl.arange(0, D)
        q = tl.load(q_ptr + (kvh * N_REP + rows)[:, None] * D + d[None, :], mask=rows[:, None] < N_REP, other=0.0)
        m_i = tl.full((REP_PAD,), float("-inf"), tl.float32)
        l_i = tl.zeros((REP_PAD,), tl.float32)
        acc = tl.zeros((REP_PAD, D), tl.float32)
        for n0 in range(start, end, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            valid = cols < end
            kv_off = (kvh * max_len + cols)[:, None] * D + d[None, :]
            k = tl.load(k_ptr + kv_off, mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            v = tl.load(v_ptr + kv_off, mask=valid[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
        part = (kvh * N_SPLIT + split) * REP_PAD + rows
        tl.store(o_ptr + part[:, None] * D + d[None, :], acc)
        tl.store(m_ptr + part, m_i)
        tl.store(l_ptr + part, l_i)

    @triton.jit
    def _attend_combine_kernel(o_ptr, m_ptr, l_ptr, out_ptr, N_REP: tl.constexpr, REP_PAD: tl.constexpr,
                               D: tl.constexpr, N_SPLIT: tl.constexpr):  # fmt: skip
        kvh = tl.program_id(0)
        r = tl.program_id(1)
        s = tl.arange(0, N_SPLIT)
        d = tl.arange(0, D)
        part = (kvh * N_SPLIT + s) * REP_PAD + r
        m = tl.load(m_ptr + part)
        w = tl.exp(m - tl.max(m, 0))  # splits past the position hold m = -inf: weight 0
        total = tl.sum(w * tl.load(l_ptr + part), 0)
        o = tl.load(o_ptr + part[:, None] * D + d[None, :])
        out = tl.sum(o * w[:, None], 0) / total
        tl.store(out_ptr + (kvh * N_REP + r) * D + d, out.to(out_ptr.dtype.element_ty))


class TritonOps:
    """The same ops as TorchOps, one Triton kernel each (attention: a split pass and a combine pass)."""

    name = "triton"
    n_split = 16
    block_n = 32

    @staticmethod
    def add_rmsnorm(x, delta, w, eps: float):
        n = x.shape[-1]
        out = torch.empty_like(x)
        _add_rmsnorm_kernel[(x.numel() // n,)](x, x if delta is None else delta, w, out, n, eps,
                                               HAS_DELTA=delta is not None, BLOCK=triton.next_power_of_2(n),
                                               num_warps=8)  # fmt: skip
        return x, out

    @staticmethod
    def rope_cache(qkv, cos, sin, pos, k_cache, v_cache, n_heads: int, n_kv: int) -> torch.Tensor:
        d = cos.shape[-1]
        m = qkv.shape[0]
        q = torch.empty((m, n_heads, d), dtype=qkv.dtype, device=qkv.device)
        _rope_cache_kernel[(m, n_heads + 2 * n_kv)](qkv, cos, sin, pos, q, k_cache, v_cache, qkv.stride(0), n_heads,
                                                    n_kv, k_cache.shape[1], HALF=d // 2)  # fmt: skip
        return q

    @staticmethod
    def silu_mul(gu: torch.Tensor) -> torch.Tensor:
        n = gu.shape[-1] // 2
        out = torch.empty((*gu.shape[:-1], n), dtype=gu.dtype, device=gu.device)
        block = 1024
        _silu_mul_kernel[(gu.numel() // (2 * n), triton.cdiv(n, block))](gu, out, n, BLOCK=block)
        return out

    @classmethod
    def attend(cls, q, k_cache, v_cache, pos, slots: torch.Tensor) -> torch.Tensor:
        n_kv, max_len, d = k_cache.shape
        n_rep = q.shape[1] // n_kv
        rep_pad = max(16, triton.next_power_of_2(n_rep))
        chunk = triton.cdiv(triton.cdiv(max_len, cls.n_split), cls.block_n) * cls.block_n
        shape = (n_kv, cls.n_split, rep_pad)
        o = torch.empty((*shape, d), dtype=torch.float32, device=q.device)
        m = torch.empty(shape, dtype=torch.float32, device=q.device)
        l_ = torch.empty(shape, dtype=torch.float32, device=q.device)
        _attend_split_kernel[(n_kv, cls.n_split)](q, k_cache, v_cache, pos, o, m, l_, max_len, chunk,
                                                  1.0 / math.sqrt(d), N_REP=n_rep, REP_PAD=rep_pad, D=d,
                                                  BLOCK_N=cls.block_n, N_SPLIT=cls.n_split)  # fmt: skip
        out = torch.empty((1, q.shape[1] * d), dtype=q.dtype, device=q.device)
        _attend_combine_kernel[(n_kv, n_rep)](o, m, l_, out, N_REP=n_rep, REP_PAD=rep_pad, D=d, N_SPLIT=cls.n_split)
        return out


def check_ops(ops: type, device: str | torch.device, dtype: torch.dtype = torch.bfloat16, *, n_heads: int = 8,
              n_kv: int = 2, d: int = 64, width: int = 512, max_len: int = 300) -> float:  # fmt: skip
    """Largest relative difference between `ops` and TorchOps over every op on fresh random inputs."""
    g = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**31, ()).item()))

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g, device=device).to(dtype)

    worst = 0.0

    def cmp(a: torch.Tensor, b: torch.Tensor) -> None:
        nonlocal worst
        worst = max(worst, ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-6)).item())

    x, dx, w = rnd(3, width), rnd(3, width), rnd(width)
    for delta in (None, dx):
        xa, ha = ops.add_rmsnorm(x.clone(), delta, w, 1e-5)
        xb, hb = TorchOps.add_rmsnorm(x.clone(), delta, w, 1e-5)
        cmp(xa, xb)
        cmp(ha, hb)
    gu = rnd(3, 2 * width)
    cmp(ops.silu_mul(gu), TorchOps.silu_mul(gu))
    qkv, cos, sin = rnd(3, (n_heads + 2 * n_kv) * d), rnd(max_len, d), rnd(max_len, d)
    pos = torch.tensor([5, 6, max_len - 1], device=device)
    caches = [rnd(n_kv, max_len, d) for _ in range(2)]
    caches_ref = [c.clone() for c in caches]
    cmp(ops.rope_cache(qkv, cos, sin, pos, *caches, n_heads, n_kv),
        TorchOps.rope_cache(qkv, cos, sin, pos, *caches_ref, n_heads, n_kv))  # fmt: skip
    cmp(caches[0], caches_ref[0])
    cmp(caches[1], caches_ref[1])
    slots = torch.arange(max_len, device=device)
    q = rnd(1, n_heads, d)
    for p in (0, 37, max_len - 1):
        at = torch.tensor([p], device=device)
        cmp(ops.attend(q, *caches, at, slots), TorchOps.attend(q, *caches, at, slots))
    return worst


def pick_ops(device: torch.device, dtype: torch.dtype) -> tuple[type, str]:
    """TritonOps on CUDA when they compile and agree with TorchOps (rel. error < 2e-2), else TorchOps; + reason."""
    if device.type != "cuda" or triton is None:
        return TorchOps, "torch ops (no CUDA/Triton)"
    try:
        err = check_ops(TritonOps, device, dtype)
    except Exception as e:  # a kernel that does not compile on this card/toolchain: keep decoding without it
        log.warning("Triton decode kernels unavailable (%s: %s); using torch ops", type(e).__name__, e)
        return TorchOps, f"torch ops (Triton failed: {type(e).__name__})"
    if err > 2e-2:
        log.warning("Triton decode kernels disagree with torch (rel. error %.3g); using torch ops", err)
        return TorchOps, f"torch ops (Triton rel. error {err:.2g})"
    return TritonOps, f"triton ops (rel. error {err:.1e})"
