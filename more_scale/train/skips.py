"""Corrupt samples the loaders skipped: counted by reason and shard, summed over ranks, capped by a rate; and the
object store requests the loaders retried."""

from __future__ import annotations

from collections import Counter

from more_scale import dist
from more_scale.batch import Bookkeeping

MIN_SAMPLES = 200  # judge the rate only once this many samples were read (a bad first shard is no trend)


class SkipLedger:
    def __init__(self, max_rate: float):
        self.max_rate = max_rate
        self.reasons: Counter = Counter()
        self.shards: Counter = Counter()
        self.used = 0
        self.retries = 0

    def add(self, info: Bookkeeping) -> None:
        self.reasons.update(info.skipped)
        self.shards.update(info.skipped_shards)
        self.used += len(info.keys)
        self.retries += info.remote_retries

    def global_totals(self) -> tuple[int, int, int]:
        """(skipped, used, remote retries) summed over ranks: one all-reduce, call at log steps only."""
        skipped, used, retries = dist.sum_over_ranks([sum(self.reasons.values()), self.used, self.retries])
        return skipped, used, retries

    def check(self, skipped: int, used: int) -> None:
        """Raise (on every rank alike: the totals are global) when too many samples were corrupt."""
        read = skipped + used
        if read < MIN_SAMPLES or skipped <= self.max_rate * read:
            return
        worst = ", ".join(f"{name} ({n})" for name, n in self.shards.most_common(5)) or "none on this rank"
        reasons = ", ".join(f"{reason} ({n})" for reason, n in self.reasons.most_common(5))
        raise RuntimeError(f"{skipped} of {read} samples read were corrupt ({skipped / read:.1%} > "
                           f"data.max_skip_rate={self.max_rate:g}); worst shards on this rank: {worst}; reasons: {reasons}")
