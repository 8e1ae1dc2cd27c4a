"""Text-anchored, gathered, masked InfoNCE (MoRE): 1/2[CE(t->x)+CE(x->t)] per modality pair.

Each rank scores its own rows against the columns gathered from every rank (local loss: memory
O(B x N), not O(N x N)). Rows whose pair lacks a modality are left out and columns of a missing
modality are masked to -inf, so an X-ray-only sample still serves as a negative for X-rays.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from more_scale import dist
from more_scale.config import LossConfig

PAIRS = (("text", "cxr"), ("text", "ecg"), ("cxr", "ecg"))


def negatives_for_microbatch(local: torch.Tensor) -> torch.Tensor:
    """The columns a micro-batch is scored against: this micro-batch's rows from every rank,
    (B_local, D) -> (B_global, D) in rank order, with gradients. With gradient accumulation the
    negatives per step are micro x world (train.accum_negatives=micro), or, with cached features
    (train.accum_negatives=cached, train/loop.py), the rows of all accumulated micro-batches:
    `local` is then K x B rows, K - 1 of them cached without gradients."""
    return dist.gather_with_grad(local)


class ContrastiveLoss:
    def __init__(self, cfg: LossConfig, rank: int, world: int):
        self.weights = {f"{a}_{b}": getattr(cfg, f"{a}_{b}") for a, b in PAIRS}
        self.rank, self.world = rank, world

    def __call__(self, emb: dict[str, torch.Tensor], cxr_mask: torch.Tensor, ecg_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """emb: unit-norm (B, D) per modality and the scalar `logit_scale`; cxr_mask / ecg_mask (B,): the
        sample has that modality. Returns the loss by name.
        Each value is this rank's share: its mean over ranks is the mean over all valid global rows,
        so DeepSpeed's gradient averaging yields the gradient of the global loss."""
        b = emb["text"].shape[0]
        masks = {"text": torch.ones(b, dtype=torch.bool, device=emb["text"].device),
                 "cxr": cxr_mask.to(emb["text"].device), "ecg": ecg_mask.to(emb["text"].device)}
        # a fixed order: every rank must issue the same collectives in the same sequence (a set's
        # order follows per-process string hashing and silently pairs text with X-ray across ranks)
        used = [m for m in ("text", "cxr", "ecg") if any(m in (a, c) and self.weights[f"{a}_{c}"] > 0 for a, c in PAIRS)]
        if self.world > 1:
            columns = {m: negatives_for_microbatch(emb[m]) for m in used}  # (B_global, D)
            column_masks = {m: dist.gather(masks[m]) for m in used}  # (B_global,)
        else:  # one rank, or a loss asked to score a batch alone (validation): no collective at all
            columns, column_masks = {m: emb[m] for m in used}, {m: masks[m] for m in used}
        # row i of this rank matches global column rank * B + i (equal micro-batches on every rank)
        targets = torch.arange(b, device=emb["text"].device) + self.rank * b
        scale = emb["logit_scale"]
        out, total = {}, 0.0
        for a, c in PAIRS:
            weight = self.weights[f"{a}_{c}"]
            if weight == 0:
                continue
            rows = masks[a] & masks[c]
            n_global = (column_masks[a] & column_masks[c]).sum().clamp(min=1)
            ce = (_masked_ce(scale * emb[a] @ columns[c].T, targets, rows, column_masks[c])
                  + _masked_ce(scale * emb[c] @ columns[a].T, targets, rows, column_masks[a]))
            pair = 0.5 * ce * self.world / n_global
            out[f"loss/{a}_{c}"] = pair
            total = total + weight * pair
        out["loss"] = total
        return out


def _masked_ce(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Summed CE over the valid rows; invalid columns get -inf. Invalid rows are zeroed before the softmax
    (a row with every column masked would give NaN gradients even if multiplied by 0) and left out of the
    sum by `where`: masks, not boolean indexing, whose result size the host would wait for on a GPU."""
    logits = logits.float().masked_fill(~columns[None, :], float("-inf"))
    logits = torch.where(rows[:, None], logits, 0.0)
    return torch.where(rows, F.cross_entropy(logits, targets, reduction="none"), 0.0).sum()
