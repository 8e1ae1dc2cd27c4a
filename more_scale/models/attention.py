"""One attention function with DropKey, over interchangeable kernels.

DropKey (Xu et al. 2023; MoRE's "attention dropping"): during training each attention logit is
masked to -inf with probability p before the softmax. Backends:

  flash_attn  flash_attn_func (CUDA, fp16/bf16). Takes no arbitrary mask, so no DropKey.
  xformers    memory_efficient_attention (CUDA); DropKey rides in attn_bias as -inf.
  sdpa        torch scaled_dot_product_attention (its flash / efficient / math kernels); DropKey as a
              boolean attn_mask.
  math        softmax(QK^T/sqrt(d) + M)V written out in fp32 softmax: the reference all are tested against.

`auto` picks the fastest backend that is installed, runs on the device and dtype, and can honour
DropKey; asking by name for one that cannot is an error, never a silent fallback.
"""

from __future__ import annotations

import functools
import importlib
import logging

import torch
import torch.nn.functional as F

BACKENDS = ("flash_attn", "xformers", "sdpa", "math")
log = logging.getLogger(__name__)

# Preference on CPU, from benchmarks/attention.py (benchmarks/results/attention_cpu.md, ViT-B size:
# B 8, H 12, N 197, D 64, 2-core AMD EPYC): sdpa beats the written-out path with and without DropKey,
# fp32 fwd 18.8 vs 39.3 ms, bf16 fwd 13.5 vs 274 ms (that host has no AVX-512 BF16 matmul).
CPU_ORDER = ("sdpa", "math")
CUDA_ORDER = ("flash_attn", "xformers", "sdpa", "math")


@functools.cache
def _module(name: str):
    """flash_attn / xformers.ops if importable, else None (optional GPU extras, imported lazily)."""
    try:
        return importlib.import_module({"flash_attn": "flash_attn", "xformers": "xformers.ops"}[name])
    except Exception:  # ImportError, or a CUDA-less build failing at import
        return None


def unsupported_reason(backend: str, q: torch.Tensor, drop_key_active: bool) -> str | None:
    """Why `backend` cannot run this call (None when it can)."""
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
    return [b for b in order if unsupported_reason(b, q, drop_key_active) is None]


@functools.cache
def _log_choice(backend: str, shape: tuple, dtype: torch.dtype, device: str, drop_key: bool) -> None:
    log.info("attention: %s for %s %s on %s%s", backend, shape, dtype, device, " with DropKey" if drop_key else "")


def resolve(backend: str, q: torch.Tensor, drop_key_active: bool) -> str:
    if backend == "auto":
        chosen = available(q, drop_key_active)[0]
        _log_choice(chosen, tuple(q.shape), q.dtype, q.device.type, drop_key_active)
        return chosen
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r}: expected auto or one of {BACKENDS}")
    reason = unsupported_reason(backend, q, drop_key_active)
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
    if keep_mask is None and training and drop_key > 0:
        keep_mask = drop_key_mask((q.shape[0], q.shape[1], q.shape[2], k.shape[2]), drop_key, q.device)
    name = resolve(backend, q, keep_mask is not None)
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


def math_attention(q, k, v, keep_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(QK^T / sqrt(d) + M) V with M = -inf where the key is dropped; the reference."""
    logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if keep_mask is not None:
        logits = logits.masked_fill(~keep_mask, float("-inf"))
    return torch.softmax(logits.float(), dim=-1).to(v.dtype) @ v
