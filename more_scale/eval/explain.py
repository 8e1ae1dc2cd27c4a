"""Relevance maps: which X-ray patches and which ECG leads and moments made the model match a text, and
whether a map says anything about what the model learned.

Gradient-weighted attention rollout (Chefer, Gur and Wolf, ICCV 2021, "Generic Attention-model
Explainability"): starting from the identity, every block adds its attention probabilities weighted by
their gradient (positive part, averaged over heads) times the relevance so far, R <- R + mean_h[(dA * A)+] R;
the CLS row of R says how much each patch token drove the score. The score is the cosine similarity between
the image (or ECG) embedding and a text query's embedding, so the map answers "where is this finding".

ECG: with the Conv1d stem every token mixes all 12 leads, so the rollout is relevance over time only; which
lead carried it is gradient x input per lead at the stem's input (with the lead-patch stem the rollout is per
lead and time already, and is used as it is).

Sanity check (Adebayo et al., NeurIPS 2018, "Sanity Checks for Saliency Maps", model-parameter
randomisation): the same map from the same architecture with re-drawn weights. A map that stays rank-correlated
with it (Spearman >= SANITY_MAX_RANK_CORRELATION) shows the input and the architecture, not what was learned.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from more_scale.models.vit import Attention, VisionTransformer

# Adebayo et al. call a map insensitive to the weights when it stays similar after randomisation; a rank
# correlation of 0.5 or more between the two maps means over a quarter of the trained map's rank variance is
# what an untrained model of this shape would show anyway
SANITY_MAX_RANK_CORRELATION = 0.5
ECG_SMOOTH_S = 0.1  # per-lead gradient x input is averaged over this window: single samples flicker


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


def randomised(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A copy of `module` with every weight re-drawn by its own module's initialiser (`reset_parameters`), the
    global random state left as it was."""
    twin = copy.deepcopy(module)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in twin.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return twin


def rank_correlations(maps: np.ndarray, others: np.ndarray) -> list[float]:
    """Spearman correlation of each sample's map with the other map of the same sample (flattened)."""
    out = []
    for a, b in zip(maps.reshape(len(maps), -1), others.reshape(len(others), -1)):
        rho = spearmanr(a, b).statistic
        out.append(float(0.0 if np.isnan(rho) else rho))  # a constant map ranks nothing: no agreement
    return out


class _SanityChecked:
    rank_correlation: list[float]

    @property
    def passes(self) -> bool:
        """Every explained sample's map differs from its randomised-weights twin's."""
        return max(self.rank_correlation) < SANITY_MAX_RANK_CORRELATION


@dataclass
class CxrRelevance(_SanityChecked):
    maps: np.ndarray  # (B, H, W) in [0, 1] per image, the trained model's
    random_maps: np.ndarray  # (B, H, W), the same architecture with re-drawn weights
    rank_correlation: list[float]  # per image, on the patch grid (upsampling would inflate it)


@dataclass
class EcgRelevance(_SanityChecked):
    per_lead: np.ndarray  # (B, 12, T) in [0, 1] per ECG: |gradient x input| per lead, smoothed
    over_time: np.ndarray  # (B, T) in [0, 1]: the attention rollout (all leads together with the Conv1d stem)
    lead_share: np.ndarray  # (B, 12): each lead's share of the summed |gradient x input|
    rank_correlation: list[float]  # per ECG, per-lead maps of the trained model against re-drawn weights


def _scorer(head: torch.nn.Module, query: torch.Tensor):
    return lambda features: F.normalize(head(features).float(), dim=-1) @ query


def _cxr_tokens(vit, head, image: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    patches, _ = token_relevance(vit, image, _scorer(head, query))
    return patches.reshape(-1, 1, *vit.stem.grid)


def cxr_relevance(model, image: torch.Tensor, query: torch.Tensor) -> CxrRelevance:
    """Maps of an X-ray batch (B, 1, H, W) for a unit text embedding `query` (D,), with the sanity check."""
    image = image.expand(-1, 3, -1, -1) if model.cxr_channels == 3 and image.shape[1] == 1 else image
    vit, head = model.encoders["cxr"], model.heads["cxr"]
    trained = _cxr_tokens(vit, head, image, query)
    untrained = _cxr_tokens(randomised(vit), randomised(head), image, query)

    def upsampled(grid: torch.Tensor) -> np.ndarray:
        return _normalise(F.interpolate(grid, size=image.shape[-2:], mode="bilinear", align_corners=False)[:, 0].numpy())

    return CxrRelevance(upsampled(trained), upsampled(untrained), rank_correlations(trained.numpy(), untrained.numpy()))


def ecg_maps(vit, signal: torch.Tensor, score, rate: float) -> tuple[np.ndarray, np.ndarray]:
    """((B, 12, T) per-lead |gradient x input| smoothed over ECG_SMOOTH_S, (B, T) rollout over time), both
    unnormalised, for `score` (the tower's features -> one number per sample)."""
    tokens, grad = token_relevance(vit, signal, score)
    b, leads, samples = signal.shape
    grid = tokens.reshape(b, *vit.stem.grid)  # (B, N) with the Conv1d stem, (B, leads, pieces) with the lead stem
    if grid.ndim == 2:
        grid = grid[:, None]
    over_time = F.interpolate(grid.float(), size=samples, mode="linear", align_corners=False)  # (B, 1 or 12, T)
    width = int(round(ECG_SMOOTH_S * rate)) | 1
    per_lead = F.avg_pool1d((grad * signal).abs().cpu(), width, stride=1, padding=width // 2)
    if over_time.shape[1] == leads:  # the lead stem: the rollout already tells the leads apart
        per_lead = per_lead * over_time
    return per_lead.numpy(), over_time.mean(1).numpy()


def ecg_relevance(model, signal: torch.Tensor, query: torch.Tensor, rate: float = 100.0) -> EcgRelevance:
    """Maps of an ECG batch (B, 12, T) sampled at `rate` for a unit text embedding `query` (D,): per lead
    (normalised over the whole ECG, so a quiet lead stays pale), over time, each lead's share, the sanity check."""
    vit, head = model.encoders["ecg"], model.heads["ecg"]
    per_lead, over_time = ecg_maps(vit, signal, _scorer(head, query), rate)
    random_lead, _ = ecg_maps(randomised(vit), signal, _scorer(randomised(head), query), rate)
    share = per_lead.sum(-1) / np.maximum(per_lead.sum((1, 2))[:, None], 1e-12)
    return EcgRelevance(_normalise(per_lead), _normalise(over_time), share, rank_correlations(per_lead, random_lead))


def _normalise(a: np.ndarray) -> np.ndarray:
    lo = a.min(axis=tuple(range(1, a.ndim)), keepdims=True)
    hi = a.max(axis=tuple(range(1, a.ndim)), keepdims=True)
    return (a - lo) / np.maximum(hi - lo, 1e-12)
