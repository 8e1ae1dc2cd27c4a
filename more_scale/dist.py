"""Rank/world discovery (DeepSpeed launcher, torchrun, SLURM) and the gathers the loss needs."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

# torch 2.13 renamed all_gather_into_tensor (deprecated) to all_gather_single
_all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


def discover() -> tuple[int, int, int]:
    """(rank, world, local_rank) from launcher variables; SLURM's when no launcher set them."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def init_distributed() -> tuple[int, int, int]:
    """Start the process group (nccl on GPUs, gloo on CPU) and return (rank, world, local_rank)."""
    import deepspeed

    rank, world, local_rank = discover()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    return rank, world, local_rank


def close() -> None:
    """Without an explicit teardown a rare abort at interpreter exit was seen with gloo."""
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


class _GatherRows(torch.autograd.Function):
    """Synchronous all_gather along dim 0; the backward sums every rank's gradient for this rank's rows.

    Not torch's functional `all_gather_single_autograd`: its collectives are asynchronous, and
    interleaved with the synchronous ones DeepSpeed and the loss issue on the same gloo group they
    crashed ranks here (SIGSEGV / SIGABRT, torch 2.13); torch.distributed.nn's gather is deprecated."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = x.shape[0]
        return gather(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            out = torch.empty((ctx.rows, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad)  # sum over ranks, keep this rank's rows
            return out
        dist.all_reduce(grad)  # gloo has no reduce_scatter: sum everything, keep this rank's rows
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) per rank -> (world * B, ...) in rank order; gradients flow back to each rank's rows,
    summed over the ranks whose losses used them."""
    if world_size() == 1:
        return x
    return _GatherRows.apply(x.contiguous())


def gather(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (world * B, ...), no gradient (masks, labels)."""
    if world_size() == 1:
        return x
    out = torch.empty((world_size() * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x.contiguous())
    return out


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Average scalars over ranks (one all-reduce; a host-device sync: call at log steps only)."""
    if world_size() == 1 or not values:
        return values
    names = sorted(values)
    t = torch.tensor([float(values[n]) for n in names], dtype=torch.float64)
    dist.all_reduce(t)
    return {n: v / world_size() for n, v in zip(names, t.tolist())}
