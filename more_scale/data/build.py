"""Sample specs from a source (mimic.py, ptbxl.py, manifest.py) -> preprocessed WebDataset shards + index.

Output layout: OUT/<split>/<split>-000000.tar ... + OUT/<split>/shards.json, and OUT/tokenizer
(a byte-level BPE trained on the training split's reports, for models built without a pretrained LM).
Shards are written to a temporary name and renamed, so a shard on disk is always complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds
from rich.progress import Progress

from more_scale.data import cxr, ecg, reports, storage
from more_scale.data.input_format import stored_members
from more_scale.data.shard_reader import ShardTable, table_path

INDEX_NAME = "shards.json"
MAX_REPORT_CHARS = 20_000  # ~5000 tokens; the model reads at most a few hundred


@dataclass(frozen=True)
class BuildOptions:
    window_days: float = 60.0  # mimic: X-ray and ECG of the same subject at most this far apart
    pairing: str = "nearest"  # mimic: nearest: one ECG per X-ray study | all: every ECG in the window
    keep_unpaired: bool = False  # mimic: also X-ray-only studies and ECG-only records (masks, not drops)
    images: str = "first"  # mimic: first: one frontal image per study (PA before AP) | all: every frontal image
    require_chexpert: bool = False  # mimic: leave out studies without a CheXpert row (the reference's inner join)
    short_side: int = 256  # stored X-ray size (the loader crops the model's size from it)
    squash: int = 0  # > 0: the reference's preprocessing instead: resize to squash x squash (aspect lost), then CLAHE
    ecg_rate: float = 100.0  # stored ECG sampling rate, Hz
    samples_per_shard: int = 1000
    workers: int = 1
    tokenizer_vocab: int = 4000  # 0 = train no tokenizer
    reports: str = "full"  # mimic: full | reference: the MoRE reference's cleanups (clock-time sentences dropped, an
    # empty X-ray report written from its CheXpert labels, ECG statements report_0..6, a placeholder for none)


@dataclass(frozen=True)
class SampleSpec:
    """One sample to build: where its raw parts are and what is known about it ("" = absent)."""
    key: str
    split: str  # train | validate | test
    cxr: str = ""  # X-ray file (JPEG/PNG, any bit depth)
    report_file: str = ""  # MIMIC-CXR free-text report (FINDINGS + IMPRESSION are kept)
    cxr_text: str = ""  # radiology text given inline
    ecg: str = ""  # WFDB record (path without extension, .mat/.dat read through the .hea) or a .npy array
    ecg_npy_rate: float = 0.0  # sampling rate of a .npy ECG, Hz
    ecg_text: str = ""
    meta: dict = field(default_factory=dict, hash=False)
    needs_text: bool = True  # False: a labelled image for evaluation only (CheXpert has no reports)


def build_sample(spec: SampleSpec, options: BuildOptions) -> dict:
    """Read and preprocess one sample into shard members (bytes); raises ValueError naming the file."""
    sample = {"__key__": spec.key}
    if spec.cxr:
        sample["cxr.jpg"] = cxr.stored_jpeg(cxr.read_gray(spec.cxr), options.short_side, options.squash)
    meta = dict(spec.meta)
    if spec.ecg:
        signal, filled = ecg.preprocess_record(spec.ecg, options.ecg_rate, spec.ecg_npy_rate)
        if filled:
            meta["ecg_gap_samples_filled"] = filled  # short NaN/inf dropouts set to 0, counted
        buffer = io.BytesIO()
        np.save(buffer, signal)
        sample["ecg.npy"] = buffer.getvalue()
    radiology = reports.clean(spec.cxr_text)
    if spec.report_file:
        try:
            radiology = reports.radiology_text(Path(spec.report_file).read_text(encoding="utf-8"))
        except FileNotFoundError as error:
            raise ValueError(f"{spec.report_file}: report file missing") from error
        except UnicodeDecodeError as error:
            raise ValueError(f"{spec.report_file}: not UTF-8 text ({error.reason} at byte {error.start})") from error
        if options.reports == "reference":
            radiology = reports.drop_clock_time_sentences(radiology) or reports.chexpert_sentence(meta.get("chexpert", {}))
    for member, text in (("rad.txt", radiology), ("ecg.txt", reports.clean(spec.ecg_text))):
        if len(text) > MAX_REPORT_CHARS:  # a pasted log or a whole chart, not a report: cut, and say so
            meta[f"{member}_chars_cut"] = len(text) - MAX_REPORT_CHARS
            text = text[:MAX_REPORT_CHARS]
        if text:
            sample[member] = text.encode()
    if spec.needs_text and "rad.txt" not in sample and "ecg.txt" not in sample:
        raise ValueError(f"{spec.key}: no report text (neither a radiology report nor an ECG report)")
    sample["meta.json"] = json.dumps(meta, sort_keys=True).encode()
    return sample


def _build_or_error(args) -> tuple[str, dict | None, str | None]:
    spec, options = args
    try:
        return spec.split, build_sample(spec, options), None
    except (ValueError, OSError) as error:
        return spec.split, None, f"{spec.key}: {error}"
    except Exception as error:  # a reader's own surprise (a decoder bug, an odd format): this sample only
        return spec.split, None, f"{spec.key}: {type(error).__name__}: {error}"


def plan_shards(samples: list[SampleSpec], samples_per_shard: int) -> list[tuple[str, int, list[SampleSpec]]]:
    """(split, shard number, specs) for every shard, fixed before anything is read: a sample that
    fails shrinks its own shard only, so any split of the work into parts gives the same shards."""
    by_split: dict[str, list[SampleSpec]] = {}
    for spec in samples:
        by_split.setdefault(spec.split, []).append(spec)
    return [(split, i // samples_per_shard, specs[i:i + samples_per_shard])
            for split, specs in sorted(by_split.items()) for i in range(0, len(specs), samples_per_shard)]


def write_tar(path: Path, samples: list[dict]) -> dict:
    """One shard, written to a temporary name and renamed; returns its index entry."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        # fixed mtime/owner: the same inputs give byte-identical tars
        tar = wds.TarWriter(f, user="more_scale", group="more_scale", mtime=0.0, encoder=False)
        for sample in samples:
            tar.write(sample)
        tar.close()
    table = _checked_table(tmp, path, [s["__key__"] for s in samples])
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    size = tmp.stat().st_size
    # the member table first: a tar on disk always has its table beside it (a crash in between leaves a table
    # whose tar_bytes name the tar it was written for, which the reader checks)
    _write_json_atomic(Path(table_path(str(path))), table.to_json(size), compact=True)
    os.replace(tmp, path)
    return {"name": path.name, "samples": len(samples), "bytes": size, "sha256": digest}


