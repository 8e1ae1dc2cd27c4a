"""The labelled samples a fine-tuning protocol reads: which columns a head predicts (from a tasks file's label
rules), which samples of a shard set have every one of them known, and their model inputs in batches."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from more_scale.data import order
from more_scale.data.build import read_index
from more_scale.data.pipeline import BadSample, ModelInputs, decode_sample, worker_start
from more_scale.data.shard_reader import ShardReader
from more_scale.eval.tasks import Task, TasksError

MEMBERS = {"cxr": "cxr.jpg", "ecg": "ecg.npy"}  # the shard member that holds a modality's input


@dataclass(frozen=True)
class Targets:
    """What a fine-tuned head predicts: one 0/1 column per binary task and one per class of a multi-label task,
    read from each sample's meta.json by the task's label rules (tasks.yaml: CheXpert's uncertain -1 is unknown)."""
    modality: str
    tasks: tuple[Task, ...]
    columns: tuple[str, ...]

    @classmethod
    def of(cls, tasks: list[Task], names: tuple[str, ...]) -> Targets:
        by_name = {t.name: t for t in tasks}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise TasksError(f"targets {missing} are not tasks of the tasks file (its tasks: {', '.join(by_name)})")
        chosen = tuple(by_name[n] for n in names)
        modalities = sorted({t.modality for t in chosen})
        if len(modalities) != 1:
            raise TasksError(f"targets {list(names)} mix modalities {modalities}: a head sits on one tower")
        ordinal = [t.name for t in chosen if t.kind == "ordinal"]
        if ordinal:
            raise TasksError(f"targets {ordinal} are ordinal; fine-tuning predicts binary and multi-label targets")
        columns = tuple(c for t in chosen for c in ((t.name,) if t.kind == "binary" else tuple(t.answers)))
        if len(set(columns)) != len(columns):
            raise TasksError(f"targets {list(names)} give the same column twice: {columns}")
        return cls(modalities[0], chosen, columns)

    def row(self, meta: dict) -> tuple[np.ndarray | None, str | None]:
        """(the sample's 0/1 labels, None), or (None, why it has none: the first target whose label is unknown)."""
        values = []
        for task in self.tasks:
            label = task.label(meta)
            if label is None:
                return None, f"{task.name} unknown"
            values += [label] if task.kind == "binary" else [float(c in label) for c in task.answers]
        return np.asarray(values, np.float32), None


@dataclass
class LabelledBatch:
    """Model inputs of one modality and their target columns; samples that could not be decoded are counted."""
    inputs: torch.Tensor | None  # (B, 1, H, W) X-rays or (B, 12, T) ECGs; None when every sample was bad
    labels: torch.Tensor | None  # (B, columns) 0/1 float
    rows: list[int]  # each sample's row in its LabelledSet
    skipped: Counter


class LabelledSet(torch.utils.data.Dataset):
    """The samples of a shard set that hold the targets' modality and know every target label; `dropped` counts each
    sample left out by reason. The MoRE reference leaves out a sample with an uncertain (-1) label in any of its
    CSV's 13 CheXpert columns (multimodal_infer.py:29-31), the targets' or not; here the targets' labels decide.
    `fraction` < 1 keeps that share of the labelled rows, drawn with `seed` (the paper's 1/10/100%)."""

    def __init__(self, directory: str | Path, targets: Targets, inputs: ModelInputs, seed: int = 0,
                 fraction: float = 1.0):
        self.directory, self.targets, self.inputs, self.seed = str(directory), targets, inputs, seed
        entries = read_index(directory)["shards"]
        self.reader = ShardReader.of_index(directory, entries)
        self.dropped: Counter = Counter()
        rows, labels = [], []
        member = MEMBERS[targets.modality]
        with ThreadPoolExecutor(8) as pool:  # from an object store: shards overlapped, each one's GETs concurrent
            shard_metas = list(pool.map(self._metas, range(len(entries))))
        for shard, (entry, metas) in enumerate(zip(entries, shard_metas)):
            if isinstance(metas, str):
                self.dropped[metas] += entry["samples"]
                continue
            table = self.reader.table(shard)
            for index, blob in enumerate(metas):
                if member not in table.exts[index]:
                    self.dropped[f"no {member}"] += 1
                    continue
                try:
                    meta = json.loads(blob or b"{}")
                except ValueError as error:
                    self.dropped[f"unreadable meta.json: {type(error).__name__}"] += 1
                    continue
                y, reason = targets.row(meta if isinstance(meta, dict) else {})
                if y is None:
                    self.dropped[reason] += 1
                    continue
                rows.append((shard, index))
                labels.append(y)
        if fraction < 1.0 and rows:
            kept = np.sort(np.random.default_rng(seed).choice(len(rows), max(1, round(fraction * len(rows))),
                                                              replace=False))
            self.dropped["label fraction"] += len(rows) - len(kept)
            rows, labels = [rows[i] for i in kept], [labels[i] for i in kept]
        self.rows = rows
        self.labels = np.asarray(labels, np.float32).reshape(len(rows), len(targets.columns))
        self.epoch = 0  # set before each pass: a sample's augmentation draws follow (seed, epoch, row)

    def _metas(self, shard: int) -> list[bytes | None] | str:
        """Every sample's meta.json in a shard, or why the shard cannot be read."""
        try:
            return self.reader.members(shard, "meta.json")
        except (ValueError, OSError, tarfile.TarError) as error:
            return f"unreadable shard: {type(error).__name__}"

    def __len__(self) -> int:
        return len(self.rows)

    def key(self, row: int) -> str:
        shard, index = self.rows[row]
        return self.reader.table(shard).keys[index]

    def __getitem__(self, row: int) -> dict:
        shard, index = self.rows[row]
        seed = order.sample_seed(self.seed, self.epoch * len(self.rows) + row)
        try:
            sample = decode_sample(self.reader.read(shard, index), self.inputs, seed, require_text=False)
        except BadSample as bad:
            return {"skip": bad.reason}
        except (ValueError, OSError) as error:  # a tar cut short or replaced since the scan
            return {"skip": f"unreadable tar member: {type(error).__name__}"}
        return {"input": sample[self.targets.modality], "row": row}

    def collate(self, items: list[dict]) -> LabelledBatch:
        good = [item for item in items if "skip" not in item]
        skipped = Counter(item["skip"] for item in items if "skip" in item)
        if not good:
            return LabelledBatch(None, None, [], skipped)
        rows = [item["row"] for item in good]
        return LabelledBatch(torch.from_numpy(np.stack([item["input"] for item in good])),
                             torch.from_numpy(self.labels[rows]), rows, skipped)

    def loader(self, batch_size: int, workers: int, shuffle: bool, epoch: int = 0, pin_memory: bool = False):
        """One pass in batches: shuffled by (seed, epoch) for training, in row order otherwise. Training drops a short
        last batch (a batch of one cannot pass a BatchNorm head in training mode; the next epoch reshuffles)."""
        self.epoch = epoch  # workers are started per pass (not persistent), so each gets this epoch
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.utils.data.DataLoader(self, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                                           collate_fn=self.collate, generator=generator, pin_memory=pin_memory,
                                           drop_last=shuffle and len(self) > batch_size,
                                           multiprocessing_context=worker_start([self.directory], workers))
