"""Relevance maps: which X-ray patches and which ECG leads and moments made the model match a text.

Gradient-weighted attention rollout (Chefer, Gur and Wolf, ICCV 2021, "Generic Attention-model
Explainability"): starting from the identity, every block adds its attention probabilities weighted by
their gradient (positive part, averaged over heads) times the relevance so far, R <- R + mean_h[(dA * A)+] R;
the CLS row of R says how much each patch token drove the score. The score is the cosine similarity between
the image (or ECG) embedding and a text query's embedding, so the map answers "where is this finding".
For ECGs the tokens are moments (the Conv1d stem mixes the leads): the rollout gives relevance over time,
and gradient x input per lead says which leads carried it.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from more_scale.models.vit import Attention, VisionTransformer


@contextlib.contextmanager
def recording(vit: VisionTransformer):
    """Every block's attention keeps its probabilities (and their gradients) while inside."""
    records: list[torch.Tensor] = []
    modules = [m for m in vit.modules() if isinstance(m, Attention)]
    for m in modules:
        m.recorder = records
    try:
        yield records
    finally:
        for m in modules:
            m.recorder = None


def rollout(records: list[torch.Tensor]) -> torch.Tensor:
    """(B, N) relevance of each token for the CLS output, from recorded probabilities with gradients."""
    b, _, n, _ = records[0].shape
    relevance = torch.eye(n).expand(b, n, n).clone()
    for probs in records:
        weighted = (probs.grad * probs).clamp(min=0).mean(1).detach().float().cpu()  # (B, N, N)
        relevance = relevance + weighted @ relevance
    return relevance[:, 0]


def token_relevance(vit: VisionTransformer, x: torch.Tensor, score) -> tuple[torch.Tensor, torch.Tensor]:
    """(relevance of the patch tokens (B, P), gradient of the summed score w.r.t. the input). `score` maps
    the tower's features (B, W) to one number per sample; the ViT runs in eval mode (no DropToken)."""
    was_training = vit.training
    vit.eval()
    x = x.detach().clone().requires_grad_()
    try:
        with torch.enable_grad(), recording(vit) as records:
            score(vit(x)).sum().backward()
    finally:
        vit.train(was_training)
    return rollout(records)[:, 1:], x.grad.detach()


def cxr_map(model, image: torch.Tensor, query: torch.Tensor) -> np.ndarray:
    """(B, H, W) relevance in [0, 1] of an X-ray batch (B, 1, H, W) for a unit text embedding `query` (D,)."""
    vit = model.encoders["cxr"]
    head = model.heads["cxr"]
    image = image.expand(-1, 3, -1, -1) if model.cxr_channels == 3 and image.shape[1] == 1 else image
    patches, _ = token_relevance(vit, image, lambda f: F.normalize(head(f).float(), dim=-1) @ query)
    gh, gw = vit.stem.grid
    grid = patches.reshape(-1, 1, gh, gw)
    up = F.interpolate(grid, size=image.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return _normalise(up.numpy())


def ecg_map(model, signal: torch.Tensor, query: torch.Tensor) -> np.ndarray:
    """(B, 12, T) relevance in [0, 1] of an ECG batch (B, 12, T): the rollout over time (the stem's tokens
    stretched to T) times each lead's |gradient x input|, smoothed over 0.1 s."""
    vit = model.encoders["ecg"]
    head = model.heads["ecg"]
    tokens, grad = token_relevance(vit, signal, lambda f: F.normalize(head(f).float(), dim=-1) @ query)
    over_time = F.interpolate(tokens[:, None], size=signal.shape[-1], mode="linear", align_corners=False)  # (B, 1, T)
    per_lead = (grad * signal).abs()
    per_lead = F.avg_pool1d(per_lead, 11, stride=1, padding=5)  # 0.1 s at 100 Hz
    return _normalise((per_lead * over_time).numpy())


def _normalise(a: np.ndarray) -> np.ndarray:
    lo = a.min(axis=tuple(range(1, a.ndim)), keepdims=True)
    hi = a.max(axis=tuple(range(1, a.ndim)), keepdims=True)
    return (a - lo) / np.maximum(hi - lo, 1e-12)
