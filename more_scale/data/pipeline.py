"""Loaders: shards -> decoded samples -> collated batch dicts (DESIGN.md "The batch").

Training reads samples by index from the tars (wids) in the global order of `order.py`: the stream is
a function of (seed, position), partitioned over ranks and loader workers, so it resumes exactly from
a position stored in a checkpoint, on any world size. Evaluation streams read each shard once, in
order. A sample that fails to decode is skipped and counted by reason and by shard; each batch carries
its worker's counts since its previous batch in `batch["skipped"]` and `batch["skipped_shards"]`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from struct import error as struct_error

import cv2
import numpy as np
import torch
import webdataset as wds
from wids.wids import group_by_key, splitname
from wids.wids_mmtar import MMIndexedTar

from more_scale.config import DataConfig
from more_scale.data import cxr, ecg, order, reports
from more_scale.data.build import read_index

_SKIPPED: Counter = Counter()  # per process: each loader worker counts its own skips, by reason
_SKIPPED_SHARDS: Counter = Counter()  # ... and by shard file name


def _count_and_continue(reason: str, error: Exception) -> bool:
    _SKIPPED[f"{reason}: {type(error).__name__}"] += 1
    return True


def _skip(reason: str, sample: dict) -> None:
    _SKIPPED[reason] += 1
    _SKIPPED_SHARDS[Path(str(sample.get("__url__", "?"))).name] += 1


class ModelInputs:
    """Stored arrays -> model inputs: centre crop and no randomness, or (augment) the paper's training
    augmentations with every draw fixed by a per-sample seed, so a stream replays exactly."""

    def __init__(self, cfg: DataConfig, augment: bool):
        self.cfg, self.augment = cfg, augment
        self.cxr_augmentation = cxr.train_augmentation(cfg.image_size, tuple(cfg.cxr_crop_scale), cfg.cxr_jitter,
                                                       cfg.cxr_blur_p, cfg.cxr_flip_p) if augment else None

    def random(self, seed: int) -> tuple[np.random.Generator, random.Random] | None:
        """One sample's generators (numpy's and Python's, as albumentations draws from both)."""
        return (np.random.default_rng(seed), random.Random(seed)) if self.augment else None

    def image(self, image: np.ndarray, draws) -> np.ndarray:
        if draws is not None:
            return cxr.augmented_input(image, self.cxr_augmentation, *draws)
        return cxr.to_model_input(image, self.cfg.image_size)

    def signal(self, signal: np.ndarray, draws) -> np.ndarray:
        if draws is not None:
            signal = ecg.augment(signal, draws[0], self.cfg.ecg_warp, self.cfg.ecg_segments)
        return ecg.to_model_input(signal, self.cfg.ecg_samples)


def decode_sample(sample: dict, inputs: ModelInputs, seed: int = 0) -> dict | None:
    """Shard members -> arrays; None (counted) when a present member is corrupt."""
    key = sample.get("__key__", "?")
    out = {"key": key, "cxr": None, "ecg": None}
    draws = inputs.random(seed)
    try:
        if "cxr.jpg" in sample:
            image = cv2.imdecode(np.frombuffer(sample["cxr.jpg"], np.uint8), cv2.IMREAD_GRAYSCALE)
            if image is None:
                raise ValueError("corrupt cxr.jpg")
            out["cxr"] = inputs.image(image, draws)
        if "ecg.npy" in sample:
            signal = ecg.load_npy(sample["ecg.npy"])
            if signal.ndim != 2 or signal.shape[0] != len(ecg.LEADS):
                raise ValueError(f"ecg.npy shape {signal.shape}, expected (12, T)")
            signal = signal.astype(np.float32)
            if not (np.isfinite(signal.min()) and np.isfinite(signal.max())):  # NaN and inf both reach min/max
                raise ValueError("ecg.npy has NaN/inf")
            out["ecg"] = inputs.signal(signal, draws)
        out["text"] = reports.joined_report(sample.get("rad.txt", b"").decode().strip(),
                                            sample.get("ecg.txt", b"").decode().strip())
        if not out["text"]:
            raise ValueError("both report texts are empty")
        out["meta"] = json.loads(sample["meta.json"]) if "meta.json" in sample else {}
    except (ValueError, OSError, UnicodeDecodeError) as error:
        _skip(f"{type(error).__name__}: {str(error).split(':')[0]}", sample)
        return None
    if out["cxr"] is None and out["ecg"] is None:
        _skip("neither cxr.jpg nor ecg.npy", sample)
        return None
    return out


