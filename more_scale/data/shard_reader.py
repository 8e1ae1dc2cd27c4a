"""Random access into WebDataset tars: a sample by (shard, index), one pread each.

Each tar's member table (keys, member names, offsets and sizes) is written beside it when the shard is built
(`<shard>.table.json`) and read from there, so opening a shard reads one small file, never the tar's headers;
a shard without one (built before it existed) is scanned once with Python's tarfile, which reads every header
form tar itself writes (ustar, PAX extended headers for long names, GNU long names, base-256 sizes).
Members group into samples by webdataset's own rule (`base_plus_ext`: the key is the name up to the first dot
of its last component; a name without a dot belongs to no sample), so training and evaluation see the same
samples. A sample's members are
contiguous in the tar, so reading it is one pread from its first header to the end of its last member's
data. A sample that repeats a member is unreadable (a skip), in every reader.
"""

from __future__ import annotations

import asyncio
import json
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from webdataset.tariterators import base_plus_ext

from more_scale.data import storage


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

    def to_json(self, tar_bytes: int) -> dict:
        """The table as written beside its tar; `tar_bytes` ties it to the tar it describes."""
        return {"tar_bytes": tar_bytes, "keys": self.keys, "exts": [list(e) for e in self.exts],
                "first": self.first.tolist(), "headers": self.headers.tolist(), "data": self.data.tolist(),
                "sizes": self.sizes.tolist()}

    @classmethod
    def from_json(cls, tree: dict) -> ShardTable:
        shared: dict[tuple[str, ...], tuple[str, ...]] = {}
        exts = [shared.setdefault(tuple(e), tuple(e)) for e in tree["exts"]]
        return cls(list(tree["keys"]), exts, *(np.asarray(tree[k], np.int64) for k in ("first", "headers", "data", "sizes")))


def table_path(tar_path: str) -> str:
    """Where a shard's member table is stored: train-000000.tar -> train-000000.table.json."""
    return tar_path.removesuffix(".tar") + ".table.json"


def load_table(tar_path: str, tar_bytes: int | None = None) -> ShardTable:
    """The stored member table of a tar, or a scan of a local tar when none was stored (a remote one must have
    its table: a scan would read the whole object). A table written for a tar of another size is refused: it
    describes a shard that has since been replaced. `tar_bytes`: the tar's size where the caller knows it (the
    index, checked against the store by read_index), which spares a remote shard a HEAD: its table is one GET."""
    stored = table_path(tar_path)
    try:
        text = storage.read_bytes(stored)
    except FileNotFoundError:  # storage.MissingObject is one
        if storage.is_remote(tar_path):
            raise ShardMismatch(f"{stored}: missing; a shard set read from an object store needs the member tables "
                                "build_shards.py writes beside each tar (rebuild it with this version)") from None
        return ShardTable.scan(tar_path)
    size = storage.size(tar_path) if tar_bytes is None else tar_bytes
    try:
        tree = json.loads(text)
        written_for = tree["tar_bytes"]
        table = ShardTable.from_json(tree)
    except (ValueError, KeyError, TypeError) as error:  # not JSON, or not a table
        raise ShardMismatch(f"{stored} is not a member table ({type(error).__name__}: {error}); rebuild the shard "
                            "set") from None
    if written_for != size:
        raise ShardMismatch(f"{stored} describes a tar of {written_for} bytes, {tar_path} has {size}: the shard was "
                            "replaced after it was built; rebuild the shard set")
    return table


