"""The evaluation protocols on embeddings: zero-shot (binary, multi-label, ordinal), retrieval, linear probe.
Every figure comes with the chance baseline it must beat, computed on the same samples."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata, spearmanr
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from more_scale.eval.embed import Embeddings
from more_scale.eval.tasks import Task

CHANCE_DRAWS = 100  # permutations averaged for each chance figure
BOOTSTRAP_DRAWS = 1000  # resamples behind each 95% interval
MIN_CLASS_FOR_INTERVAL = 5  # fewer positives (or negatives): a stratified resample repeats them, no interval
PROBE_FRACTIONS = (0.01, 0.1, 1.0)  # of the training labels, as the paper's linear-probe table
PROBE_DRAWS = 5  # label subsets averaged at the small fractions


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def answer_centroids(prompt_embeddings: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each answer's prompt ensemble -> one unit vector (the mean of its prompts' embeddings)."""
    return {a: unit(e.mean(0)) for a, e in prompt_embeddings.items()}


def binary_scores(x: np.ndarray, task: Task, prompts: dict[str, np.ndarray]) -> np.ndarray:
    """A binary task's zero-shot score for each row of x (unit vectors): `centroid`, the cosine to the mean
    positive prompt minus the cosine to the mean negative one; `max` (the MoRE reference's), the highest
    cosine among the positive prompts."""
    if task.score == "max":
        return (x @ prompts["positive"].T).max(1)
    centroids = answer_centroids(prompts)
    return x @ centroids["positive"] - x @ centroids["negative"]


def _labelled(emb: Embeddings, task: Task) -> tuple[np.ndarray, list]:
    rows = [i for i, m in enumerate(emb.meta) if emb.masks[task.modality][i] and task.label(m) is not None]
    return np.array(rows, dtype=int), [task.label(emb.meta[i]) for i in rows]


def binary_metrics(labels: np.ndarray, scores: np.ndarray, seed: int = 0) -> dict:
    """AUROC and AUPRC beside chance (AUROC over shuffled labels; AUPRC's chance is the prevalence)."""
    rng = np.random.default_rng(seed)
    # shuffled labels against a fixed tie-free order: the same null distribution as against the scores, but a
    # function of (labels, seed) alone, so round-off in the embeddings cannot move the baseline
    order = np.arange(len(labels))
    chance = np.mean([roc_auc_score(rng.permutation(labels), order) for _ in range(CHANCE_DRAWS)])
    fpr, tpr, _ = roc_curve(labels, scores)
    enough = min(labels.sum(), len(labels) - labels.sum()) >= MIN_CLASS_FOR_INTERVAL
    auroc_ci, auprc_ci = bootstrap_intervals(labels, scores, seed) if enough else (None, None)
    return {"auroc": float(roc_auc_score(labels, scores)), "chance_auroc": float(chance), "auroc_ci": auroc_ci,
            "auprc": float(average_precision_score(labels, scores)), "chance_auprc": float(labels.mean()),
            "auprc_ci": auprc_ci, "roc": {"fpr": fpr.round(4).tolist(), "tpr": tpr.round(4).tolist()}}


