"""Preemption: a signal asks for a checkpoint at the next step boundary and an exit that says "requeue me".

SLURM's `#SBATCH --signal=USR1@120` sends SIGUSR1 to every task 120 s before the time limit (or on
preemption); the batch script requeues the job when training exits with EXIT_REQUEUE, and the next
run resumes from that checkpoint (train.resume=auto). SIGTERM keeps its default meaning: launchers
send it to the survivors when a rank has died, and waiting for a checkpoint then would hang.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

EXIT_REQUEUE = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure, try again


class Preempted(Exception):
    """Raised after the preemption checkpoint is written; entry points turn it into EXIT_REQUEUE."""


class PreemptionWatch:
    def __init__(self, signals=(signal.SIGUSR1,)):
        self._requested = False
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self._requested = True  # only a flag: the step in flight finishes normally

    def requested(self) -> bool:
        """True on every rank once any rank was signalled (one MAX all-reduce of an int per step),
        so all ranks stop at the same step and write the same checkpoint."""
        flag = torch.tensor([int(self._requested)])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
