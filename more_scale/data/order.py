"""The training stream's global order: which sample sits at each position, from (seed, position) alone.

Position p of the global stream names one sample of the shard set, whatever the number of nodes,
ranks or loader workers (MosaicML Streaming's "elastic determinism", on WebDataset tars read by index):

- `epoch`: without replacement. Epoch e is a permutation of all samples fixed by (seed, e): shards in
  a shuffled order, then samples shuffled within blocks of `shuffle_block` consecutive samples, so a
  reader works through a few shards at a time. Position p is sample p % N of epoch p // N.
- `resampled`: with replacement, infinite. Each position draws a source by weight, then a sample of that
  source uniformly; draws come in chunks keyed by (seed, chunk), so any position is reachable directly.

Global micro-step s is positions [s*G, (s+1)*G) with G = world x micro-batch; rank r reads its
slice [s*G + r*b, s*G + (r+1)*b). Resume state is one number, the position (global samples consumed):
a run resumed on another world size or batch size continues the same sequence, re-reading nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

MODES = ("resampled", "epoch")
_CHUNK = 4096  # resampled draws generated per (seed, chunk) key


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([k & 0xFFFFFFFF for k in key])


@dataclass(frozen=True)
class SampleSpace:
    """All samples of one or more shard sets, numbered 0..total-1 in index order (source by source)."""
    shard_sizes: tuple[int, ...]  # samples per shard, every source's shards in order
    source_sizes: tuple[int, ...]  # samples per source

    @property
    def total(self) -> int:
        return sum(self.source_sizes)

    @cached_property
    def shard_ends(self) -> np.ndarray:
        return np.cumsum(self.shard_sizes)

    def locate(self, sample: int) -> tuple[int, int]:
        """Global sample id -> (shard number, index inside that shard)."""
        shard = int(np.searchsorted(self.shard_ends, sample, side="right"))
        return shard, sample - int(self.shard_ends[shard] - self.shard_sizes[shard])


class GlobalOrder:
    def __init__(self, space: SampleSpace, mode: str, seed: int, shuffle_block: int = 4096,
                 weights: tuple[float, ...] = ()):
        if mode not in MODES:
            raise ValueError(f"stream mode {mode!r}: expected one of {MODES}")
        if space.total == 0:
            raise ValueError("the shard set holds no samples")
        weights = weights or tuple(float(n) for n in space.source_sizes)  # default: proportional to size
        if len(weights) != len(space.source_sizes) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"source weights {weights}: expected {len(space.source_sizes)} non-negative numbers")
        if mode == "epoch" and len(set(w / n for w, n in zip(weights, space.source_sizes))) > 1:
            raise ValueError("per-source weights need mode=resampled: an epoch reads every sample once")
        self.space, self.mode, self.seed, self.block = space, mode, seed, shuffle_block
        self.weights = np.asarray(weights, np.float64) / sum(weights)
        self.source_starts = np.concatenate([[0], np.cumsum(space.source_sizes)[:-1]]).astype(np.int64)

    @lru_cache(maxsize=2)  # a batch may straddle two epochs; the object lives as long as its stream
    def epoch_permutation(self, epoch: int) -> np.ndarray:
        ends = self.space.shard_ends
        starts = ends - np.asarray(self.space.shard_sizes)
        shards = _rng(self.seed, epoch, 0).permutation(len(ends))
        order = np.concatenate([np.arange(starts[s], ends[s]) for s in shards])
        for k, lo in enumerate(range(0, len(order), self.block)):
            block = order[lo:lo + self.block]
            order[lo:lo + self.block] = block[_rng(self.seed, epoch, 1, k).permutation(len(block))]
        return order

    @lru_cache(maxsize=2)
    def _resampled_chunk(self, chunk: int) -> np.ndarray:
        rng = _rng(self.seed, chunk, 2)
        sources = rng.choice(len(self.weights), _CHUNK, p=self.weights)
        sizes = np.asarray(self.space.source_sizes)[sources]
        return self.source_starts[sources] + (rng.random(_CHUNK) * sizes).astype(np.int64)

    def sample_at(self, position: int) -> int:
        """The global sample id at a stream position."""
        if self.mode == "epoch":
            epoch, offset = divmod(position, self.space.total)
            return int(self.epoch_permutation(epoch)[offset])
        chunk, offset = divmod(position, _CHUNK)
        return int(self._resampled_chunk(chunk)[offset])

    def replacement(self, position: int, attempt: int) -> int:
        """A stand-in for an unreadable sample at `position`: fixed by (seed, position, attempt)."""
        return int(_rng(self.seed, position, attempt, 3).integers(self.space.total))

    def describe(self, position: int) -> dict:
        """What a checkpoint records of the stream (the position alone is enough to resume)."""
        state = {"mode": self.mode, "seed": self.seed, "position": position}
        if self.mode == "epoch":
            state["epoch"], state["sample_in_epoch"] = divmod(position, self.space.total)
        return state


def sample_seed(seed: int, position: int, attempt: int = 0) -> int:
    """The seed of a sample's random augmentations: the same wherever and whenever it is read."""
    return int(_rng(seed, position, attempt, 4).integers(2**31))


def rank_positions(start: int, local_step: int, rank: int, world: int, batch: int) -> range:
    """The positions rank `rank` reads for its `local_step`-th micro-batch of a stream begun at `start`."""
    first = start + local_step * world * batch + rank * batch
    return range(first, first + batch)
