"""Loaders: shards -> decoded samples -> collated batch dicts (DESIGN.md "The batch").

Training reads samples by index from the tars (`shard_reader.py`) in the global order of `order.py`: the
stream is a function of (seed, position), partitioned over ranks and loader workers, so it resumes exactly
from a position stored in a checkpoint, on any world size. Evaluation reads each shard once, in order,
through the same reader (one rule for what a sample is). A sample that fails to decode is skipped and
counted by reason and by shard; each batch carries its worker's counts since its previous batch in
`batch.info` (more_scale/batch.py), by value.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hashlib
import itertools
import json
import random
import tarfile
import threading
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import torch

from more_scale.batch import Batch, Bookkeeping
from more_scale.config import DataConfig, InputShape
from more_scale.data import cxr, ecg, order, reports, storage
from more_scale.data.build import read_index
from more_scale.data.shard_reader import ShardReader


class BadSample(ValueError):
    """A shard member that cannot become a model input; `reason` is what the skip counters record."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class SkipCounter:
    """One loader's skipped samples by reason and by shard, drained into each batch it makes."""

    def __init__(self):
        self.reasons: Counter = Counter()
        self.shards: Counter = Counter()

    def count(self, reason: str, url: str | None) -> None:
        self.reasons[reason] += 1
        if url is not None:
            self.shards[Path(url).name] += 1

    def drain(self) -> tuple[dict[str, int], dict[str, int]]:
        out = dict(self.reasons), dict(self.shards)
        self.reasons.clear()
        self.shards.clear()
        return out


class ModelInputs:
    """Stored arrays -> model inputs: centre crop and no randomness, or (augment) the paper's training
    augmentations with every draw fixed by a per-sample seed, so a stream replays exactly."""

    def __init__(self, cfg: DataConfig, shape: InputShape, augment: bool):
        self.cfg, self.shape, self.augment = cfg, shape, augment
        self.cxr_augmentation = cxr.train_augmentation(shape.image_size, tuple(cfg.cxr_crop_scale), cfg.cxr_jitter,
                                                       cfg.cxr_blur_p, cfg.cxr_flip_p, cfg.cxr_crop_p,
                                                       cfg.cxr_jitter_p) if augment else None

    def random(self, seed: int) -> tuple[np.random.Generator, random.Random] | None:
        """One sample's generators (numpy's and Python's, as albumentations draws from both)."""
        return (np.random.default_rng(seed), random.Random(seed)) if self.augment else None

    def image(self, image: np.ndarray, draws) -> np.ndarray:
        if draws is not None:
            return cxr.augmented_input(image, self.cxr_augmentation, *draws)
        return cxr.to_model_input(image, self.shape.image_size)

    def signal(self, signal: np.ndarray, draws) -> np.ndarray:
        if draws is not None:
            signal = ecg.augment(signal, draws[0], self.cfg.ecg_warp, self.cfg.ecg_segments, self.cfg.ecg_none)
        return ecg.to_model_input(signal, self.shape.ecg_samples)


def decode_sample(sample: dict, inputs: ModelInputs, seed: int = 0, require_text: bool = True) -> dict:
    """Shard members -> arrays; raises BadSample when a present member is corrupt or nothing is usable.
    `require_text=False` (evaluation) lets a sample without reports through (CheXpert's labelled images)."""
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
        radiology, cardiology = (sample.get(m, b"").decode().strip() for m in ("rad.txt", "ecg.txt"))
        out["reports"] = (radiology, cardiology)
        if require_text and not (radiology or cardiology):
            raise ValueError("both report texts are empty")
        out["meta"] = json.loads(sample["meta.json"]) if "meta.json" in sample else {}
        if not isinstance(out["meta"], dict):
            raise ValueError(f"meta.json holds a {type(out['meta']).__name__}, expected an object")
    except Exception as error:  # noqa: BLE001 - the decoders (OpenCV, numpy, json) raise many types on bad bytes
        # (cv2.error for a 65000 x 65000 header, RecursionError for deep JSON, TypeError, MemoryError): each is
        # one bad sample, never the end of a run
        raise BadSample(f"{type(error).__name__}: {str(error).split(':')[0][:120]}") from error
    if out["cxr"] is None and out["ecg"] is None:
        raise BadSample("neither cxr.jpg nor ecg.npy")
    return out


