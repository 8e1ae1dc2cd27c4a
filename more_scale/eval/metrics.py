"""Zero-shot AUROC and cross-modal recall@K, each beside a shuffled (chance) baseline."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from more_scale.eval.embed import Embeddings
from more_scale.eval.tasks import ZeroShotTask

CHANCE_DRAWS = 100  # permutations averaged for each chance figure


def zero_shot(emb: Embeddings, task: ZeroShotTask, pos: np.ndarray, neg: np.ndarray, seed: int = 0) -> dict:
    """Score = cos(x, mean positive prompt) - cos(x, mean negative prompt); AUROC over labelled samples.
    pos, neg: (P, D) prompt embeddings."""
    rows = [i for i, m in enumerate(emb.meta) if emb.masks[task.modality][i] and task.label(m) is not None]
    labels = np.array([task.label(emb.meta[i]) for i in rows])
    result = {"n": len(rows), "n_positive": int(labels.sum()) if len(rows) else 0}
    if len(rows) == 0 or labels.min() == labels.max():
        return {**result, "auroc": None, "chance_auroc": None, "note": "needs positives and negatives"}
    x = emb.vectors[task.modality][rows]
    scores = x @ _unit(pos.mean(0)) - x @ _unit(neg.mean(0))
    rng = np.random.default_rng(seed)
    chance = np.mean([roc_auc_score(rng.permutation(labels), scores) for _ in range(CHANCE_DRAWS)])
    return {**result, "auroc": float(roc_auc_score(labels, scores)), "chance_auroc": float(chance)}


def retrieval(emb: Embeddings, query: str, gallery: str, ks=(1, 5, 10), seed: int = 0) -> dict:
    """Recall@K of each query's own sample among all gallery samples that have both modalities."""
    rows = np.flatnonzero(emb.masks[query] & emb.masks[gallery])
    if len(rows) == 0:
        return {"n": 0}
    sims = emb.vectors[query][rows] @ emb.vectors[gallery][rows].T  # (N, N), diagonal = true pairs
    rng = np.random.default_rng(seed)
    out = {"n": int(len(rows))}
    for k in ks:
        out[f"R@{k}"] = recall_at(sims, k)
        # same similarities, gallery order shuffled: the true pair is lost
        out[f"chance_R@{k}"] = float(np.mean([recall_at(sims[:, rng.permutation(len(rows))], k)
                                              for _ in range(CHANCE_DRAWS)]))
    return out


def recall_at(sims: np.ndarray, k: int) -> float:
    """Share of queries whose diagonal item ranks in the top k, ties broken at random in expectation:
    with g items above and t tied, the rank is uniform on g..g+t. (Counting ties as wins would give a
    collapsed model, whose similarities all tie, a perfect score.)"""
    target = np.diag(sims)[:, None]
    above = (sims > target).sum(1)
    tied = (sims == target).sum(1) - 1
    return float(np.clip((k - above) / (tied + 1), 0, 1).mean())


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(np.linalg.norm(v), 1e-12)
