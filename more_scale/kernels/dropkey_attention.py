"""Fused DropKey attention in Triton: softmax(QK^T / sqrt(d) + M) V with M_ij = -inf with probability p,
the mask drawn inside the tile loop and never written to memory.

Flash-attention-2 style: the forward walks key tiles with an online softmax (O(N) memory) and keeps
the row log-sum-exp; the backward recomputes the tiles, once per key tile for dK and dV and once per
query tile for dQ (two kernels, no atomics: deterministic). The keep decision for logit (b, h, i, j) is

    keep = uniform(philox(seed; c0 = j, c1 = i, c2 = b * H + h, c3 = offset)) >= p

with Triton's Philox4x32-10 and its uint -> [0, 1) conversion, regenerated identically in the backward.
`keep_mask` below computes the same mask in plain torch (for the math reference in tests). As in
`models.attention.drop_key_mask`, a row that lost every key keeps them all (its softmax would be 0/0):
the forward notices such rows (their running sum stayed 0), redoes them unmasked, and flags them for
the backward.

Shapes: q, k, v (B, H, N, D), any strides, N any length (ragged last tile masked), D a power of two in
16..128; fp32, bf16, fp16 (fp32 products in IEEE precision, no TF32). Runs on CUDA, or on the CPU under
Triton's interpreter (TRITON_INTERPRET=1 set before this module is imported), which is how CI tests it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): exp2 is the fast instruction
_U32 = 0xFFFFFFFF
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_UNIFORM_SCALE = 4.6566127342e-10  # Triton's: the largest x with 2^31 * x < 1 in fp32


@triton.jit
def _mma(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. IEEE: fp32 inputs multiplied exactly (no TF32). UPCAST: inputs taken to
    fp32 first (Triton's CPU interpreter multiplies bf16 as raw bits; on a GPU this is off)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _keep(seed, offset, bh, rows, cols, p):
    """(BLOCK_M, BLOCK_N) keep decisions of DropKey for query `rows` x key `cols` of slice `bh`."""
    zero = (rows[:, None] * 0 + cols[None, :] * 0).to(tl.uint32)
    c0 = zero + cols[None, :].to(tl.uint32)
    c1 = zero + rows[:, None].to(tl.uint32)
    c2 = zero + bh.to(tl.uint32)
    c3 = zero + offset.to(tl.uint32)
    r0, _, _, _ = tl.philox(seed, c0, c1, c2, c3)
    return tl.uint_to_uniform_float(r0) >= p


@triton.jit
def _fwd_kernel(Q, K, V, OUT, LSE, ALL_DROPPED, seed, offset, p, scale, N,
                sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, H,
                D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DROP: tl.constexpr,
                IEEE: tl.constexpr, UPCAST: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + dims[None, :], mask=rows[:, None] < N, other=0.0)
    qk_scale = scale * LOG2E
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(K + b * skb + h * skh + cols[:, None] * skn + dims[None, :], mask=cols[:, None] < N, other=0.0)
        v = tl.load(V + b * svb + h * svh + cols[:, None] * svn + dims[None, :], mask=cols[:, None] < N, other=0.0)
        s = _mma(q, tl.trans(k), IEEE, UPCAST) * qk_scale
        valid = cols[None, :] < N
        if DROP:
            valid = valid & _keep(seed, offset, bh, rows, cols, p)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing kept so far
        probs = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(tl.where(m == float("-inf"), float("-inf"), m - m_safe))
        row_sum = row_sum * alpha + tl.sum(probs, 1)
        acc = acc * alpha[:, None] + _mma(probs.to(v.dtype), v, IEEE, UPCAST)
        m = m_new
    dropped_all = (row_sum == 0.0) & (rows < N)
    if DROP:
        if tl.max(dropped_all.to(tl.int32), 0) > 0:  # rare: redo this tile's rows without DropKey, keep those rows
            m2 = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l2 = tl.zeros([BLOCK_M], tl.float32)
            acc2 = tl.zeros([BLOCK_M, D], tl.float32)
            for start_n in range(0, N, BLOCK_N):
                cols = start_n + tl.arange(0, BLOCK_N)
                k = tl.load(K + b * skb + h * skh + cols[:, None] * skn + dims[None, :], mask=cols[:, None] < N,
                            other=0.0)
                v = tl.load(V + b * svb + h * svh + cols[:, None] * svn + dims[None, :], mask=cols[:, None] < N,
                            other=0.0)
                s = _mma(q, tl.trans(k), IEEE, UPCAST) * qk_scale
                s = tl.where(cols[None, :] < N, s, float("-inf"))
                m_new = tl.maximum(m2, tl.max(s, 1))
                probs = tl.exp2(s - m_new[:, None])
                alpha = tl.exp2(m2 - m_new)
                l2 = l2 * alpha + tl.sum(probs, 1)
                acc2 = acc2 * alpha[:, None] + _mma(probs.to(v.dtype), v, IEEE, UPCAST)
                m2 = m_new
            m = tl.where(dropped_all, m2, m)
            row_sum = tl.where(dropped_all, l2, row_sum)
            acc = tl.where(dropped_all[:, None], acc2, acc)
    l_safe = tl.where(row_sum == 0.0, 1.0, row_sum)
    out = acc / l_safe[:, None]
    tl.store(OUT + b * sob + h * soh + rows[:, None] * son + dims[None, :], out.to(OUT.dtype.element_ty),
             mask=rows[:, None] < N)
    tl.store(LSE + bh * N + rows, m + tl.log2(l_safe), mask=rows < N)  # log2 units, as the tiles
    tl.store(ALL_DROPPED + bh * N + rows, dropped_all.to(tl.int8), mask=rows < N)


@triton.jit
def _tile_probs(q, k, lse, flags, seed, offset, p, bh, rows, cols, N, qk_scale,
                DROP: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """The forward's probabilities of one (query tile, key tile), recomputed from the saved LSE."""
    s = _mma(q, tl.trans(k), IEEE, UPCAST) * qk_scale
    valid = (cols[None, :] < N) & (rows[:, None] < N)
    if DROP:
        valid = valid & (_keep(seed, offset, bh, rows, cols, p) | (flags[:, None] != 0))
    return tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, ALL_DROPPED, DK, DV, seed, offset, p, scale, N,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn, H,
                     D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DROP: tl.constexpr,
                     IEEE: tl.constexpr, UPCAST: tl.constexpr):
    start_n = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    cols = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, D)
    k = tl.load(K + b * skb + h * skh + cols[:, None] * skn + dims[None, :], mask=cols[:, None] < N, other=0.0)
    v = tl.load(V + b * svb + h * svh + cols[:, None] * svn + dims[None, :], mask=cols[:, None] < N, other=0.0)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    qk_scale = scale * LOG2E
    for start_m in range(0, N, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        in_rows = rows[:, None] < N
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + dims[None, :], mask=in_rows, other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdn + dims[None, :], mask=in_rows, other=0.0)
        lse = tl.load(LSE + bh * N + rows, mask=rows < N, other=0.0)
        delta = tl.load(DELTA + bh * N + rows, mask=rows < N, other=0.0)
        flags = tl.load(ALL_DROPPED + bh * N + rows, mask=rows < N, other=0)
        probs = _tile_probs(q, k, lse, flags, seed, offset, p, bh, rows, cols, N, qk_scale, DROP, IEEE, UPCAST)
        dv += _mma(tl.trans(probs).to(do.dtype), do, IEEE, UPCAST)
        dp = _mma(do, tl.trans(v), IEEE, UPCAST)
        ds = probs * (dp - delta[:, None])  # d loss / d logit (natural units)
        dk += _mma(tl.trans(ds).to(q.dtype), q, IEEE, UPCAST)
    out_mask = cols[:, None] < N
    at = b * sgb + h * sgh + cols[:, None] * sgn + dims[None, :]  # the gradients' own (contiguous) layout
    tl.store(DK + at, (dk * scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + at, dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, ALL_DROPPED, DQ, seed, offset, p, scale, N,
                   sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn, H,
                   D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DROP: tl.constexpr,
                   IEEE: tl.constexpr, UPCAST: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D)
    in_rows = rows[:, None] < N
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + dims[None, :], mask=in_rows, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdn + dims[None, :], mask=in_rows, other=0.0)
    lse = tl.load(LSE + bh * N + rows, mask=rows < N, other=0.0)
    delta = tl.load(DELTA + bh * N + rows, mask=rows < N, other=0.0)
    flags = tl.load(ALL_DROPPED + bh * N + rows, mask=rows < N, other=0)
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    qk_scale = scale * LOG2E
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(K + b * skb + h * skh + cols[:, None] * skn + dims[None, :], mask=cols[:, None] < N, other=0.0)
        v = tl.load(V + b * svb + h * svh + cols[:, None] * svn + dims[None, :], mask=cols[:, None] < N, other=0.0)
        probs = _tile_probs(q, k, lse, flags, seed, offset, p, bh, rows, cols, N, qk_scale, DROP, IEEE, UPCAST)
        dp = _mma(do, tl.trans(v), IEEE, UPCAST)
        ds = probs * (dp - delta[:, None])
        dq += _mma(ds.to(k.dtype), k, IEEE, UPCAST)
    tl.store(DQ + b * sgb + h * sgh + rows[:, None] * sgn + dims[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=in_rows)


def _tiles(d: int, n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, warps): 64 x 64 tiles (32-wide keys at D=128, to stay in registers); smaller for
    short sequences so a 99-token DropToken sequence is not padded to 128."""
    block = 64 if n > 32 else max(16, triton.next_power_of_2(n))
    return block, (32 if d >= 128 else block), 4


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.shape != k.shape or q.shape != v.shape or q.dim() != 4:
        raise ValueError(f"triton_dropkey: q, k, v must share one (B, H, N, D) shape, got {q.shape}, {k.shape}, {v.shape}")
    d = q.shape[-1]
    if d not in (16, 32, 64, 128):
        raise ValueError(f"triton_dropkey: head dim {d} not supported (16, 32, 64 or 128)")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16) or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"triton_dropkey: dtypes {q.dtype}, {k.dtype}, {v.dtype} (one of fp32, bf16, fp16)")


def _upcast(q: torch.Tensor) -> bool:
    return q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def _contiguous_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class DropKeyAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, p: float, seed: int, offset: int):
        _check(q, k, v)
        q, k, v = (_contiguous_last(t) for t in (q, k, v))
        b, h, n, d = q.shape
        out = torch.empty_like(q)
        lse = torch.empty((b * h, n), device=q.device, dtype=torch.float32)
        dropped_all = torch.empty((b * h, n), device=q.device, dtype=torch.int8)
        block_m, block_n, warps = _tiles(d, n)
        grid = (triton.cdiv(n, block_m), b * h)
        _fwd_kernel[grid](q, k, v, out, lse, dropped_all, seed, offset, float(p), d ** -0.5, n,
                          *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], h,
                          D=d, BLOCK_M=block_m, BLOCK_N=block_n, DROP=p > 0, IEEE=q.dtype == torch.float32,
                          UPCAST=_upcast(q), num_warps=warps)
        ctx.save_for_backward(q, k, v, out, lse, dropped_all)
        ctx.p, ctx.seed, ctx.offset = p, seed, offset
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, dropped_all = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        b, h, n, d = q.shape
        delta = (grad_out.float() * out.float()).sum(-1).reshape(b * h, n)  # rowsum(dO * O)
        # contiguous gradients (empty_like of a strided q/k/v view may not share its strides)
        dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
        block_m, block_n, warps = _tiles(d, n)
        common = dict(D=d, BLOCK_M=block_m, BLOCK_N=block_n, DROP=ctx.p > 0, IEEE=q.dtype == torch.float32,
                      UPCAST=_upcast(q), num_warps=warps)
        strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3], *dq.stride()[:3], h)
        _bwd_dkdv_kernel[(triton.cdiv(n, block_n), b * h)](
            q, k, v, grad_out, lse, delta, dropped_all, dk, dv, ctx.seed, ctx.offset, float(ctx.p), d ** -0.5, n,
            *strides, **common)
        _bwd_dq_kernel[(triton.cdiv(n, block_m), b * h)](
            q, k, v, grad_out, lse, delta, dropped_all, dq, ctx.seed, ctx.offset, float(ctx.p), d ** -0.5, n,
            *strides, **common)
        return dq, dk, dv, None, None, None


def dropkey_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float, seed: int,
                      offset: int = 0) -> torch.Tensor:
    """(B, H, N, D) x3 -> (B, H, N, D): attention with DropKey rate `p` drawn from (seed, offset)."""
    return DropKeyAttention.apply(q, k, v, p, seed, offset)


# --- the same mask in plain torch --------------------------------------------------------------------

def _umulhi_lo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * b for uint32 values held in int64 (16-bit limbs: no int64 overflow)."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    a_hi, a_lo = a >> 16, a & 0xFFFF
    low = a_lo * b_lo
    mid = a_hi * b_lo + a_lo * b_hi + (low >> 16)
    hi = a_hi * b_hi + (mid >> 16)
    lo = ((mid & 0xFFFF) << 16) | (low & 0xFFFF)
    return hi & _U32, lo & _U32


def philox_uniform(seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor) -> torch.Tensor:
    """Triton's tl.philox (Philox4x32-10) first output, through tl.uint_to_uniform_float: fp32 in [0, 1)."""
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & _U32 for c in (c0, c1, c2, c3))
    for _ in range(10):
        hi_b, lo_b = _umulhi_lo(c2, _PHILOX_ROUND_B)
        hi_a, lo_a = _umulhi_lo(c0, _PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _U32, (k1 + _PHILOX_KEY_B) & _U32
    signed = torch.where(c0 >= 2**31, c0 - 2**32, c0).to(torch.int32)
    signed = torch.where(signed < 0, ~signed, signed)
    return signed.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def keep_mask(seed: int, offset: int, shape: tuple[int, int, int, int], p: float,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """The kernel's boolean keep-mask (B, H, N, N) for (seed, offset), rows that lost every key kept whole."""
    b, h, n, n_keys = shape
    bh = torch.arange(b * h, device=device).view(b, h, 1, 1)
    rows = torch.arange(n, device=device).view(1, 1, n, 1)
    cols = torch.arange(n_keys, device=device).view(1, 1, 1, n_keys)
    grid = torch.zeros(shape, dtype=torch.int64, device=device)
    keep = philox_uniform(seed, grid + cols, grid + rows, grid + bh, grid + offset) >= torch.tensor(p, dtype=torch.float32)
    return keep | ~keep.any(dim=-1, keepdim=True)


def new_seed(generator: torch.Generator | None = None) -> int:
    """A 62-bit kernel seed from torch's CPU generator: no device sync, replayed by activation
    checkpointing (which restores the CPU RNG state) and by a resume that restores RNG states."""
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())