def collate(samples: list[dict], tokenizer, cfg: DataConfig, shape: InputShape, skips: SkipCounter) -> Batch:
    """Decoded samples -> a Batch; a missing modality is zeros with mask False. The skips counted since
    the previous batch go into this one's bookkeeping."""
    n = len(samples)
    images = np.empty((n, 1, shape.image_size, shape.image_size), np.float32)
    signals = np.empty((n, len(ecg.LEADS), shape.ecg_samples), np.float32)
    for i, s in enumerate(samples):
        images[i] = 0 if s["cxr"] is None else s["cxr"]
        signals[i] = 0 if s["ecg"] is None else s["ecg"]
    tokens = reports.tokenize_reports(tokenizer, [s["reports"] for s in samples], cfg.text_pairing, cfg.max_text_tokens)
    skipped, skipped_shards = skips.drain()
    info = Bookkeeping(keys=[s["key"] for s in samples], meta=[s["meta"] for s in samples],
                       positions=[s["position"] for s in samples if "position" in s],
                       skipped=skipped, skipped_shards=skipped_shards,
                       text_tokens=int(tokens["attention_mask"].sum()),
                       has_text=[any(s["reports"]) for s in samples])
    return Batch(cxr=torch.from_numpy(images), cxr_mask=torch.tensor([s["cxr"] is not None for s in samples]),
                 ecg=torch.from_numpy(signals), ecg_mask=torch.tensor([s["ecg"] is not None for s in samples]),
                 input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], info=info)


def shard_urls(directory: str | Path) -> list[str]:
    index = read_index(directory)
    return [storage.join(directory, entry["name"]) for entry in index["shards"]]


def source_dirs(train: str) -> list[str]:
    """data.train -> its shard directories ("a::b" names two sources)."""
    return [d for d in train.split("::") if d]


MAX_STAND_INS = 16  # unreadable samples in a row at one position before the stream gives up
READ_AHEAD = 2  # micro-batches fetched ahead from an object store: bytes of READ_AHEAD + 1 batches held at most


