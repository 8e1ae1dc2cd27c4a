"""Random access into WebDataset tars: a sample by (shard, index), one pread each.

Each tar's member table is read once with Python's tarfile, which reads every header form tar itself
writes (ustar, PAX extended headers for long names, GNU long names, base-256 sizes), and kept compact:
keys, member names, offsets and sizes. Members group into samples by webdataset's own rule
(`base_plus_ext`: the key is the name up to the first dot of its last component; a name without a dot
belongs to no sample), so training and evaluation see the same samples. A sample's members are
contiguous in the tar, so reading it is one pread from its first header to the end of its last member's
data. A sample that repeats a member is unreadable (a skip), in every reader.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass

import numpy as np
from webdataset.tariterators import base_plus_ext


class ShardMismatch(RuntimeError):
    """A tar that does not hold what its shard index says: the shard set is inconsistent, not one sample bad."""


@dataclass(frozen=True)
class ShardTable:
    """One tar's members, grouped into samples: what reading a sample by index needs, kept compact."""
    keys: list[str]
    exts: list[tuple[str, ...]]  # member names after the key, per sample (the few distinct tuples are shared)
    first: np.ndarray  # (samples + 1,) index of each sample's first member; members of a sample are contiguous
    headers: np.ndarray  # (members,) byte offset of each member's first header (a PAX header included)
    data: np.ndarray  # (members,) byte offset of each member's data
    sizes: np.ndarray  # (members,) data bytes

    @classmethod
    def scan(cls, path: str) -> ShardTable:
        keys, exts, first, headers, data, sizes = [], [], [0], [], [], []
        shared: dict[tuple[str, ...], tuple[str, ...]] = {}
        sample_exts: list[str] = []

        def close_sample() -> None:
            if sample_exts:
                ext = tuple(sample_exts)
                exts.append(shared.setdefault(ext, ext))
                first.append(len(headers))
                sample_exts.clear()

        with tarfile.open(path, "r:") as tar:
            for member in tar:
                key, ext = base_plus_ext(member.name)
                if not member.isfile() or key is None:
                    continue
                if not keys or key != keys[-1]:
                    close_sample()
                    keys.append(key)
                sample_exts.append(ext.lower())
                headers.append(member.offset)
                data.append(member.offset_data)
                sizes.append(member.size)
        close_sample()
        return cls(keys, exts, np.asarray(first, np.int64), np.asarray(headers, np.int64),
                   np.asarray(data, np.int64), np.asarray(sizes, np.int64))

    def __len__(self) -> int:
        return len(self.keys)


class ShardReader:
    """Samples of a shard set by (shard, index): {member name: bytes, "__key__", "__url__"}."""

    def __init__(self, paths: list[str], samples: list[int] | None = None):
        """`samples`: what the shard index says each tar holds; a tar whose table disagrees raises ShardMismatch."""
        self.paths, self.samples = paths, samples
        self.tables: dict[int, ShardTable] = {}

    def table(self, shard: int) -> ShardTable:
        if shard not in self.tables:
            table = ShardTable.scan(self.paths[shard])
            if self.samples is not None and len(table) != self.samples[shard]:
                raise ShardMismatch(f"{self.paths[shard]} holds {len(table)} samples, shards.json says "
                                    f"{self.samples[shard]}: the shard was replaced or the index edited; rebuild the "
                                    "shard set")
            self.tables[shard] = table
        return self.tables[shard]

    def read(self, shard: int, index: int) -> dict:
        table = self.table(shard)
        lo, hi = table.first[index], table.first[index + 1]
        exts = table.exts[index]
        if len(set(exts)) != len(exts):
            raise ValueError(f"sample {table.keys[index]!r} repeats a member ({', '.join(exts)})")
        start = int(table.headers[lo])
        data_at = table.data[lo:hi] - start
        fd = os.open(self.paths[shard], os.O_RDONLY)
        try:
            blob = os.pread(fd, int(data_at[-1] + table.sizes[hi - 1]), start)
        finally:
            os.close(fd)
        if len(blob) < data_at[-1] + table.sizes[hi - 1]:
            raise ValueError(f"{self.paths[shard]} ends inside sample {table.keys[index]!r}")
        sample = {ext: blob[at:at + size] for ext, at, size in zip(exts, data_at, table.sizes[lo:hi])}
        return {**sample, "__key__": table.keys[index], "__url__": self.paths[shard]}

    def member(self, shard: int, index: int, name: str) -> bytes | None:
        """One member of a sample (e.g. meta.json) by one pread of its data alone; None when the sample has none."""
        table = self.table(shard)
        lo = int(table.first[index])
        exts = table.exts[index]
        if name not in exts:
            return None
        at = lo + exts.index(name)
        size = int(table.sizes[at])
        fd = os.open(self.paths[shard], os.O_RDONLY)
        try:
            blob = os.pread(fd, size, int(table.data[at]))
        finally:
            os.close(fd)
        if len(blob) < size:
            raise ValueError(f"{self.paths[shard]} ends inside sample {table.keys[index]!r}")
        return blob
