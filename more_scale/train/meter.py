"""What a log step reports about speed: step time, data wait, samples/s, tokens/s, TFLOP/s, MFU, memory.

Times are host wall-clock over the window since the previous log step. The loop never blocks on the
GPU between log steps, and the log step's loss read synchronises once, so a window's time is the
GPU's time for its steps (the host runs at most a step or two ahead). FLOPs come from the model's
structure (models/flops.py) and the shapes of the batches the window trained on; MFU divides this
rank's achieved TFLOP/s by the matmul peak measured on this device at start-up (hardware.py).
"""

from __future__ import annotations

import resource
import time

import torch

from more_scale.hardware import Peak
from more_scale.models.flops import StepFlops


class StepMeter:
    def __init__(self, flops: StepFlops, peak: Peak, device: torch.device):
        self.flops, self.peak, self.device = flops, peak, device
        self.restart()

    def restart(self) -> None:
        """Start a new window (after a log step, and after a checkpoint save: saves are not steps)."""
        self.start, self.steps, self.samples, self.tokens, self.step_flops = time.perf_counter(), 0, 0, 0, 0.0

    def add_micro_batch(self, rows: int, text_tokens: int, text_length: int) -> None:
        """One micro-batch of this rank: `text_tokens` real tokens, padded to `text_length`. The window's
        text tokens/s is this rank's (the loop sums it over ranks); TFLOP/s and MFU are per rank."""
        self.tokens += text_tokens
        self.step_flops += self.flops.per_step(rows, text_length)

    def add_step(self, global_samples: int) -> None:
        self.steps += 1
        self.samples += global_samples

    def report(self, data_wait_s: float) -> dict[str, float]:
        """The window's figures (call after the log step's synchronising read); starts a new window."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        achieved = self.step_flops / elapsed / 1e12
        out = {"step_s": elapsed / max(self.steps, 1), "data_wait_s": data_wait_s / max(self.steps, 1),
               "data_wait_share": min(data_wait_s / elapsed, 1.0), "samples_per_s": self.samples / elapsed,
               "text_tokens_per_s": self.tokens / elapsed, "tflops": achieved, "mfu": self.peak.mfu(achieved)}
        if self.device.type == "cuda":
            out["mem_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:  # the process's peak resident set (ru_maxrss is in KiB on Linux)
            out["mem_peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        self.restart()
        return out
