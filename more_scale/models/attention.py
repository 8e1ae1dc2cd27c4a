"""One attention function with DropKey, over interchangeable kernels.

DropKey (Xu et al. 2023; MoRE's "attention dropping"): during training each attention logit is
masked to -inf with probability p before the softmax. Backends here: torch SDPA (fused kernels,
boolean keep-mask as attn_mask) and `math` (the plain reference every backend is tested against).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "math")


def drop_key_mask(shape: tuple[int, ...], p: float, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean keep-mask (B, H, N, N); a row that lost every key keeps them all (softmax of -inf is NaN)."""
    keep = torch.rand(shape, device=device, generator=generator) >= p
    return keep | ~keep.any(dim=-1, keepdim=True)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, drop_key: float = 0.0, training: bool = False,
              backend: str = "sdpa", keep_mask: torch.Tensor | None = None) -> torch.Tensor:
    """q, k, v: (B, H, N, D) -> (B, H, N, D). DropKey applies only when training and drop_key > 0;
    `keep_mask` supplies the mask explicitly (tests compare backends under the same mask)."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r}: expected one of {BACKENDS}")
    if keep_mask is None and training and drop_key > 0:
        keep_mask = drop_key_mask((q.shape[0], q.shape[1], q.shape[2], k.shape[2]), drop_key, q.device)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep_mask)
    return math_attention(q, k, v, keep_mask)


def math_attention(q, k, v, keep_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(QK^T / sqrt(d) + M) V with M = -inf where the key is dropped; the reference."""
    logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if keep_mask is not None:
        logits = logits.masked_fill(~keep_mask, float("-inf"))
    return torch.softmax(logits.float(), dim=-1).to(v.dtype) @ v
