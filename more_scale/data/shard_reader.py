"""Random access into WebDataset tars: a sample by (shard, index), one pread each.

Each tar's member table is scanned once (wids' header scan) and kept compact: keys, member names,
header offsets and sizes. A sample's members are contiguous in the tar, so reading it is one pread from
its first header to the end of its last member's data. Revisiting a shard costs nothing, so draws
spread over hundreds of shards stay cheap (re-scanning a 1000-sample tar takes about 0.1 s).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from wids.wids import group_by_key, splitname
from wids.wids_mmtar import MMIndexedTar

TAR_HEADER_BYTES = 512  # a ustar member's data starts this far after its header (POSIX.1-1988)


@dataclass(frozen=True)
class ShardTable:
    """One tar's members, grouped into samples: what reading a sample by index needs, kept compact."""
    keys: list[str]
    exts: list[tuple[str, ...]]  # member names after the key, per sample (the few distinct tuples are shared)
    first: np.ndarray  # (samples + 1,) index of each sample's first member; members of a sample are contiguous
    headers: np.ndarray  # (members,) byte offset of each member's tar header
    sizes: np.ndarray  # (members,) data bytes

    @classmethod
    def scan(cls, path: str) -> ShardTable:
        tar = MMIndexedTar(path)  # wids' header scan
        try:
            names, headers, sizes = zip(*tar.by_index) if tar.by_index else ((), (), ())
        finally:
            tar.close()
        groups = group_by_key(names)
        shared: dict[tuple[str, ...], tuple[str, ...]] = {}
        keys, exts = [], []
        for members in groups:
            split = [splitname(names[i]) for i in members]
            keys.append(split[0][0])
            ext = tuple(e.lstrip(".") for _, e in split)
            exts.append(shared.setdefault(ext, ext))
        first = np.cumsum([0] + [len(g) for g in groups])
        return cls(keys, exts, first, np.asarray(headers, np.int64), np.asarray(sizes, np.int64))


class ShardReader:
    """Samples of a shard set by (shard, index): {member name: bytes, "__key__", "__url__"}."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        self.tables: dict[int, ShardTable] = {}

    def read(self, shard: int, index: int) -> dict:
        if shard not in self.tables:
            self.tables[shard] = ShardTable.scan(self.paths[shard])
        table = self.tables[shard]
        lo, hi = table.first[index], table.first[index + 1]
        start = int(table.headers[lo])
        data_at = table.headers[lo:hi] + TAR_HEADER_BYTES - start
        fd = os.open(self.paths[shard], os.O_RDONLY)
        try:
            blob = os.pread(fd, int(data_at[-1] + table.sizes[hi - 1]), start)
        finally:
            os.close(fd)
        sample = {ext: blob[at:at + size] for ext, at, size in zip(table.exts[index], data_at, table.sizes[lo:hi])}
        return {**sample, "__key__": table.keys[index], "__url__": self.paths[shard]}
