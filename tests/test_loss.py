"""The gathered, masked contrastive loss against a plain reference, in 1 and 2 processes."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from more_scale.config import LossConfig
from more_scale.loss import ContrastiveLoss


def reference_loss(emb, cxr_mask, ecg_mask, scale, weights):
    """Loops over rows: 1/2[CE(a->b) + CE(b->a)] averaged over rows where both exist, per pair."""
    masks = {"text": torch.ones_like(cxr_mask), "cxr": cxr_mask, "ecg": ecg_mask}
    total = 0.0
    for (a, b), w in weights.items():
        rows = [i for i in range(len(cxr_mask)) if masks[a][i] and masks[b][i]]
        terms = []
        for i in rows:
            for q, g in ((a, b), (b, a)):
                cols = [j for j in range(len(cxr_mask)) if masks[g][j]]
                logits = torch.stack([scale * emb[q][i] @ emb[g][j] for j in cols])
                terms.append(-torch.log_softmax(logits, 0)[cols.index(i)])
        total = total + w * 0.5 * torch.stack(terms).sum() / len(rows)
    return total


def _embeddings(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return {m: F.normalize(torch.randn(n, d, generator=g), dim=-1) for m in ("text", "cxr", "ecg")}


def test_single_process_equals_reference_with_missing_modalities():
    emb = _embeddings(8, 6, 0)
    cxr_mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    ecg_mask = torch.tensor([1, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    emb["logit_scale"] = torch.tensor([10.0])
    out = ContrastiveLoss(LossConfig(cxr_ecg=0.5), 0, 1)(emb, cxr_mask, ecg_mask)
    weights = {("text", "cxr"): 1.0, ("text", "ecg"): 1.0, ("cxr", "ecg"): 0.5}
    expected = reference_loss(emb, cxr_mask, ecg_mask, 10.0, weights)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-6)
    assert set(out) == {"loss", "loss/text_cxr", "loss/text_ecg", "loss/cxr_ecg"}


def test_chance_level_is_log_batch():
    emb = {m: torch.ones(16, 4) / 2 for m in ("text", "cxr", "ecg")}  # every pair equally similar
    emb["logit_scale"] = torch.tensor([1.0])
    present = torch.ones(16, dtype=torch.bool)
    out = ContrastiveLoss(LossConfig(), 0, 1)(emb, present, present)
    assert out["loss/text_cxr"].item() == pytest.approx(math.log(16), rel=1e-6)


def _gradient_worker(rank, world, init_file, result_file):
    """Rank `rank` holds rows [rank*B:(rank+1)*B]; returns the DeepSpeed-style averaged gradient."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        weight, inputs, cxr_mask, ecg_mask = _problem()
        b = cxr_mask.shape[0] // world
        rows = slice(rank * b, (rank + 1) * b)
        w = weight.clone().requires_grad_()
        emb = {m: F.normalize(inputs[m][rows] @ w, dim=-1) for m in ("text", "cxr", "ecg")}
        emb["logit_scale"] = torch.tensor([5.0])
        loss = ContrastiveLoss(LossConfig(cxr_ecg=0.3), rank, world)(
            emb, cxr_mask[rows], ecg_mask[rows])
        loss["loss"].backward()
        grad = w.grad.clone()
        dist.all_reduce(grad)  # DeepSpeed averages gradients over data-parallel ranks
        value = loss["loss"].detach().clone()
        dist.all_reduce(value)
        if rank == 0:
            torch.save({"grad": grad / world, "loss": value / world}, result_file)
    finally:
        dist.destroy_process_group()


def _problem():
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(5, 4, generator=g)
    inputs = {m: torch.randn(8, 5, generator=g) for m in ("text", "cxr", "ecg")}
    cxr_mask = torch.tensor([1, 0, 1, 1, 1, 1, 1, 0], dtype=torch.bool)  # unequal per rank on purpose
    ecg_mask = torch.tensor([1, 1, 1, 0, 0, 1, 1, 1], dtype=torch.bool)
    return weight, inputs, cxr_mask, ecg_mask


def test_two_rank_gathered_gradient_equals_single_process(tmp_path):
    mp.spawn(_gradient_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out.pt")), nprocs=2, join=True)
    two = torch.load(tmp_path / "out.pt")
    weight, inputs, cxr_mask, ecg_mask = _problem()
    w = weight.clone().requires_grad_()
    emb = {m: F.normalize(inputs[m] @ w, dim=-1) for m in ("text", "cxr", "ecg")}
    emb["logit_scale"] = torch.tensor([5.0])
    one = ContrastiveLoss(LossConfig(cxr_ecg=0.3), 0, 1)(emb, cxr_mask, ecg_mask)
    one["loss"].backward()
    torch.testing.assert_close(two["loss"], one["loss"].detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(two["grad"], w.grad, rtol=1e-5, atol=1e-7)