class ReadAhead:
    """An asyncio event loop on a thread of its own, started at the first submit: where a loader worker's object
    store reads run while it decodes. On exit, what is still in flight is cancelled."""

    def __init__(self):
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None

    def submit(self, coroutine) -> concurrent.futures.Future:
        if self.loop is None:
            self.loop = asyncio.new_event_loop()
            self.thread = threading.Thread(target=self.loop.run_forever, name="read-ahead", daemon=True)
            self.thread.start()
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc) -> None:
        if self.loop is None:
            return

        async def cancel_in_flight() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.get_running_loop().shutdown_default_executor()  # the table loads' threads

        asyncio.run_coroutine_threadsafe(cancel_in_flight(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


class TrainStream(torch.utils.data.IterableDataset):
    """This rank's micro-batches of the global stream from `start_position` (global samples consumed).

    Loader worker w of W makes local micro-batches w, w + W, ...; torch's DataLoader hands them out
    round-robin, so the rank sees them in order. An unreadable sample is counted and replaced by a
    stand-in fixed by (seed, position), which keeps every later position where it was."""

    def __init__(self, cfg: DataConfig, shape: InputShape, rank: int, world: int, tokenizer, start_position: int = 0):
        self.cfg, self.shape, self.rank, self.world = cfg, shape, rank, world
        self.tokenizer, self.start = tokenizer, start_position
        self.paths, self.shard_sizes, self.shard_bytes, source_sizes = [], [], [], []
        for directory in source_dirs(cfg.train):
            index = read_index(directory)
            self.paths += [storage.join(directory, e["name"]) for e in index["shards"]]
            self.shard_sizes += [e["samples"] for e in index["shards"]]
            self.shard_bytes += [e["bytes"] for e in index["shards"]]
            source_sizes.append(sum(e["samples"] for e in index["shards"]))
        self.space = order.SampleSpace(tuple(self.shard_sizes), tuple(source_sizes))
        self.order = order.GlobalOrder(self.space, cfg.mode, cfg.seed, cfg.shuffle_block, tuple(cfg.train_weights))
        self.inputs = ModelInputs(cfg, shape, augment=cfg.augment)

    def state(self, position: int) -> dict:
        """What a checkpoint stores of the stream: the position, and a digest of what fixes the order
        (a resumed run with other shards, seed, mode or weights is told its order changed)."""
        fixes = {"mode": self.cfg.mode, "seed": self.cfg.seed, "shard_sizes": self.space.shard_sizes,
                 "weights": [round(float(w), 12) for w in self.order.weights], "shuffle_block": self.cfg.shuffle_block}
        digest = hashlib.sha256(json.dumps(fixes).encode()).hexdigest()[:16]
        return {**self.order.describe(position), "order_digest": digest}

    def sample_at(self, position: int, reader: ShardReader, skips: SkipCounter, fetched: dict) -> dict:
        """The decoded sample at `position` (or its stand-in); `fetched` holds bytes read ahead, by (shard, index)."""
        candidate = self.order.sample_at(position)
        for attempt in range(MAX_STAND_INS):
            shard, index = self.space.locate(candidate)
            try:
                raw = reader.read(shard, index, fetched.get((shard, index)))
                decoded = decode_sample(raw, self.inputs, order.sample_seed(self.cfg.seed, position, attempt))
                return {**decoded, "position": position}
            except BadSample as bad:
                skips.count(bad.reason, self.paths[shard])
            except (ValueError, OSError, tarfile.TarError) as error:  # a tar gone, cut short or corrupt
                skips.count(f"unreadable tar member: {type(error).__name__}", self.paths[shard])
            candidate = self.order.replacement(position, attempt)
        raise RuntimeError(f"{MAX_STAND_INS} unreadable samples in a row at stream position {position}; "
                           f"last tried {self.paths[shard]} sample {index}")

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        cv2.setNumThreads(1)  # one core per loader worker; OpenCV's own pool would oversubscribe
        reader, skips = self.reader(), SkipCounter()
        # from an object store, the samples of the next READ_AHEAD micro-batches are in flight (on an event loop of
        # their own) while this one decodes; from local disk each is read in turn
        depth = READ_AHEAD if reader.remote else 0
        window: collections.deque = collections.deque()
        with ReadAhead() as ahead:
            for local_step in itertools.count(worker, workers):
                groups = reader.remote_groups(self._locations(local_step))
                window.append((local_step, ahead.submit(reader.fetch(groups)) if groups else None))
                if len(window) > depth:
                    step, fetching = window.popleft()
                    yield self._batch(step, reader, skips, fetching.result() if fetching else {})

    def reader(self) -> ShardReader:
        return ShardReader(self.paths, self.shard_sizes, self.shard_bytes)

    def _positions(self, local_step: int) -> range:
        return order.rank_positions(self.start, local_step, self.rank, self.world, self.cfg.batch_size)

    def _locations(self, local_step: int) -> list[tuple[int, int]]:
        """(shard, index) of a micro-batch's samples (a stand-in, should one be needed, is read on its own)."""
        return [self.space.locate(self.order.sample_at(p)) for p in self._positions(local_step)]

    def _batch(self, local_step: int, reader: ShardReader, skips: SkipCounter, fetched: dict) -> Batch:
        samples = [self.sample_at(p, reader, skips, fetched) for p in self._positions(local_step)]
        batch = collate(samples, self.tokenizer, self.cfg, self.shape, skips)
        batch.info.remote_retries = reader.take_retries()
        return batch


def build_loader(cfg: DataConfig, shape: InputShape, rank: int, world: int, tokenizer, *, start_position: int = 0,
                 pin_memory: bool = False):
    """The infinite training DataLoader of this rank, from a global stream position. `pin_memory`: batches
    arrive page-locked, so their copies to a GPU can run asynchronously (train/prefetch.py)."""
    # its own generator: creating the iterator draws a worker base seed, which must not move the global RNG
    # that DropToken/DropKey/dropout draw from (a resumed run creates it after restoring that RNG)
    return torch.utils.data.DataLoader(TrainStream(cfg, shape, rank, world, tokenizer, start_position), batch_size=None,
                                       num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
                                       multiprocessing_context=worker_start(source_dirs(cfg.train), cfg.workers),
                                       pin_memory=pin_memory, generator=torch.Generator().manual_seed(cfg.seed))


def worker_start(sources: list[str], workers: int) -> str | None:
    """How loader workers start: forked, except for a shard set on an object store. obstore's runtime is
    process-global and not fork-safe, and this process has used it already (the index, the start-up checks): a
    forked worker's first request hangs. Spawned workers start clean and make their own store."""
    return "spawn" if workers > 0 and any(storage.is_remote(s) for s in sources) else None


def stored_sample(directory: str | Path, position: int) -> dict:
    """The stored members of the sample at running index `position` of a shard set, as iter_batches numbers them."""
    entries = read_index(directory)["shards"]
    for shard, entry in enumerate(entries):
        if position < entry["samples"]:
            reader = ShardReader.of_index(directory, [entry])
            return reader.read(0, position)
        position -= entry["samples"]
    raise IndexError(f"{directory}: no sample at running index {position} (past the end)")


def iter_batches(directory: str | Path, cfg: DataConfig, shape: InputShape, tokenizer, batch_size: int | None = None,
                 part: tuple[int, int] = (0, 1)):
    """Every sample of a shard set exactly once, in index order, in batches. Batch k holds the running
    indices [k * size, (k + 1) * size) that decode (a bad sample makes its batch one smaller, never pulls in
    the next one). `part=(rank, world)` keeps the batches with k % world == rank (the others are passed over
    unread), so `world` processes share a shard set and each batch is the one a single process would build:
    same samples, same padding, same kernel shapes, so the same embeddings. Each sample's running index is
    its bookkeeping position, by which the parts merge back into index order. A tar that cannot be read at
    all counts each of its samples as a skip."""
    rank, world = part
    if not 0 <= rank < world:
        raise ValueError(f"part {part}: expected (rank, world) with 0 <= rank < world")
    inputs, skips = ModelInputs(cfg, shape, augment=False), SkipCounter()
    size = batch_size or cfg.batch_size
    entries = read_index(directory)["shards"]
    reader = ShardReader.of_index(directory, entries)
    paths = reader.paths
    pending, position = [], 0
    for shard, entry in enumerate(entries):
        try:
            reader.table(shard)
            unreadable = None
        except (ValueError, OSError, tarfile.TarError) as error:
            unreadable = f"unreadable shard: {type(error).__name__}"
        for index in range(entry["samples"]):
            position += 1
            if (position - 1) // size % world != rank:
                pass  # another part's batch: passed over unread
            elif unreadable:
                skips.count(unreadable, paths[shard])
            else:
                try:
                    sample = decode_sample(reader.read(shard, index), inputs, require_text=False)
                    pending.append({**sample, "position": position - 1})
                except BadSample as bad:
                    skips.count(bad.reason, paths[shard])
                except (ValueError, OSError) as error:
                    skips.count(f"unreadable tar member: {type(error).__name__}", paths[shard])
            if position % size == 0 and pending:  # the end of batch k
                yield collate(pending, tokenizer, cfg, shape, skips)
                pending = []
    if pending:
        yield collate(pending, tokenizer, cfg, shape, skips)
