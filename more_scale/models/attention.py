"""One attention function with DropKey, over interchangeable kernels.

DropKey (Xu et al. 2023; MoRE's "attention dropping"): during training each attention logit is
masked to -inf with probability p before the softmax. Backends:

  flash_attn  flash_attn_func (CUDA, fp16/bf16). Takes no arbitrary mask, so no DropKey.
  xformers    memory_efficient_attention (CUDA); DropKey rides in attn_bias as -inf.
  sdpa        torch scaled_dot_product_attention (its flash / efficient / math kernels); DropKey as a
              boolean attn_mask.
  math        softmax(QK^T/sqrt(d) + M)V written out in fp32 softmax: the reference all are tested against.
  triton_dropkey  more_scale.kernels.dropkey_attention: flash-attention-2 style Triton kernels that draw the
              DropKey mask in the tile loop (Philox) and never store it (CUDA; the CPU only under
              TRITON_INTERPRET=1, for tests). `auto` prefers it on CUDA whenever DropKey is on in
              bf16/fp16 (in fp32 it would multiply in TF32).
  flex_dropkey  torch FlexAttention with a score_mod drawing the same Philox mask: the baseline the Triton
              kernel must beat, and a fallback where Triton cannot run (training needs CUDA: FlexAttention
              has no CPU backward).

The two fused backends draw their mask from a seed taken from torch's CPU generator at each call, so
masks differ per call (layer, step) and per rank (ranks seed differently), and replay when activation
checkpointing recomputes a block or a resumed run restores the RNG states.

`auto` trusts a backend only once it has proven itself on the device: its first use there (per dtype and
head dim) runs one small forward + backward against the written-out reference, and a backend that raises
or misses is left out with one warning naming the error (a kernel that does not build for this GPU, a
wheel built for another CUDA). Among the backends that are installed, run on the device and dtype, can
honour DropKey and passed that check, `auto` picks the fastest for this call's shape, measured on the
running device the first time a shape is seen (forward + backward, a few repetitions) and cached per
(shape, dtype, device, DropKey). The winner
differs between machines: on a 2-core AVX2 CPU SDPA beat the written-out path, on an AVX-512 BF16
CPU the written-out path won the bf16 recipe step. Asking by name for a backend that cannot run the
call is an error, never a silent fallback.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import time

import torch
import torch.nn.functional as F

BACKENDS = ("flash_attn", "xformers", "sdpa", "math", "triton_dropkey", "flex_dropkey")
FUSED_DROPKEY = ("triton_dropkey", "flex_dropkey")  # draw their own mask: no explicit keep_mask
log = logging.getLogger(__name__)

# Candidate order: the first wins a tie, and is the choice while torch.compile traces (no timing then)
CPU_ORDER = ("sdpa", "math")
CUDA_ORDER = ("flash_attn", "xformers", "sdpa", "math")
TIMING_REPEATS = 3  # after one warm-up call per candidate


MODULES = {"flash_attn": "flash_attn", "xformers": "xformers.ops",
           "triton_dropkey": "more_scale.kernels.dropkey_attention",
           "flex_dropkey": "torch.nn.attention.flex_attention"}


@functools.cache
def _module(name: str):
    """The backend's module if importable, else None (optional GPU extras and Triton, imported lazily)."""
    try:
        return importlib.import_module(MODULES[name])
    except Exception:  # ImportError, or a CUDA-less build failing at import
        return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _fused_reason(backend: str, q: torch.Tensor, explicit_mask: bool) -> str | None:
    if explicit_mask:
        return f"{backend} draws its DropKey mask in the kernel: it takes no explicit keep_mask"
    if _module(backend) is None:
        hint = " (pip install triton)" if backend == "triton_dropkey" else ""
        return f"{backend}: {MODULES[backend]} is not importable{hint}"
    if backend == "triton_dropkey":
        if q.device.type != "cuda" and not (q.device.type == "cpu" and _interpreting()):
            return f"triton_dropkey runs on CUDA (or the CPU under TRITON_INTERPRET=1), got a {q.device.type} tensor"
        kernels = _module(backend)
        if q.shape[-1] not in kernels.HEAD_DIMS:
            return f"triton_dropkey: head dim {q.shape[-1]} not supported {kernels.HEAD_DIMS}"
        if q.dtype not in kernels.DTYPES:
            return f"triton_dropkey: dtype {q.dtype} not supported"
    if backend == "flex_dropkey" and q.device.type != "cuda" and q.requires_grad and torch.is_grad_enabled():
        return "flex_dropkey has no backward on CPU (FlexAttention): training needs CUDA"
    return None


