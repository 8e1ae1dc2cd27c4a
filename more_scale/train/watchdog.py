"""A wedged rank never hangs the job: every rank's StepWatchdog ends its process when no training step has
finished for `timeout_s` (train.collective_timeout_s).

The process group's timeout bounds the collectives that go through it (gloo's, NCCL's watchdog), but not all
of them: on CPU DeepSpeed reduces gradients through its shared-memory op, which waits without a bound, and a
rank stopped by SIGSTOP (or stuck in a driver) keeps every other rank waiting inside one. The watchdog is a
daemon thread that needs nothing from the others: each rank that is still running sees its own step stall,
prints which step it waited on and exits with EXIT_WEDGED; the launcher (torchrun, deepspeed, srun) then ends
the rest. The first step (loader start-up, kernel tuning, compiling) gets FIRST_STEP_FACTOR x the timeout;
phases that are not steps (validation, checkpoints) are left out: the watch is paused around them.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

EXIT_WEDGED = 72  # EX_OSERR: a peer rank stopped answering
FIRST_STEP_FACTOR = 3


class StepWatchdog:
    def __init__(self, timeout_s: float, rank: int):
        self.timeout_s, self.rank = timeout_s, rank
        self._last = time.monotonic()  # when the last step finished (here: the watch's start); None: paused
        self._limit = FIRST_STEP_FACTOR * timeout_s
        self._step = 0
        self._stop = threading.Event()
        threading.Thread(target=self._watch, daemon=True, name="step-watchdog").start()

    def step_done(self, step: int) -> None:
        self._step, self._limit, self._last = step, self.timeout_s, time.monotonic()

    @contextlib.contextmanager
    def paused(self):
        """Around work that is not a training step and may take longer (validation, a checkpoint)."""
        self._last = None
        try:
            yield
        finally:
            self._last = time.monotonic()

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            last, limit = self._last, self._limit
            if last is not None and time.monotonic() - last > limit:
                print(f"rank {self.rank}: no training step finished in {limit:g} s after step {self._step} "
                      "(train.collective_timeout_s): a rank is wedged or gone; ending this rank so the job ends",
                      file=sys.stderr, flush=True)
                os._exit(EXIT_WEDGED)
