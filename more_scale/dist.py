"""Rank/world discovery (DeepSpeed launcher, torchrun, SLURM) and every collective the package issues.

No other module calls a `torch.distributed` collective (tests/test_dist.py greps for it). Each helper
puts its tensor on the communication device first: NCCL reduces CUDA tensors only, so a CPU tensor
in an all-reduce is a crash at the first GPU step that no gloo test sees. Under gloo that device is
the CPU.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as tdist

# torch 2.13 renamed all_gather_into_tensor (deprecated) to all_gather_single
_all_gather_single = getattr(tdist, "all_gather_single", tdist.all_gather_into_tensor)


def discover() -> tuple[int, int, int]:
    """(rank, world, local_rank) from launcher variables; SLURM's when no launcher set them."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def device_index(local_rank: int, visible: int) -> int:
    """The CUDA device of this rank: its local rank among the GPUs it sees. Where SLURM binds one GPU per task
    (--gpus-per-task=1) every task sees a single cuda:0 while its local rank runs 0..7."""
    return local_rank % visible


def init_distributed(timeout_s: float = 600.0) -> tuple[int, int, int]:
    """Start the process group (nccl on GPUs, gloo on CPU) and return (rank, world, local_rank).
    `timeout_s` bounds every collective: a dead or wedged rank ends the job instead of hanging it."""
    import deepspeed

    rank, world, local_rank = discover()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    # NCCL's watchdog tears a process down when a collective outlives `timeout_s` (3: the torch default, said
    # here so a site-wide 0 cannot turn a wedged peer into a hang); train/watchdog.py covers what it cannot see
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(device_index(local_rank, torch.cuda.device_count()))
    else:
        explain_shm_build()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               timeout=datetime.timedelta(seconds=timeout_s))
    return rank, world, local_rank


STALE_BUILD_LOCK_S = 60  # DeepSpeed's CPU shm op compiles in 20-60 s; an older lock was left by a killed build


def explain_shm_build() -> str | None:
    """On CPU, init_distributed compiles DeepSpeed's shared-memory op once (torch's JIT build, cached under
    TORCH_EXTENSIONS_DIR): minutes without output. Say so first, and name a build lock a killed build left
    behind (it records no owner: every later start would wait on it without end, silently). Returns the notice."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    builds = [*root.glob("deepspeed_shm_comm"), *root.glob("*/deepspeed_shm_comm")]
    notice = None
    if not any(folder.glob("*.so") for folder in builds) and discover()[2] == 0:  # once per node
        notice = f"building DeepSpeed's shared-memory op for CPU collectives (once; a minute or more, cached in {root})"
    for lock in (folder / "lock" for folder in builds):
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:  # no build under way, or it just finished
            continue
        if age > STALE_BUILD_LOCK_S:
            notice = (f"waiting for {lock} ({age:.0f} s old): DeepSpeed's shm op build lock, left by a build that "
                      "was killed unless one is still running; if none is, delete it")
    if notice:
        print(notice, file=sys.stderr, flush=True)
    return notice


def close() -> None:
    """Without an explicit teardown a rare abort at interpreter exit was seen with gloo."""
    if tdist.is_initialized():
        tdist.destroy_process_group()


def rank() -> int:
    return tdist.get_rank() if tdist.is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if tdist.is_initialized() else 1


def backend() -> str:
    """The process group's backend ("nccl", "gloo"), or "none" when running alone."""
    return tdist.get_backend() if tdist.is_initialized() else "none"


def comm_device() -> torch.device:
    """Where collective tensors must live: this rank's GPU under NCCL (the engine's device), else the CPU."""
    if backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


def _reduce(values: Sequence[float], dtype: torch.dtype, op) -> torch.Tensor:
    """One all-reduce of a few scalars; the result stays on the communication device (no host sync)."""
    t = torch.tensor(list(values), dtype=dtype).to(comm_device(), non_blocking=True)
    if tdist.is_initialized():
        tdist.all_reduce(t, op=op)
    return t