def _checked_table(tmp: Path, path: Path, keys: list[str]) -> ShardTable:
    """The reader's member table of a just-written tar; it holds exactly the samples written, or the build fails
    (a key with a dot, say, would split into other samples in every reader)."""
    table = ShardTable.scan(str(tmp))
    if table.keys != keys:
        tmp.unlink()
        wrong = next((f"{a!r} read as {b!r}" for a, b in zip(keys, table.keys) if a != b),
                     f"{len(keys)} written, {len(table)} read")
        raise ValueError(f"{path}: the shard reader does not index the samples as written ({wrong}); sample keys "
                         "must not contain '.' (webdataset splits a member name at its first dot)")
    return table


def part_index_path(out: Path, split: str, part: int, parts: int) -> Path:
    return out / split / "parts" / f"part-{part:05d}-of-{parts:05d}.json"


def write_shards(samples: list[SampleSpec], out: Path, options: BuildOptions, source: dict,
                 parts: int = 1, part: int = 0) -> dict:
    """Build this part's shards (every `parts`-th shard of the plan, from `part`) in a process pool
    when workers > 1, and its part index per split; with parts == 1 also the final index + tokenizer."""
    plan = [shard for k, shard in enumerate(plan_shards(samples, options.samples_per_shard)) if k % parts == part]
    results: dict[str, dict] = {split: {"shards": [], "failures": []} for split in sorted({s.split for s in samples})}
    pool = multiprocessing.get_context("spawn").Pool(options.workers) if options.workers > 1 else None
    with Progress(transient=False) as progress:
        task = progress.add_task(f"building shards (part {part + 1} of {parts})", total=sum(len(s[2]) for s in plan))
        for split, number, specs in plan:
            jobs = [(spec, options) for spec in specs]
            samples = []
            for _, sample, error in (pool.imap(_build_or_error, jobs, chunksize=4) if pool else map(_build_or_error, jobs)):
                if error is not None:
                    results[split]["failures"].append(error)
                else:
                    samples.append(sample)
                progress.advance(task)
            (out / split).mkdir(parents=True, exist_ok=True)
            if samples:
                results[split]["shards"].append(write_tar(out / split / f"{split}-{number:06d}.tar", samples))
    if pool:
        pool.close()
        pool.join()
    for split, result in results.items():
        path = part_index_path(out, split, part, parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(path, result)
    if parts == 1:
        return merge_index(out, options, source)
    return {"part": part, "samples": {s: sum(e["samples"] for e in r["shards"]) for s, r in results.items()},
            "failures": {s: len(r["failures"]) for s, r in results.items()}}


def merge_index(out: Path, options: BuildOptions, source: dict) -> dict:
    """One shards.json per split from its part indexes (all parts must be there), then the tokenizer
    trained on the training shards' reports in index order."""
    summary = {"samples": {}, "failures": {}}
    for split_dir in sorted(p for p in out.iterdir() if (p / "parts").is_dir()):
        part_files = sorted((split_dir / "parts").glob("part-*-of-*.json"))
        parts = int(part_files[0].stem.rsplit("-", 1)[1])
        missing = sorted(set(range(parts)) - {int(f.stem.split("-")[1]) for f in part_files})
        if missing:
            raise FileNotFoundError(f"{split_dir}/parts: parts {missing} of {parts} have not finished")
        entries, failures = [], []
        for f in part_files:
            part = json.loads(f.read_text())
            entries += part["shards"]
            failures += part["failures"]
        entries.sort(key=lambda e: e["name"])
        index = {"split": split_dir.name, "samples": sum(e["samples"] for e in entries), "shards": entries,
                 "failures": sorted(failures), "build": {**_build_options(options), **source},
                 "members": stored_members(options.short_side, options.squash, options.ecg_rate),
                 # what third-party readers look for: wids.ShardListDataset(".../shards.json") opens the set as it is
                 "wids_version": 1, "name": split_dir.name,
                 "shardlist": [{"url": e["name"], "nsamples": e["samples"]} for e in entries]}
        _write_json_atomic(split_dir / INDEX_NAME, index)
        summary["samples"][split_dir.name] = index["samples"]
        summary["failures"][split_dir.name] = len(failures)
    if options.tokenizer_vocab and (out / "train" / INDEX_NAME).is_file():
        from more_scale.data.tokenizer import train_tokenizer

        train_tokenizer(list(_train_texts(out / "train")), out / "tokenizer", options.tokenizer_vocab)
    return summary


def _build_options(options: BuildOptions) -> dict:
    """What decides the bytes (workers does not)."""
    return {k: v for k, v in asdict(options).items() if k != "workers"}


def _train_texts(directory: Path):
    for entry in read_index(directory)["shards"]:
        for sample in wds.WebDataset(str(directory / entry["name"]), shardshuffle=False, empty_check=False):
            yield reports.joined_report(sample.get("rad.txt", b"").decode(), sample.get("ecg.txt", b"").decode())


def _size_or_none(location: str) -> int | None:
    try:
        return storage.size(location)
    except FileNotFoundError:  # a missing file, or object (storage.MissingObject)
        return None


def _write_json_atomic(path: Path, obj, compact: bool = False) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, sort_keys=True, **({"separators": (",", ":")} if compact else {"indent": 1})))
    os.replace(tmp, path)


