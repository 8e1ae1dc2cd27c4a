"""Batches on the engine's device, copied while the previous step computes, and the time the loop spent
waiting for the loader.

On a GPU the loader's batches arrive in pinned memory (DataLoader pin_memory=True). Batch s is taken from
the loader when the loop asks for it, after step s-1 was queued: the host runs ahead of the GPU, so its
copy, issued non-blocking on a side stream, overlaps step s-1's compute, and no step is held back waiting
for a later batch (taking batch s+1 before handing out batch s would make step s wait for the loader).
The compute stream waits on the copy stream (a GPU-side wait, not a host one) and the tensors are
recorded on the compute stream so their memory is not reused early. On a CPU the batch is just cast to
the compute dtype.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from more_scale.batch import Batch


class DevicePrefetcher:
    def __init__(self, batches: Iterator[Batch], device: torch.device, dtype: torch.dtype):
        self.batches, self.device, self.dtype = batches, device, dtype
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.wait_s = 0.0  # host seconds blocked in the loader, summed; the loop reads and resets it

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        start = time.perf_counter()
        batch = next(self.batches)
        self.wait_s += time.perf_counter() - start
        if self.stream is None:
            return batch.to(self.device, self.dtype)
        with torch.cuda.stream(self.stream):
            batch = batch.to(self.device, self.dtype, non_blocking=True)
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        for t in batch.inputs().values():
            t.record_stream(current)
        return batch