def sum_over_ranks(values: Sequence[int]) -> list[int]:
    """Integer counts summed over ranks (a host-device sync: call at log steps only)."""
    return [int(v) for v in _reduce(values, torch.int64, tdist.ReduceOp.SUM).tolist()]


def max_over_ranks(values: Sequence[int]) -> list[int]:
    """Integer values, the largest over ranks (a host-device sync: call at log steps only)."""
    return [int(v) for v in _reduce(values, torch.int64, tdist.ReduceOp.MAX).tolist()]


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Average scalars over ranks (one all-reduce; a host-device sync: call at log steps only)."""
    if world_size() == 1 or not values:
        return values
    names = sorted(values)
    t = _reduce([float(values[n]) for n in names], torch.float64, tdist.ReduceOp.SUM)
    return {n: v / world_size() for n, v in zip(names, t.tolist())}


def mean_tensors_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Like mean_over_ranks for 0-dim device tensors (losses): stacked on the device, one all-reduce,
    one copy to the host. The one host-device sync of a log step."""
    names = sorted(values)
    t = torch.stack([values[n].detach().reshape(()).to(comm_device(), torch.float64) for n in names])
    if tdist.is_initialized() and world_size() > 1:
        tdist.all_reduce(t)
    return {n: v / world_size() for n, v in zip(names, t.tolist())}


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """(n_r, ...) per rank, n_r may differ -> (sum n_r, ...) in rank order, no gradient: each rank's rows padded
    to the longest, all-gathered, trimmed."""
    if world_size() == 1:
        return x
    sizes = _reduce([x.shape[0] if r == tdist.get_rank() else 0 for r in range(world_size())], torch.int64,
                    tdist.ReduceOp.SUM).tolist()
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    full = gather(padded)
    return torch.cat([full[r * max(sizes): r * max(sizes) + n] for r, n in enumerate(sizes)])


def gather_objects(items: list) -> list:
    """Python objects from every rank, concatenated in rank order (pickled through the process group)."""
    if world_size() == 1:
        return list(items)
    out = [None] * world_size()
    tdist.all_gather_object(out, items)
    return [item for part in out for item in part]


class AnyRankFlag:
    """A boolean that becomes True on every rank once any rank raised it, without a host sync per step.

    `post(flag)` all-reduces the flag (MAX) and, on a GPU, starts the copy of the result into pinned
    host memory; `result()` returns the previous post's answer. Under NCCL the all-reduce is queued on
    the GPU and does not block the host; reading it a step later waits only for work issued a step
    earlier, which has long finished. Every rank posts and reads at the same steps, so all ranks see
    the same answer at the same step."""

    def __init__(self):
        self._pending: tuple[torch.Tensor, torch.cuda.Event | None] | None = None

    def post(self, flag: bool) -> None:
        t = _reduce([int(flag)], torch.int32, tdist.ReduceOp.MAX)
        if t.device.type == "cuda":
            host = torch.empty(1, dtype=torch.int32, pin_memory=True)
            host.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._pending = (host, done)
        else:
            self._pending = (t, None)

    def result(self) -> bool:
        """The answer of the last post (False before any); blocks only until that post's copy is done."""
        if self._pending is None:
            return False
        value, done = self._pending
        if done is not None:
            done.synchronize()
        return bool(value.numpy()[0])  # host memory (a pinned copy on a GPU): reading it is no device sync


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
        if backend() == "nccl":
            out = torch.empty((ctx.rows, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            tdist.reduce_scatter_tensor(out, grad)  # sum over ranks, keep this rank's rows
            return out
        tdist.all_reduce(grad)  # gloo has no reduce_scatter: sum everything, keep this rank's rows
        start = tdist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) per rank -> (world * B, ...) in rank order; gradients flow back to each rank's rows,
    summed over the ranks whose losses used them. `x` lives on the engine's device already."""
    if world_size() == 1:
        return x
    return _GatherRows.apply(x.contiguous())


def gather(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (world * B, ...), no gradient (masks, labels); on the device `x` is on."""
    if world_size() == 1:
        return x
    out = torch.empty((world_size() * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x.contiguous())
    return out
