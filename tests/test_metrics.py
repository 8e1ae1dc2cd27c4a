"""Evaluation metrics against plain references."""

import numpy as np

from more_scale.eval.metrics import recall_at


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