def read_index(directory: str | Path) -> dict:
    """A shard set's index, from a folder or an object store prefix; checks that every listed shard exists with its
    recorded size (on an object store, HEAD requests in parallel)."""
    storage.check_location(directory)
    path = storage.join(directory, INDEX_NAME)
    try:
        text = storage.read_bytes(path)
    except FileNotFoundError:  # a missing file, or object (storage.MissingObject: also a missing bucket)
        where = " (or its bucket does not exist)" if storage.is_remote(directory) else ""
        raise FileNotFoundError(f"{directory} holds no {INDEX_NAME}{where} (expected a split folder made by "
                                "build_shards.py, such as SHARDS/train)") from None
    try:
        index = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not JSON ({error})") from None
    shards = index.get("shards") if isinstance(index, dict) else None
    if not isinstance(shards, list):
        raise ValueError(f"{path}: expected an object with a \"shards\" list")
    for i, entry in enumerate(shards):
        where = f"{path}: shards[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} is a {type(entry).__name__}, expected an object")
        name = entry.get("name")
        # a plain file name: an entry such as ../validate/x.tar would train on another split
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..") or not name.endswith(".tar"):
            raise ValueError(f"{where}.name {name!r}: expected the file name of a .tar in {directory}")
        for field_name in ("samples", "bytes"):
            value = entry.get(field_name)
            if type(value) is not int or value < 0:
                raise ValueError(f"{where}.{field_name} {value!r}: expected a whole number >= 0")
    locations = [storage.join(directory, e["name"]) for e in shards]
    if storage.is_remote(directory):
        with ThreadPoolExecutor(16) as pool:  # one HEAD per shard: latency-bound, so overlapped
            found = list(pool.map(_size_or_none, locations))
    else:
        found = [_size_or_none(location) for location in locations]
    for entry, size in zip(shards, found):
        if size != entry["bytes"]:
            raise ValueError(f"{storage.join(directory, entry['name'])}: missing or truncated (index says "
                             f"{entry['bytes']} bytes, found {'none' if size is None else size})")
    total = sum(e["samples"] for e in shards)
    if index.get("samples", total) != total:
        raise ValueError(f"{path}: samples {index.get('samples')!r} is not the sum over its shards ({total})")
    index.setdefault("samples", total)
    return index
