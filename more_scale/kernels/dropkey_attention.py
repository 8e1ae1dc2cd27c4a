"""Fused DropKey attention in Triton: softmax(QK^T / sqrt(d) + M) V with M_ij = -inf with probability p,
the mask drawn inside the tile loop and never written to memory.

Flash-attention-2 style: the forward walks key tiles with an online softmax (O(N) memory) and keeps
the row log-sum-exp; the backward computes delta = rowsum(dO * O) in a small kernel, then recomputes the
tiles, once per key tile for dK and dV and once per query tile for dQ (two kernels, no atomics:
deterministic). The keep decision for logit (b, h, i, j) is

    keep = uniform(philox(seed; c0 = j, c1 = i, c2 = b * H + h, c3 = offset)) >= p

with Triton's Philox4x32-10 and its uint -> [0, 1) conversion, regenerated identically in the backward.
`keep_mask` below computes the same mask in plain torch (for the math reference in tests). As in
`models.attention.drop_key_mask`, a row that lost every key keeps them all (its softmax would be 0/0):
the forward notices such rows (their running sum stayed 0), redoes them unmasked, and flags them for
the backward.

Tiles: each kernel is tuned once per (N, D, dtype) on the GPU over a small candidate set (`candidates`,
triton.autotune; the choice is cached for the process). Tiles are powers of two, so the last one is
padded: 16-wide key tiles are among the candidates for short sequences (N 99 pads to 112, not 128;
N 197 to 208, not 256), and timing decides whether the padding costs more than narrow tiles do.
`more_scale.kernels.aot` compiles every candidate ahead of time for sm_80 / sm_90 on a machine
without a GPU (CI), and lists registers, spills and shared memory.

Shapes: q, k, v (B, H, N, D), any strides, N any length, D a power of two in 16..128; bf16 and fp16
(products in the input dtype, fp32 accumulation), fp32 with TF32 products (10-bit mantissa, as
torch's allow_tf32 matmuls; the `auto` backend never picks this kernel for fp32). Runs on CUDA, or on
the CPU under Triton's interpreter (TRITON_INTERPRET=1 set before this module is imported), which is how
CI tests its numbers; the interpreter multiplies fp32 exactly and does not time candidates (it takes
the first).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Globals read inside @triton.jit code must be tl.constexpr: compiled Triton refuses plain Python
# globals (the interpreter does not check; tests/test_kernel_compile.py does)
LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * log2(e)): exp2 is the fast instruction
HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_U32 = 0xFFFFFFFF
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_UNIFORM_SCALE = 4.6566127342e-10  # Triton's: the largest x with 2^31 * x < 1 in fp32
# seed and offset change at every call: specialising on their values (1, multiples of 16) would compile
# a kernel per value, and an offset of 1 would arrive as a Python constant without .to()
_NO_SPECIALIZE = ["seed", "offset"]


@triton.jit
def _mma(a, b, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation (fp32 inputs as TF32). UPCAST: inputs taken to fp32 first and multiplied
    exactly (Triton's CPU interpreter multiplies bf16 as raw bits; on a GPU this is off)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision="tf32")


@triton.jit
def _program(H):
    """(tile index, b * H + h, b, h) of this program: grid axis 0 tiles the sequence, axis 1 the (B, H) slices."""
    bh = tl.program_id(1)
    return tl.program_id(0), bh, bh // H, bh % H


@triton.jit
def _load_tile(PTR, base, idx, stride, dims, N):
    """(len(idx), D) rows `idx` of one (N, D) slice at PTR + base, rows past N read as 0."""
    return tl.load(PTR + base + idx[:, None] * stride + dims[None, :], mask=idx[:, None] < N, other=0.0)


@triton.jit
def _row_stats(LSE, DELTA, ALL_DROPPED, bh, rows, N):
    """What the backward reads per query row: the forward's LSE and all-dropped flag, and delta."""
    in_rows = rows < N
    at = bh * N + rows
    return (tl.load(LSE + at, mask=in_rows, other=0.0), tl.load(DELTA + at, mask=in_rows, other=0.0),
            tl.load(ALL_DROPPED + at, mask=in_rows, other=0))


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


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _fwd_kernel(Q, K, V, OUT, LSE, ALL_DROPPED, seed, offset, p, scale, N,
                sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, H,
                D: tl.constexpr, DROP: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, bh, b, h = _program(H)
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D)
    q = _load_tile(Q, b * sqb + h * sqh, rows, sqn, dims, N)
    qk_scale = scale * LOG2E
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K, b * skb + h * skh, cols, skn, dims, N)
        v = _load_tile(V, b * svb + h * svh, cols, svn, dims, N)
        s = _mma(q, tl.trans(k), UPCAST) * qk_scale
        valid = cols[None, :] < N
        if DROP:
            valid = valid & _keep(seed, offset, bh, rows, cols, p)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing kept so far
        probs = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(tl.where(m == float("-inf"), float("-inf"), m - m_safe))
        row_sum = row_sum * alpha + tl.sum(probs, 1)
        acc = acc * alpha[:, None] + _mma(probs.to(v.dtype), v, UPCAST)
        m = m_new
    dropped_all = (row_sum == 0.0) & (rows < N)
    if DROP:
        if tl.max(dropped_all.to(tl.int32), 0) > 0:  # rare: redo this tile's rows without DropKey, keep those rows
            m2 = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l2 = tl.zeros([BLOCK_M], tl.float32)
            acc2 = tl.zeros([BLOCK_M, D], tl.float32)
            for start_n in range(0, N, BLOCK_N):
                cols = start_n + tl.arange(0, BLOCK_N)
                k = _load_tile(K, b * skb + h * skh, cols, skn, dims, N)
                v = _load_tile(V, b * svb + h * svh, cols, svn, dims, N)
                s = _mma(q, tl.trans(k), UPCAST) * qk_scale
                s = tl.where(cols[None, :] < N, s, float("-inf"))
                m_new = tl.maximum(m2, tl.max(s, 1))
                probs = tl.exp2(s - m_new[:, None])
                alpha = tl.exp2(m2 - m_new)
                l2 = l2 * alpha + tl.sum(probs, 1)
                acc2 = acc2 * alpha[:, None] + _mma(probs.to(v.dtype), v, UPCAST)
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
def _delta_kernel(OUT, DO, DELTA, N, H, sob, soh, son, sdb, sdh, sdn, D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) in fp32, one (B * H, N) vector: no (B, H, N, D) fp32 temporaries."""
    start_m, bh, b, h = _program(H)
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D)
    o = _load_tile(OUT, b * sob + h * soh, rows, son, dims, N)
    do = _load_tile(DO, b * sdb + h * sdh, rows, sdn, dims, N)
    tl.store(DELTA + bh * N + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=rows < N)


@triton.jit
def _tile_probs(q, k, lse, flags, seed, offset, p, bh, rows, cols, N, qk_scale,
                DROP: tl.constexpr, UPCAST: tl.constexpr):
    """The forward's probabilities of one (query tile, key tile), recomputed from the saved LSE."""
    s = _mma(q, tl.trans(k), UPCAST) * qk_scale
    valid = (cols[None, :] < N) & (rows[:, None] < N)
    if DROP:
        valid = valid & (_keep(seed, offset, bh, rows, cols, p) | (flags[:, None] != 0))
    return tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, ALL_DROPPED, DK, DV, seed, offset, p, scale, N,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn, H,
                     D: tl.constexpr, DROP: tl.constexpr, UPCAST: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_n, bh, b, h = _program(H)
    cols = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, D)
    k = _load_tile(K, b * skb + h * skh, cols, skn, dims, N)
    v = _load_tile(V, b * svb + h * svh, cols, svn, dims, N)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    qk_scale = scale * LOG2E
    for start_m in range(0, N, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(Q, b * sqb + h * sqh, rows, sqn, dims, N)
        do = _load_tile(DO, b * sdb + h * sdh, rows, sdn, dims, N)
        lse, delta, flags = _row_stats(LSE, DELTA, ALL_DROPPED, bh, rows, N)
        probs = _tile_probs(q, k, lse, flags, seed, offset, p, bh, rows, cols, N, qk_scale, DROP, UPCAST)
        dv += _mma(tl.trans(probs).to(do.dtype), do, UPCAST)
        dp = _mma(do, tl.trans(v), UPCAST)
        ds = probs * (dp - delta[:, None])  # d loss / d logit (natural units)
        dk += _mma(tl.trans(ds).to(q.dtype), q, UPCAST)
    out_mask = cols[:, None] < N
    at = b * sgb + h * sgh + cols[:, None] * sgn + dims[None, :]  # the gradients' own (contiguous) layout
    tl.store(DK + at, (dk * scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + at, dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, ALL_DROPPED, DQ, seed, offset, p, scale, N,
                   sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn, H,
                   D: tl.constexpr, DROP: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, bh, b, h = _program(H)
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D)
    in_rows = rows[:, None] < N
    q = _load_tile(Q, b * sqb + h * sqh, rows, sqn, dims, N)
    do = _load_tile(DO, b * sdb + h * sdh, rows, sdn, dims, N)
    lse, delta, flags = _row_stats(LSE, DELTA, ALL_DROPPED, bh, rows, N)
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    qk_scale = scale * LOG2E
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K, b * skb + h * skh, cols, skn, dims, N)
        v = _load_tile(V, b * svb + h * svh, cols, svn, dims, N)
        probs = _tile_probs(q, k, lse, flags, seed, offset, p, bh, rows, cols, N, qk_scale, DROP, UPCAST)
        dp = _mma(do, tl.trans(v), UPCAST)
        ds = probs * (dp - delta[:, None])
        dq += _mma(ds.to(k.dtype), k, UPCAST)
    tl.store(DQ + b * sgb + h * sgh + rows[:, None] * sgn + dims[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=in_rows)


# --- tiles and launches -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tiles:
    """One candidate launch shape: query tile x key tile, warps, software-pipeline stages, and the least
    compute capability it is offered on (tiles that spill registers on sm_80 are kept for sm_90)."""
    block_m: int
    block_n: int
    warps: int
    stages: int
    min_arch: int = 80

    def config(self) -> triton.Config:
        return triton.Config({"BLOCK_M": self.block_m, "BLOCK_N": self.block_n}, num_warps=self.warps,
                             num_stages=self.stages)


# Per kernel, fastest-first guesses for ViT shapes (the interpreter takes the first that fits). The backward
# kernels keep two fp32 accumulators beside their tiles: their 64-wide tiles fit sm_90's registers with
# 8 warps but spill on sm_80 (Triton 3.6 and 3.9), which gets the 32-wide ones. Every entry compiles
# without spilling at D <= 64 in bf16/fp16 on the archs it is offered on (tests/test_kernel_compile.py).
CANDIDATES = {
    "fwd": (Tiles(64, 64, 4, 2), Tiles(128, 64, 8, 2), Tiles(64, 32, 4, 2), Tiles(64, 16, 4, 2)),
    "dq": (Tiles(64, 64, 8, 2, min_arch=90), Tiles(64, 32, 4, 2), Tiles(64, 16, 4, 2)),
    "dkdv": (Tiles(32, 64, 8, 2, min_arch=90), Tiles(16, 64, 8, 2, min_arch=90), Tiles(32, 32, 4, 2),
             Tiles(16, 32, 4, 2)),
}
DELTA_BLOCK_M = 64


def candidates(kind: str, n: int, d: int, arch: int) -> list[Tiles]:
    """The tiles `kind` may be launched with at sequence length n, head dim d on compute capability `arch`
    (major * 10 + minor): none wider than the sequence needs, key tiles of at most 32 at D 128."""
    fit = triton.next_power_of_2(max(n, 16))
    out = [t for t in CANDIDATES[kind] if t.block_m <= fit and t.block_n <= fit and (d < 128 or t.block_n <= 32)
           and arch >= t.min_arch]
    if not out:  # a short sequence: one tile covering it (16 is tl.dot's least)
        out = [Tiles(fit, min(fit, 32), 4, 2)]
    return out


def _arch(t: torch.Tensor) -> int:
    if t.device.type != "cuda":
        return 80  # the interpreter: the candidates every GPU gets
    major, minor = torch.cuda.get_device_capability(t.device)
    return 10 * major + minor


def _prune(kind: str):
    def prune(configs, named_args, **kwargs):
        return [t.config() for t in candidates(kind, named_args["N"], kwargs["D"], _arch(named_args["Q"]))]
    return prune


def _tuned(kernel, kind: str):
    """`kernel` timed over its candidates once per (N, D, dtypes) on the GPU, the winner cached (triton.autotune)."""
    return triton.autotune(configs=[t.config() for t in CANDIDATES[kind]], key=["N", "D"],
                           prune_configs_by={"early_config_prune": _prune(kind)})(kernel)


_fwd = _tuned(_fwd_kernel, "fwd")
_bwd_dkdv = _tuned(_bwd_dkdv_kernel, "dkdv")
_bwd_dq = _tuned(_bwd_dq_kernel, "dq")


@dataclass(frozen=True)
class Launch:
    """One kernel launch as the autograd function issues it: `more_scale.kernels.aot` compiles the same
    objects ahead of time, so what CI compiles is what a GPU runs."""
    kind: str  # "fwd", "delta", "dkdv", "dq"
    kernel: object  # a triton.autotune-wrapped kernel, or the plain @triton.jit delta kernel
    rows: int  # the dimension the grid's first axis tiles: N
    slices: int  # B * H
    args: tuple
    constexprs: dict

    @property
    def tuned(self) -> bool:
        return self.kind != "delta"

    def tiles(self, arch: int) -> list[Tiles]:
        """What the launch may run with on compute capability `arch`."""
        if not self.tuned:
            return [Tiles(DELTA_BLOCK_M, DELTA_BLOCK_M, 4, 1)]
        return candidates(self.kind, self.rows, self.constexprs["D"], arch)

    def grid(self, meta: dict) -> tuple[int, int]:
        block = meta["BLOCK_N"] if self.kind == "dkdv" else meta["BLOCK_M"]
        return triton.cdiv(self.rows, block), self.slices

    def jit_function(self):
        """The @triton.jit function under any autotuner."""
        return self.kernel.fn if self.tuned else self.kernel

    def kwargs(self, tiles: Tiles) -> dict:
        """Everything but the positional arguments of a launch with `tiles`: constants, tile sizes, warps, stages."""
        sizes = dict(tiles.config().kwargs) if self.tuned else {"BLOCK_M": tiles.block_m}
        return {**self.constexprs, **sizes, "num_warps": tiles.warps, "num_stages": tiles.stages}

    def run(self) -> None:
        if self.tuned and not _interpreting():
            self.kernel[self.grid](*self.args, **self.constexprs)  # the autotuner picks the tiles
            return
        tiles = self.tiles(_arch(self.args[0]))[0]  # delta's one tile; the interpreter times nothing: the first
        kwargs = self.kwargs(tiles)
        self.jit_function()[self.grid(kwargs)](*self.args, **kwargs)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _constexprs(q: torch.Tensor, p: float) -> dict:
    return {"D": q.shape[-1], "DROP": p > 0, "UPCAST": q.dtype == torch.bfloat16 and _interpreting()}


def forward_launch(q, k, v, out, lse, dropped_all, p: float, seed: int, offset: int) -> Launch:
    b, h, n, d = q.shape
    args = (q, k, v, out, lse, dropped_all, seed, offset, float(p), d ** -0.5, n,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], h)
    return Launch("fwd", _fwd, n, b * h, args, _constexprs(q, p))


def backward_launches(q, k, v, out, grad_out, lse, dropped_all, delta, dq, dk, dv, p: float, seed: int,
                      offset: int) -> list[Launch]:
    """delta first, then dK/dV and dQ (both read delta); dq, dk, dv share one contiguous layout."""
    b, h, n, d = q.shape
    delta_args = (out, grad_out, delta, n, h, *out.stride()[:3], *grad_out.stride()[:3])
    common = (lse, delta, dropped_all)
    tail = (seed, offset, float(p), d ** -0.5, n, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *grad_out.stride()[:3], *dq.stride()[:3], h)
    return [Launch("delta", _delta_kernel, n, b * h, delta_args, {"D": d}),
            Launch("dkdv", _bwd_dkdv, n, b * h, (q, k, v, grad_out, *common, dk, dv, *tail), _constexprs(q, p)),
            Launch("dq", _bwd_dq, n, b * h, (q, k, v, grad_out, *common, dq, *tail), _constexprs(q, p))]


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.shape != k.shape or q.shape != v.shape or q.dim() != 4:
        raise ValueError(f"triton_dropkey: q, k, v must share one (B, H, N, D) shape, got {q.shape}, {k.shape}, {v.shape}")
    d = q.shape[-1]
    if d not in HEAD_DIMS:
        raise ValueError(f"triton_dropkey: head dim {d} not supported {HEAD_DIMS}")
    if q.dtype not in DTYPES or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"triton_dropkey: dtypes {q.dtype}, {k.dtype}, {v.dtype} (one of bf16, fp16, fp32 as TF32)")


def _contiguous_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class DropKeyAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, p: float, seed: int, offset: int):
        _check(q, k, v)
        q, k, v = (_contiguous_last(t) for t in (q, k, v))
        b, h, n, _ = q.shape
        out = torch.empty_like(q)
        lse = torch.empty((b * h, n), device=q.device, dtype=torch.float32)
        dropped_all = torch.empty((b * h, n), device=q.device, dtype=torch.int8)
        forward_launch(q, k, v, out, lse, dropped_all, p, seed, offset).run()
        ctx.save_for_backward(q, k, v, out, lse, dropped_all)
        ctx.p, ctx.seed, ctx.offset = p, seed, offset
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, dropped_all = ctx.saved_tensors
        grad_out = _contiguous_last(grad_out)
        delta = torch.empty_like(lse)
        # contiguous gradients (empty_like of a strided q/k/v view may not share its strides)
        dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
        for launch in backward_launches(q, k, v, out, grad_out, lse, dropped_all, delta, dq, dk, dv,
                                        ctx.p, ctx.seed, ctx.offset):
            launch.run()
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

