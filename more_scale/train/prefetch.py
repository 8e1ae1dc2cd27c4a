"""Batches on the engine's device one step ahead, and the time the loop spent waiting for the loader.

On a GPU the loader's batches arrive in pinned memory (DataLoader pin_memory=True); the copy of batch
s+1 is issued on a side stream, non-blocking, right after batch s is handed to the step, so it runs
while step s computes. Before step s+1 uses it, the compute stream waits on the copy stream (a GPU-side
wait, not a host one) and the tensors are recorded on the compute stream so their memory is not
reused early. On a CPU the batch is just cast to the compute dtype.
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
        self._next = self._fetch()

    def _fetch(self) -> Batch:
        start = time.perf_counter()
        batch = next(self.batches)
        self.wait_s += time.perf_counter() - start
        if self.stream is None:
            return batch.to(self.device, self.dtype)
        with torch.cuda.stream(self.stream):
            return batch.to(self.device, self.dtype, non_blocking=True)

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        batch = self._next
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            for t in batch.inputs().values():
                t.record_stream(current)
        self._next = self._fetch()  # the next copy overlaps this step's compute
        return batch