def unsupported_reason(backend: str, q: torch.Tensor, drop_key_active: bool, explicit_mask: bool = False) -> str | None:
    """Why `backend` cannot run this call (None when it can). `explicit_mask`: the caller passes keep_mask."""
    if backend in FUSED_DROPKEY:
        return _fused_reason(backend, q, explicit_mask)
    if backend in ("flash_attn", "xformers"):
        if _module(backend) is None:
            return f"{backend} is not installed (pip install 'more-scale[gpu]' on a CUDA machine)"
        if q.device.type != "cuda":
            return f"{backend} runs on CUDA only, got a {q.device.type} tensor"
    if backend == "flash_attn":
        if q.dtype not in (torch.float16, torch.bfloat16):
            return f"flash_attn needs fp16/bf16, got {q.dtype}"
        if drop_key_active:
            return "flash_attn takes no attention mask, so it cannot apply DropKey"
    return None


def available(q: torch.Tensor, drop_key_active: bool) -> list[str]:
    order = CUDA_ORDER if q.device.type == "cuda" else CPU_ORDER
    return [b for b in order if unsupported_reason(b, q, drop_key_active) is None and proven(b, q)]


_PROOF_P, _PROOF_SEED = 0.3, 20261201
_proofs: dict[tuple, bool] = {}


def proven(backend: str, q: torch.Tensor) -> bool:
    """Whether `backend` computed one small DropKey forward + backward like the reference on q's device, dtype
    and head dim; checked at its first use there, the answer kept for the process. `math` is the reference."""
    key = (backend, q.device, q.dtype, q.shape[-1])
    if backend == "math":
        return True
    if key not in _proofs:
        if torch.compiler.is_compiling():
            return True  # no kernels run while tracing; eager use before compiling was checked
        failure = check_backend(backend, q.device, q.dtype, q.shape[-1])
        if failure:
            log.warning("attention: %s is left out of auto: %s", backend, failure)
        _proofs[key] = failure is None
    return _proofs[key]


def check_backend(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int, n: int = 33) -> str | None:
    """One forward + backward of `backend` at (1, 2, n, head_dim) with DropKey against the float64 reference
    under the same mask (33 keys: a ragged last tile). None when it matches, else what went wrong."""
    kernels = _module("triton_dropkey") if backend in FUSED_DROPKEY else None
    shape, logits = (1, 2, n, head_dim), (1, 2, n, n)
    g = torch.Generator(device).manual_seed(0)  # a private generator: the global RNG does not move
    q, k, v, grad = (torch.randn(shape, device=device, generator=g) for _ in range(4))
    if kernels is not None:
        mask = kernels.keep_mask(_PROOF_SEED, 0, logits, _PROOF_P, device)
    else:  # flash_attn takes no mask: checked without DropKey
        mask = None if backend == "flash_attn" else drop_key_mask(logits, _PROOF_P, device, generator=g)
    try:
        with torch.enable_grad():
            inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
            if backend == "triton_dropkey":
                out = kernels.dropkey_attention(*inputs, _PROOF_P, _PROOF_SEED, 0)
            elif backend == "flex_dropkey":
                out = flex_dropkey_attention(*inputs, _PROOF_P, _PROOF_SEED, 0)
            else:
                out = attention(*inputs, backend=backend, keep_mask=mask)
            got = [out, *torch.autograd.grad(out, inputs, grad.to(dtype))]
            exact_inputs = [t.double().requires_grad_() for t in (q, k, v)]
            exact = math_attention(*exact_inputs, mask)
            want = [exact, *torch.autograd.grad(exact, exact_inputs, grad.double())]
    except Exception as e:  # a kernel that does not build or launch here
        return (f"it failed its first-use check on {device} {dtype} (D {head_dim}): {type(e).__name__}: "
                f"{' '.join(str(e).split())[:500]}")
    # a broken build misses by O(1); rounding (bf16 eps 2^-8, TF32 2^-11) stays far below 0.1 of the largest value
    errors = [((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-6)).item() for a, b in zip(got, want)]
    if max(errors) > 0.1:
        return (f"it computed wrong numbers on {device} {dtype} (D {head_dim}): relative error "
                f"{', '.join(f'{e:.2g}' for e in errors)} of out, dq, dk, dv")
    return None