def collate(samples: list[dict], tokenizer, max_text_tokens: int, image_size: int, ecg_samples: int) -> dict:
    """Decoded samples -> the batch dict; a missing modality is zeros with mask False."""
    n = len(samples)
    images = np.empty((n, 1, image_size, image_size), np.float32)
    signals = np.empty((n, len(ecg.LEADS), ecg_samples), np.float32)
    for i, s in enumerate(samples):
        images[i] = 0 if s["cxr"] is None else s["cxr"]
        signals[i] = 0 if s["ecg"] is None else s["ecg"]
    tokens = tokenizer([s["text"] for s in samples], padding="longest", truncation=True,
                       max_length=max_text_tokens, return_tensors="pt")
    skipped, skipped_shards = dict(_SKIPPED), dict(_SKIPPED_SHARDS)
    _SKIPPED.clear()
    _SKIPPED_SHARDS.clear()
    return {
        "cxr": torch.from_numpy(images),
        "cxr_mask": torch.tensor([s["cxr"] is not None for s in samples]),
        "ecg": torch.from_numpy(signals),
        "ecg_mask": torch.tensor([s["ecg"] is not None for s in samples]),
        "input_ids": tokens["input_ids"],
        "attention_mask": tokens["attention_mask"],
        "keys": [s["key"] for s in samples],
        "meta": [s["meta"] for s in samples],
        "skipped": skipped,
        "skipped_shards": skipped_shards,
    }


def shard_urls(directory: str | Path) -> list[str]:
    index = read_index(directory)
    return [str(Path(directory) / entry["name"]) for entry in index["shards"]]


def source_dirs(train: str) -> list[str]:
    """data.train -> its shard directories ("a::b" names two sources)."""
    return [d for d in train.split("::") if d]