class ShardReader:
    """Samples of a shard set by (shard, index): {member name: bytes, "__key__", "__url__"}. Paths are files or
    object URLs (data/storage.py): a sample is one pread or one ranged GET either way."""

    def __init__(self, paths: list[str], samples: list[int] | None = None, tar_bytes: list[int] | None = None):
        """`samples`: what the shard index says each tar holds; a tar whose table disagrees raises ShardMismatch.
        `tar_bytes`: each tar's size as the index says (read_index checked it), else asked of the file or store."""
        self.paths, self.samples, self.tar_bytes = paths, samples, tar_bytes
        self.tables: dict[int, ShardTable] = {}
        self._retries = 0  # object store requests retried since the last take_retries(); fetch threads add to it
        self._lock = threading.Lock()
        self.on_store = [storage.is_remote(p) for p in paths]  # per shard: on an object store
        self.remote = any(self.on_store)  # some shards on an object store: read-ahead pays

    @classmethod
    def of_index(cls, directory: str | Path, entries: list[dict]) -> ShardReader:
        """The reader of a shard set's index entries (read_index(directory)["shards"])."""
        return cls([storage.join(directory, e["name"]) for e in entries], [e["samples"] for e in entries],
                   [e["bytes"] for e in entries])

    def table(self, shard: int) -> ShardTable:
        if shard not in self.tables:
            table = load_table(self.paths[shard], None if self.tar_bytes is None else self.tar_bytes[shard])
            if self.samples is not None and len(table) != self.samples[shard]:
                raise ShardMismatch(f"{self.paths[shard]} holds {len(table)} samples, shards.json says "
                                    f"{self.samples[shard]}: the shard was replaced or the index edited; rebuild the "
                                    "shard set")
            self.tables[shard] = table
        return self.tables[shard]

    def take_retries(self) -> int:
        with self._lock:
            retries, self._retries = self._retries, 0
        return retries

    def _count_retry(self) -> None:
        with self._lock:
            self._retries += 1

    def span(self, shard: int, index: int) -> tuple[int, int]:
        """(first byte, length) of a sample: from its first header to the end of its last member's data."""
        table = self.table(shard)
        lo, hi = table.first[index], table.first[index + 1]
        start = int(table.headers[lo])
        return start, int(table.data[hi - 1] + table.sizes[hi - 1]) - start

    def remote_groups(self, items: list[tuple[int, int]]) -> dict[int, list[int]]:
        """The samples at `items` (shard, index) that live on an object store, by shard: what fetch() takes."""
        groups: dict[int, list[int]] = {}
        for shard, index in items:
            if self.on_store[shard]:
                groups.setdefault(shard, []).append(index)
        return groups

    async def fetch(self, groups: dict[int, list[int]]) -> dict[tuple[int, int], bytes]:
        """The bytes of the samples in `groups` (a remote_groups() answer) by (shard, index), ahead of read(): every
        shard's ranged GETs in flight at once, neighbours merged; a table not loaded yet loads on the event loop's
        executor threads. What fails here is left out, to be read again (and retried, or skipped) by read()."""
        async def shard_bytes(shard: int, indices: list[int]) -> dict[tuple[int, int], bytes]:
            try:
                if shard not in self.tables:
                    await asyncio.get_running_loop().run_in_executor(None, self.table, shard)
                spans = [self.span(shard, i) for i in indices]
                blobs = await storage.read_ranges_async(self.paths[shard], [s for s, _ in spans], [n for _, n in spans],
                                                        self._count_retry)
            except (OSError, ValueError, ShardMismatch, tarfile.TarError):
                return {}
            return {(shard, index): blob for index, blob in zip(indices, blobs)}

        fetched: dict[tuple[int, int], bytes] = {}
        for part in await asyncio.gather(*(shard_bytes(shard, indices) for shard, indices in groups.items())):
            fetched.update(part)
        return fetched

    def read(self, shard: int, index: int, blob: bytes | None = None) -> dict:
        """The sample's members, from `blob` (its bytes, fetched ahead) or by one pread or ranged GET."""
        table = self.table(shard)
        lo, hi = table.first[index], table.first[index + 1]
        exts = table.exts[index]
        if len(set(exts)) != len(exts):
            raise ValueError(f"sample {table.keys[index]!r} repeats a member ({', '.join(exts)})")
        start, length = self.span(shard, index)
        data_at = table.data[lo:hi] - start
        if blob is None or len(blob) != length:
            blob = self._bytes(shard, index, start, length)
        sample = {ext: blob[at:at + size] for ext, at, size in zip(exts, data_at, table.sizes[lo:hi])}
        return {**sample, "__key__": table.keys[index], "__url__": self.paths[shard]}

    def _bytes(self, shard: int, index: int, start: int, length: int) -> bytes:
        try:
            return storage.read_range(self.paths[shard], start, length, self._count_retry)
        except ValueError:  # a file cut short (an object store's short answer is a RemoteError, said as such)
            raise ValueError(f"{self.paths[shard]} ends inside sample {self.table(shard).keys[index]!r}") from None

    def members(self, shard: int, name: str) -> list[bytes | None]:
        """One member (e.g. meta.json) of every sample of a shard, its data alone, None for a sample without it:
        preads, or from an object store one call whose ranged GETs go concurrently (one GET per sample in turn
        would take hours over a MIMIC-scale set)."""
        table = self.table(shard)
        at = {i: int(table.first[i]) + table.exts[i].index(name) for i in range(len(table)) if name in table.exts[i]}
        blobs = storage.read_ranges(self.paths[shard], [int(table.data[m]) for m in at.values()],
                                    [int(table.sizes[m]) for m in at.values()], self._count_retry)
        found = dict(zip(at, blobs))
        return [found.get(i) for i in range(len(table))]