def _time_backend(backend: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                  drop_key: bool) -> float:
    """Median seconds of one forward + backward of `backend` on random inputs of `shape`. Inputs come
    from a private generator: measuring never moves the global RNG that DropKey and DropToken draw from."""
    g = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(shape, device=device, generator=g).to(dtype).requires_grad_() for _ in range(3))
    mask = None
    if drop_key:
        mask = torch.rand((shape[0], shape[1], shape[2], shape[2]), device=device, generator=g) >= 0.3
        mask |= ~mask.any(dim=-1, keepdim=True)
    times = []
    for _ in range(1 + TIMING_REPEATS):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        attention(q, k, v, backend=backend, keep_mask=mask).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[TIMING_REPEATS // 2]


@functools.cache
def _fastest(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, drop_key: bool,
             candidates: tuple[str, ...]) -> str:
    with torch.enable_grad():
        seconds = {b: _time_backend(b, shape, dtype, device, drop_key) for b in candidates}
    chosen = min(candidates, key=lambda b: seconds[b])
    log.info("attention: %s for %s %s on %s%s (%s)", chosen, shape, dtype, device, " with DropKey" if drop_key else "",
             ", ".join(f"{b} {1e3 * t:.2f} ms" for b, t in seconds.items()))
    return chosen


def resolve(backend: str, q: torch.Tensor, drop_key_active: bool, explicit_mask: bool = False) -> str:
    if backend == "auto":
        if (q.device.type == "cuda" and drop_key_active and not explicit_mask and q.dtype != torch.float32
                and _fused_reason("triton_dropkey", q, False) is None and proven("triton_dropkey", q)):
            return "triton_dropkey"  # the mask never touches memory: preferred whenever DropKey is on
        candidates = tuple(available(q, drop_key_active))
        if len(candidates) == 1 or torch.compiler.is_compiling():
            return candidates[0]
        return _fastest(tuple(q.shape), q.dtype, q.device, drop_key_active, candidates)
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r}: expected auto or one of {BACKENDS}")
    reason = unsupported_reason(backend, q, drop_key_active, explicit_mask)
    if reason:
        raise RuntimeError(f"attention backend {backend!r} cannot run this call: {reason}")
    return backend


def drop_key_mask(shape: tuple[int, ...], p: float, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean keep-mask (B, H, N, N); a row that lost every key keeps them all (softmax of -inf is NaN)."""
    keep = torch.rand(shape, device=device, generator=generator) >= p
    return keep | ~keep.any(dim=-1, keepdim=True)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, drop_key: float = 0.0, training: bool = False,
              backend: str = "auto", keep_mask: torch.Tensor | None = None) -> torch.Tensor:
    """q, k, v: (B, H, N, D) -> (B, H, N, D). DropKey applies only when training and drop_key > 0;
    `keep_mask` supplies the mask explicitly (tests compare backends under the same mask)."""
    p = drop_key if training and keep_mask is None else 0.0
    name = resolve(backend, q, keep_mask is not None or p > 0, explicit_mask=keep_mask is not None)
    if name == "triton_dropkey":
        kernels = _module("triton_dropkey")
        return kernels.dropkey_attention(q, k, v, p, kernels.new_seed())
    if name == "flex_dropkey":
        return flex_dropkey_attention(q, k, v, p, _module("triton_dropkey").new_seed() if p > 0 else 0)
    if keep_mask is None and p > 0:
        keep_mask = drop_key_mask((q.shape[0], q.shape[1], q.shape[2], k.shape[2]), p, q.device)
    if name == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep_mask)
    if name == "flash_attn":  # (B, N, H, D) layout
        return _module("flash_attn").flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    if name == "xformers":
        bias = None
        if keep_mask is not None:
            bias = torch.zeros(keep_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~keep_mask, float("-inf"))
        out = _module("xformers").memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                             attn_bias=bias)
        return out.transpose(1, 2)
    return math_attention(q, k, v, keep_mask)


@functools.cache
def _compiled_flex():
    """FlexAttention compiled once (on CUDA it is only fast compiled; eager runs a reference loop)."""
    return torch.compile(_module("flex_dropkey").flex_attention, dynamic=False)


def flex_dropkey_attention(q, k, v, p: float, seed: int, offset: int = 0) -> torch.Tensor:
    """FlexAttention with a score_mod that draws the Triton kernel's Philox mask for (seed, offset). A row
    that lost every key is not restored here (its output is 0): at p = 0.3 that is 0.3^N per row."""
    flex = _compiled_flex() if q.device.type == "cuda" else _module("flex_dropkey").flex_attention
    if p <= 0:
        return flex(q, k, v)
    philox = _module("triton_dropkey").philox_uniform
    heads = q.shape[1]
    seed_t = torch.tensor(seed, dtype=torch.int64, device=q.device)  # a tensor: a new seed does not recompile
    offset_t = torch.tensor(offset, dtype=torch.int64, device=q.device)

    def score_mod(score, b, h, q_idx, kv_idx):
        keep = philox(seed_t, kv_idx, q_idx, b * heads + h, offset_t + 0 * kv_idx) >= p
        return torch.where(keep, score, float("-inf"))

    return flex(q, k, v, score_mod=score_mod)


def math_attention(q, k, v, keep_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(QK^T / sqrt(d) + M) V with M = -inf where the key is dropped; the reference."""
    logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if keep_mask is not None:
        logits = logits.masked_fill(~keep_mask, float("-inf"))
    return torch.softmax(logits.float(), dim=-1).to(v.dtype) @ v