@dataclass(frozen=True)
class ShardTable:
    """One tar's members, grouped into samples: what reading a sample by index needs, kept compact."""
    keys: list[str]
    exts: list[tuple[str, ...]]  # member names after the key, per sample (the few distinct tuples are shared)
    first: np.ndarray  # (samples + 1,) index of each sample's first member; members of a sample are contiguous
    headers: np.ndarray  # (members,) byte offset of each member's tar header (its data follows 512 bytes later)
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
    """Samples of a shard set by (shard, index). Each tar's header table is scanned once (wids) and kept
    as a ShardTable; a sample is then one pread of its contiguous members. Revisiting a shard costs
    nothing, so draws spread over hundreds of shards stay cheap (re-scanning a 1000-sample tar takes
    about 0.1 s here)."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        self.tables: dict[int, ShardTable] = {}

    def read(self, shard: int, index: int) -> dict:
        if shard not in self.tables:
            self.tables[shard] = ShardTable.scan(self.paths[shard])
        table = self.tables[shard]
        lo, hi = table.first[index], table.first[index + 1]
        start = int(table.headers[lo])
        data_at = table.headers[lo:hi] + 512 - start
        fd = os.open(self.paths[shard], os.O_RDONLY)
        try:
            blob = os.pread(fd, int(data_at[-1] + table.sizes[hi - 1]), start)
        finally:
            os.close(fd)
        sample = {ext: blob[at:at + size] for ext, at, size in zip(table.exts[index], data_at, table.sizes[lo:hi])}
        return {**sample, "__key__": table.keys[index], "__url__": self.paths[shard]}


MAX_STAND_INS = 16  # unreadable samples in a row at one position before the stream gives up


class TrainStream(torch.utils.data.IterableDataset):
    """This rank's micro-batches of the global stream from `start_position` (global samples consumed).

    Loader worker w of W makes local micro-batches w, w + W, ...; torch's DataLoader hands them out
    round-robin, so the rank sees them in order. An unreadable sample is counted and replaced by a
    stand-in fixed by (seed, position), which keeps every later position where it was."""

    def __init__(self, cfg: DataConfig, rank: int, world: int, tokenizer, start_position: int = 0):
        self.cfg, self.rank, self.world, self.tokenizer, self.start = cfg, rank, world, tokenizer, start_position
        self.paths, shard_sizes, source_sizes = [], [], []
        for directory in source_dirs(cfg.train):
            index = read_index(directory)
            self.paths += [str(Path(directory) / e["name"]) for e in index["shards"]]
            shard_sizes += [e["samples"] for e in index["shards"]]
            source_sizes.append(sum(e["samples"] for e in index["shards"]))
        self.space = order.SampleSpace(tuple(shard_sizes), tuple(source_sizes))
        self.order = order.GlobalOrder(self.space, cfg.mode, cfg.seed, cfg.shuffle_block, tuple(cfg.train_weights))
        self.inputs = ModelInputs(cfg, augment=cfg.augment)

    def state(self, position: int) -> dict:
        """What a checkpoint stores of the stream: the position, and a digest of what fixes the order
        (a resumed run with other shards, seed, mode or weights is told its order changed)."""
        fixes = {"mode": self.cfg.mode, "seed": self.cfg.seed, "shard_sizes": self.space.shard_sizes,
                 "weights": [round(float(w), 12) for w in self.order.weights], "shuffle_block": self.cfg.shuffle_block}
        digest = hashlib.sha256(json.dumps(fixes).encode()).hexdigest()[:16]
        return {**self.order.describe(position), "order_digest": digest}

    def sample_at(self, position: int, reader: ShardReader) -> dict:
        candidate = self.order.sample_at(position)
        for attempt in range(MAX_STAND_INS):
            shard, index = self.space.locate(candidate)
            decoded = self._decode(reader, shard, index, order.sample_seed(self.cfg.seed, position, attempt))
            if decoded is not None:
                return {**decoded, "position": position}
            candidate = self.order.replacement(position, attempt)
        raise RuntimeError(f"{MAX_STAND_INS} unreadable samples in a row at stream position {position}; "
                           f"last tried {self.paths[shard]} sample {index}")

    def _decode(self, reader: ShardReader, shard: int, index: int, seed: int) -> dict | None:
        try:
            raw = reader.read(shard, index)
        except (ValueError, OSError, AssertionError, IndexError, struct_error) as error:  # wids asserts on bad tars
            _skip(f"unreadable tar member: {type(error).__name__}", {"__url__": self.paths[shard]})
            return None
        return decode_sample(raw, self.inputs, seed)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        cv2.setNumThreads(1)  # one core per loader worker; OpenCV's own pool would oversubscribe
        reader = ShardReader(self.paths)
        for local_step in itertools.count(worker, workers):
            positions = order.rank_positions(self.start, local_step, self.rank, self.world, self.cfg.batch_size)
            yield self._collate([self.sample_at(p, reader) for p in positions])

    def _collate(self, samples: list[dict]) -> dict:
        batch = collate(samples, self.tokenizer, self.cfg.max_text_tokens, self.cfg.image_size, self.cfg.ecg_samples)
        batch["positions"] = [s["position"] for s in samples]
        return batch


def build_loader(cfg: DataConfig, rank: int, world: int, tokenizer, *, start_position: int = 0):
    """The infinite training DataLoader of this rank, from a global stream position."""
    return torch.utils.data.DataLoader(TrainStream(cfg, rank, world, tokenizer, start_position), batch_size=None,
                                       num_workers=cfg.workers, persistent_workers=cfg.workers > 0)


def iter_batches(directory: str | Path, cfg: DataConfig, tokenizer, batch_size: int | None = None):
    """Every sample of a shard set exactly once, in index order, in batches (single process)."""
    inputs = ModelInputs(cfg, augment=False)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(shard_urls(directory)),
        wds.tarfile_to_samples(handler=partial(_count_and_continue, "unreadable tar member")),
        wds.map(partial(decode_sample, inputs=inputs)),
        wds.select(lambda s: s is not None),
        wds.batched(batch_size or cfg.batch_size, partial=True, collation_fn=partial(
            collate, tokenizer=tokenizer, max_text_tokens=cfg.max_text_tokens,
            image_size=cfg.image_size, ecg_samples=cfg.ecg_samples)),
    )
    return iter(pipeline)
