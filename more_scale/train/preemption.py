"""Preemption: a signal asks for a checkpoint at a step boundary and an exit that says "requeue me".

SLURM's `#SBATCH --signal=USR1@120` sends SIGUSR1 to every task 120 s before the time limit (or on
preemption); the batch script requeues the job when training exits with EXIT_REQUEUE, and the next
run resumes from that checkpoint (train.resume=auto). SIGTERM keeps its default meaning: launchers
send it to the survivors when a rank has died, and waiting for a checkpoint then would hang.
"""

from __future__ import annotations

import signal

from more_scale import dist

EXIT_REQUEUE = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure, try again


class Preempted(Exception):
    """Raised after the preemption checkpoint is written; entry points turn it into EXIT_REQUEUE."""


class PreemptionWatch:
    def __init__(self, signals=(signal.SIGUSR1,)):
        self._requested = False
        self._flag = dist.AnyRankFlag()
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self._requested = True  # only a flag: the step in flight finishes normally

    def requested(self) -> bool:
        """True on every rank, at the same step, once any rank was signalled. Call once per step: the
        answer is the all-reduce posted at the previous call, so no step waits on the GPU for it; a
        signal is acted on one step after it arrived."""
        answer = self._flag.result()
        self._flag.post(self._requested)
        return answer
