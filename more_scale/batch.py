"""The batch: what the loaders hand the model and the loss, and what travels beside it.

A `Batch` holds the model inputs of B samples (DESIGN.md "The batch"), all tensors with B rows:

  cxr             (B, 1, H, W) float   X-rays, normalised; zeros where the sample has none
  cxr_mask        (B,) bool            the sample has an X-ray
  ecg             (B, 12, T) float     ECGs in [-1, 1]; zeros where the sample has none
  ecg_mask        (B,) bool            the sample has an ECG
  input_ids       (B, L) long          the joined report, padded per batch to its longest (L)
  attention_mask  (B, L) long          1 on real tokens

and `info`, the bookkeeping that never reaches the device: sample keys, meta.json contents, stream
positions, and the samples its loader worker skipped since its previous batch (by reason and by
shard). The counts travel by value inside the batch, so nothing is counted in module globals.

`pin_memory()` (called by torch's DataLoader with pin_memory=True) and `to(device, dtype,
non_blocking)` move the inputs in one call; the bookkeeping stays on the host.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

INPUTS = ("cxr", "cxr_mask", "ecg", "ecg_mask", "input_ids", "attention_mask")


@dataclass
class Bookkeeping:
    keys: list[str] = field(default_factory=list)  # __key__ of each sample
    meta: list[dict] = field(default_factory=list)  # meta.json of each sample (labels, ids, split)
    positions: list[int] = field(default_factory=list)  # training: global stream positions; iter_batches: running index
    skipped: dict[str, int] = field(default_factory=dict)  # unreadable samples by reason, since the last batch
    skipped_shards: dict[str, int] = field(default_factory=dict)  # ... and by shard file name
    text_tokens: int = 0  # real (unpadded) report tokens in the batch, counted on the host
    has_text: list[bool] = field(default_factory=list)  # a report per sample (evaluation may hold image-only ones)
    remote_retries: int = 0  # object store requests retried while reading this batch (data/storage.py)


@dataclass
class Batch:
    cxr: torch.Tensor
    cxr_mask: torch.Tensor
    ecg: torch.Tensor
    ecg_mask: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    info: Bookkeeping = field(default_factory=Bookkeeping)

    @classmethod
    def complete(cls, cxr: torch.Tensor, ecg: torch.Tensor, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> Batch:
        """A batch whose every sample has both modalities (benchmarks, tests)."""
        present = torch.ones(cxr.shape[0], dtype=torch.bool, device=cxr.device)
        return cls(cxr, present, ecg, present.clone(), input_ids, attention_mask)

    def __len__(self) -> int:
        return self.cxr.shape[0]

    def inputs(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in INPUTS}

    def _replace(self, fn) -> Batch:
        return dataclasses.replace(self, **{name: fn(t) for name, t in self.inputs().items()})

    def pin_memory(self) -> Batch:
        """Page-locked host copies: what makes a later non_blocking copy to a GPU asynchronous."""
        return self._replace(lambda t: t.pin_memory())

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None, non_blocking: bool = False) -> Batch:
        """Inputs on `device`; float inputs (cxr, ecg) cast to `dtype` when given. The cast runs on the
        device, after the copy, so the host copies the compact stored dtype."""
        def move(t: torch.Tensor) -> torch.Tensor:
            t = t.to(device, non_blocking=non_blocking)
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return self._replace(move)

    def rows(self, index: slice | torch.Tensor) -> Batch:
        """The rows `index` (a slice, or a 1-D tensor of row numbers) of every input and of the per-sample
        bookkeeping; the skip counts stay with the part that starts at row 0."""
        picked = range(len(self))[index] if isinstance(index, slice) else index.tolist()
        pick = lambda items: [items[i] for i in picked] if items else []  # noqa: E731
        first = bool(picked) and picked[0] == 0
        info = Bookkeeping(pick(self.info.keys), pick(self.info.meta), pick(self.info.positions),
                           self.info.skipped if first else {}, self.info.skipped_shards if first else {},
                           int(self.attention_mask[index].sum()), pick(self.info.has_text))
        return dataclasses.replace(self._replace(lambda t: t[index]), info=info)