def bootstrap_intervals(labels: np.ndarray, scores: np.ndarray, seed: int = 0) -> tuple[list[float], list[float]]:
    """95% percentile intervals of AUROC and AUPRC over BOOTSTRAP_DRAWS resamples stratified by class (each
    draw keeps the counts of positives and negatives), computed for all draws at once: AUROC from rank sums
    (ties at their mean rank, as roc_auc_score), AUPRC as average precision at each positive's rank."""
    rng = np.random.default_rng(seed + 1)
    positives, negatives = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    draws = np.concatenate([rng.choice(positives, (BOOTSTRAP_DRAWS, len(positives))),
                            rng.choice(negatives, (BOOTSTRAP_DRAWS, len(negatives)))], axis=1)
    y, x = labels[draws], scores[draws]  # (draws, n)
    n_pos, n_neg = len(positives), len(negatives)
    ranks = rankdata(x, axis=1)
    auroc = ((ranks * y).sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    order = np.argsort(-x, axis=1, kind="stable")
    hits = np.take_along_axis(y, order, axis=1)
    precision = np.cumsum(hits, axis=1) / np.arange(1, y.shape[1] + 1)
    auprc = (precision * hits).sum(1) / n_pos

    def interval(values: np.ndarray) -> list[float]:
        return [float(v) for v in np.percentile(values, [2.5, 97.5])]

    return interval(auroc), interval(auprc)


def zero_shot(emb: Embeddings, task: Task, prompts: dict[str, np.ndarray], scale: float = 1.0, seed: int = 0) -> dict:
    """prompts: answer -> (P, D) prompt embeddings. `scale`: the model's logit scale (ordinal softmax)."""
    rows, labels = _labelled(emb, task)
    x = emb.vectors[task.modality][rows]
    out = {"kind": task.kind, "modality": task.modality, "n": int(len(rows))}
    if task.kind == "binary":
        y = np.array(labels, dtype=float)
        out["n_positive"] = int(y.sum())
        if len(rows) == 0 or y.min() == y.max():
            return {**out, "note": "needs positives and negatives"}
        return {**out, **binary_metrics(y, binary_scores(x, task, prompts), seed)}
    centroids = answer_centroids(prompts)
    names = list(centroids)
    sims = x @ np.stack([centroids[a] for a in names]).T  # (N, answers)
    if task.kind == "multilabel":
        if len(rows) == 0:
            return {**out, "note": "no sample carries these labels"}
        return {**out, **multilabel_metrics(labels, sims, names, task.priority, seed)}
    levels = np.array([int(a) for a in names])
    truth = np.array(labels)
    if len(rows) < 3 or len(set(labels)) < 2:
        return {**out, "note": "needs samples of at least two levels"}
    probs = np.exp(scale * (sims - sims.max(1, keepdims=True)))
    probs /= probs.sum(1, keepdims=True)
    expected = probs @ levels
    rng = np.random.default_rng(seed)
    order = np.arange(len(truth))  # as in binary_metrics: the baseline depends on the labels and seed alone
    chance = np.mean([spearmanr(rng.permutation(truth), order).statistic for _ in range(CHANCE_DRAWS)])
    return {**out, "spearman": float(spearmanr(truth, expected).statistic), "chance_spearman": float(chance),
            "accuracy": float(np.mean(levels[sims.argmax(1)] == truth)),
            "chance_accuracy": float(max(np.mean(truth == v) for v in levels))}


def multilabel_metrics(labels: list[set], sims: np.ndarray, names: list[str], priority: tuple[str, ...],
                       seed: int = 0) -> dict:
    """Per-class AUROC (score: the class's similarity minus the mean of the others) and their macro mean;
    the single-label variant: each sample's label is the first of `priority` it has, prediction the
    highest-scoring class (accuracy and macro one-vs-rest AUROC)."""
    per_class = {}
    contrast = sims - (sims.sum(1, keepdims=True) - sims) / max(len(names) - 1, 1)
    for j, name in enumerate(names):
        y = np.array([name in s for s in labels], dtype=float)
        per_class[name] = {**binary_metrics(y, contrast[:, j], seed), "n_positive": int(y.sum())} \
            if 0 < y.sum() < len(y) else {"note": "needs positives and negatives", "n_positive": int(y.sum())}
    scored = [r["auroc"] for r in per_class.values() if "auroc" in r]
    out = {"classes": per_class, "macro_auroc": float(np.mean(scored)) if scored else None,
           "chance_macro_auroc": float(np.mean([r["chance_auroc"] for r in per_class.values() if "auroc" in r]))
           if scored else None}
    if priority:
        single = np.array([next((c for c in priority if c in s), None) for s in labels], dtype=object)
        keep = single != None  # noqa: E711 - elementwise on an object array
        predicted = np.array(names, dtype=object)[sims.argmax(1)]
        if keep.any():
            truth = single[keep]
            per_class = [binary_metrics((truth == c).astype(float), sims[keep][:, j], seed)
                         for j, c in enumerate(names) if 0 < np.sum(truth == c) < len(truth)]
            out["single_label"] = {"n": int(keep.sum()), "accuracy": float(np.mean(predicted[keep] == truth)),
                                   "chance_accuracy": float(max(np.mean(truth == c) for c in set(truth))),
                                   # the reference scores this variant by one-vs-rest AUROC per class
                                   "macro_auroc": float(np.mean([r["auroc"] for r in per_class])) if per_class else None,
                                   "chance_macro_auroc": float(np.mean([r["chance_auroc"] for r in per_class]))
                                   if per_class else None}
    return out


def retrieval(emb: Embeddings, query: str, gallery: str, ks=(1, 5, 10)) -> dict:
    """Recall@K and median rank of each query's own sample among all gallery samples with both modalities."""
    rows = np.flatnonzero(emb.masks[query] & emb.masks[gallery])
    if len(rows) == 0:
        return {"n": 0}
    sims = emb.vectors[query][rows] @ emb.vectors[gallery][rows].T  # (N, N), diagonal = true pairs
    out = {"n": int(len(rows))}
    for k in ks:
        hits = recall_hits(sims, k)
        out[f"R@{k}"] = float(hits.mean())
        out[f"R@{k}_ci"] = mean_interval(hits)
        out[f"chance_R@{k}"] = min(k, len(rows)) / len(rows)  # the true item at a uniformly random rank
    out["median_rank"] = float(np.median(expected_ranks(sims)))
    out["chance_median_rank"] = (len(rows) + 1) / 2
    return out


def expected_ranks(sims: np.ndarray) -> np.ndarray:
    """1-based rank of each diagonal item, ties counted at their expected (middle) rank."""
    target = np.diag(sims)[:, None]
    above = (sims > target).sum(1)
    tied = (sims == target).sum(1) - 1
    return above + 1 + tied / 2


def recall_hits(sims: np.ndarray, k: int) -> np.ndarray:
    """(N,) chance that each query's diagonal item ranks in the top k, ties broken at random in expectation:
    with g items above and t tied, the rank is uniform on g..g+t. (Counting ties as wins would give a
    collapsed model, whose similarities all tie, a perfect score.)"""
    target = np.diag(sims)[:, None]
    above = (sims > target).sum(1)
    tied = (sims == target).sum(1) - 1
    return np.clip((k - above) / (tied + 1), 0, 1)


def mean_interval(values: np.ndarray, seed: int = 0) -> list[float]:
    """95% percentile interval of a mean over BOOTSTRAP_DRAWS resamples of the queries (the gallery fixed)."""
    draws = np.random.default_rng(seed + 2).choice(values, (BOOTSTRAP_DRAWS, len(values))).mean(1)
    return [float(v) for v in np.percentile(draws, [2.5, 97.5])]


def _probe_targets(emb: Embeddings, task: Task) -> tuple[np.ndarray, np.ndarray]:
    """(rows with a label, (n, C) 0/1 targets): one column for a binary task, one per class for a multi-label one."""
    rows, labels = _labelled(emb, task)
    if task.kind == "binary":
        return rows, np.array(labels, dtype=float).reshape(-1, 1)
    classes = list(task.answers)
    return rows, np.array([[c in held for c in classes] for held in labels], dtype=float).reshape(-1, len(classes))


def linear_probe(train: Embeddings, test: Embeddings, task: Task, seed: int = 0) -> dict:
    """Logistic regression on frozen embeddings with 1%, 10% and 100% of the training labels: test AUROC for a
    binary task, macro AUROC over the classes (one-vs-rest, each class's own probe) for a multi-label one, as the
    paper's PTB-XL superclass table; averaged over PROBE_DRAWS label subsets below 100%. A subset keeps at least
    one positive and one negative of each class; a class without both in the test split is left out."""
    train_rows, train_y = _probe_targets(train, task)
    test_rows, test_y = _probe_targets(test, task)
    out = {"n_train": int(len(train_rows)), "n_test": int(len(test_rows))}
    scored = [c for c in range(train_y.shape[1]) if len(train_rows) >= 2 and 0 < train_y[:, c].sum() < len(train_y)
              and len(test_rows) and 0 < test_y[:, c].sum() < len(test_y)]
    if not scored:
        return {**out, "note": "needs positives and negatives in both splits"}
    if task.kind == "multilabel":
        out["classes"] = int(len(scored))
    x_train, x_test = train.vectors[task.modality][train_rows], test.vectors[task.modality][test_rows]
    rng = np.random.default_rng(seed)
    for fraction in PROBE_FRACTIONS:
        draws = 1 if fraction >= 1.0 else PROBE_DRAWS
        aurocs = []
        for _ in range(draws):
            n = max(2, round(fraction * len(train_y)))
            chosen = np.unique(np.concatenate([rng.choice(np.flatnonzero(train_y[:, c] == v), 1)
                                               for c in scored for v in (1, 0)]))
            rest = np.setdiff1d(np.arange(len(train_y)), chosen)
            chosen = np.concatenate([chosen, rng.choice(rest, max(0, min(n - len(chosen), len(rest))), replace=False)])
            per_class = []
            for c in scored:
                probe = LogisticRegression(max_iter=2000, class_weight="balanced").fit(x_train[chosen], train_y[chosen, c])
                per_class.append(roc_auc_score(test_y[:, c], probe.decision_function(x_test)))
            aurocs.append(np.mean(per_class))
        out[f"auroc@{fraction:g}"] = float(np.mean(aurocs))
    return out
