"""Evaluation metrics against plain references."""

import numpy as np

from more_scale.eval.metrics import mean_interval, recall_hits


def recall_at(sims: np.ndarray, k: int) -> float:
    return float(recall_hits(sims, k).mean())


def _simulated_recall(sims, k, draws=4000, seed=0):
    """Reference: break ties by random jitter below the smallest gap, average over draws."""
    rng = np.random.default_rng(seed)
    hits = 0.0
    for _ in range(draws):
        jittered = sims + rng.random(sims.shape) * 1e-9
        target = np.diag(jittered)[:, None]
        hits += ((jittered > target).sum(1) < k).mean()
    return hits / draws


def test_recall_breaks_ties_at_random_in_expectation():
    rng = np.random.default_rng(1)
    sims = np.round(rng.normal(size=(12, 12)), 1)  # coarse values: many ties, as bf16 embeddings give
    for k in (1, 3, 5):
        assert abs(recall_at(sims, k) - _simulated_recall(sims, k)) < 0.01
    collapsed = np.ones((10, 10))  # every item ties: chance, not a perfect score
    assert recall_at(collapsed, 5) == 0.5
    assert recall_at(np.eye(10), 1) == 1.0 and recall_at(-np.eye(10), 1) == 0.0


def test_recall_interval_holds_the_binomial_spread():
    """Hits of 200 queries at recall 0.3: the bootstrap interval of their mean is about +-1.96 sqrt(p(1-p)/n)."""
    hits = np.zeros(200)
    hits[:60] = 1.0
    lo, hi = mean_interval(hits)
    half = 1.96 * np.sqrt(0.3 * 0.7 / 200)  # 0.064: the normal approximation, good at n p = 60
    assert lo < 0.3 < hi and abs((hi - lo) / 2 - half) < 0.15 * half
