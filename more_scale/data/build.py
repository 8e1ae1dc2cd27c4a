"""Raw MIMIC-CXR-JPG + MIMIC-IV-ECG -> paired, preprocessed WebDataset shards with an index.

Output layout: OUT/<split>/<split>-000000.tar ... + OUT/<split>/shards.json, and OUT/tokenizer
(a byte-level BPE trained on the training split's reports, for models built without a pretrained LM).
Shards are written to a temporary name and renamed, so a shard on disk is always complete.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import multiprocessing
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import webdataset as wds
from rich.progress import Progress

from more_scale.data import cxr, ecg, reports

FRONTAL_VIEWS = ("PA", "AP")  # PA preferred: AP (portable) films magnify the heart
INDEX_NAME = "shards.json"


@dataclass(frozen=True)
class BuildOptions:
    window_days: float = 60.0  # X-ray and ECG of the same subject at most this far apart
    pairing: str = "nearest"  # nearest: one ECG per X-ray study | all: every ECG in the window
    short_side: int = 256  # stored X-ray size (the loader crops the model's size from it)
    ecg_rate: float = 100.0  # stored ECG sampling rate, Hz
    samples_per_shard: int = 1000
    workers: int = 1
    tokenizer_vocab: int = 4000  # 0 = train no tokenizer


@dataclass(frozen=True)
class PairSpec:
    """One sample to build: where its raw parts are and what is known about it."""
    key: str
    split: str
    image: str
    report: str
    ecg_record: str
    ecg_statements: tuple[str, ...]
    meta: dict = field(hash=False)


def find_table(root: Path, name: str) -> Path:
    """`name`.csv or `name`.csv.gz under root (MIMIC ships both forms)."""
    for candidate in (root / f"{name}.csv", root / f"{name}.csv.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{root}: expected {name}.csv or {name}.csv.gz")


def study_datetime(date: int, time: float) -> dt.datetime:
    """MIMIC-CXR StudyDate (YYYYMMDD) + StudyTime (HHMMSS.fff float that lost its leading zero)."""
    whole = int(time)
    base = dt.datetime.strptime(f"{int(date)}{whole:06d}", "%Y%m%d%H%M%S")
    return base + dt.timedelta(seconds=round(float(time) - whole, 6))


def mimic_pairs(cxr_root: Path, report_root: Path, ecg_root: Path, options: BuildOptions) -> tuple[list[PairSpec], Counter]:
    """Frontal X-ray studies paired with same-subject ECGs within the window; also counts the rest."""
    meta = pd.read_csv(find_table(cxr_root, "mimic-cxr-2.0.0-metadata"), dtype={"dicom_id": str})
    split = pd.read_csv(find_table(cxr_root, "mimic-cxr-2.0.0-split"), dtype={"dicom_id": str})
    labels = pd.read_csv(find_table(cxr_root, "mimic-cxr-2.0.0-chexpert")).set_index("study_id")
    records = pd.read_csv(ecg_root / "record_list.csv")
    statements = pd.read_csv(ecg_root / "machine_measurements.csv", low_memory=False).set_index("study_id")
    report_columns = [c for c in statements.columns if c.startswith("report_")]

    skipped = Counter()
    frontal = meta[meta["ViewPosition"].isin(FRONTAL_VIEWS)].merge(split[["dicom_id", "split"]], on="dicom_id", how="left")
    skipped["not frontal (PA/AP) image"] = len(meta) - len(frontal)
    frontal = frontal.assign(view_rank=frontal["ViewPosition"].map({"PA": 0, "AP": 1}))
    frontal = frontal.sort_values(["study_id", "view_rank", "dicom_id"]).drop_duplicates("study_id")
    records["when"] = pd.to_datetime(records["ecg_time"]).dt.to_pydatetime() if len(records) else []
    ecgs_by_subject = {s: g for s, g in records.groupby("subject_id")}
    window = dt.timedelta(days=options.window_days)

    pairs = []
    for row in frontal.itertuples(index=False):
        when = study_datetime(row.StudyDate, row.StudyTime)
        candidates = ecgs_by_subject.get(row.subject_id)
        gaps = [] if candidates is None else [
            (abs(r.when - when), r) for r in candidates.itertuples(index=False) if abs(r.when - when) <= window]
        if not gaps:
            skipped[f"X-ray study without an ECG within {options.window_days:g} days"] += 1
            continue
        gaps.sort(key=lambda g: (g[0], g[1].study_id))
        chosen = gaps[:1] if options.pairing == "nearest" else gaps
        group = f"p{str(row.subject_id)[:2]}/p{row.subject_id}"
        for gap, record in chosen:
            lines = tuple(statements.loc[record.study_id, report_columns]) if record.study_id in statements.index else ()
            pairs.append(PairSpec(
                key=f"{row.subject_id}_{row.study_id}_{record.study_id}",
                split=row.split if isinstance(row.split, str) else "train",
                image=str(cxr_root / "files" / group / f"s{row.study_id}" / f"{row.dicom_id}.jpg"),
                report=str(report_root / "files" / group / f"s{row.study_id}.txt"),
                ecg_record=str(ecg_root / record.path),
                ecg_statements=tuple(s for s in lines if isinstance(s, str)),
                meta={
                    "subject_id": int(row.subject_id), "study_id": int(row.study_id), "dicom_id": row.dicom_id,
                    "ecg_id": int(record.study_id), "view": row.ViewPosition, "split": row.split,
                    "cxr_time": when.isoformat(), "ecg_time": record.when.isoformat(),
                    "gap_hours": round((record.when - when).total_seconds() / 3600, 3),
                    "chexpert": _chexpert(labels, row.study_id),
                },
            ))
    return pairs, skipped


def _chexpert(labels: pd.DataFrame, study_id: int) -> dict:
    if study_id not in labels.index:
        return {}
    row = labels.loc[study_id].drop("subject_id", errors="ignore")
    return {name: (None if pd.isna(v) else float(v)) for name, v in row.items()}


def build_sample(spec: PairSpec, options: BuildOptions) -> dict:
    """Read and preprocess one pair into shard members (bytes); raises ValueError naming the file."""
    image = cxr.preprocess_file(spec.image, options.short_side)
    ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        raise ValueError(f"{spec.image}: JPEG encoding failed")
    signal = ecg.preprocess_record(spec.ecg_record, options.ecg_rate)
    buffer = io.BytesIO()
    np.save(buffer, signal)
    try:
        radiology = reports.radiology_text(Path(spec.report).read_text())
    except FileNotFoundError as error:
        raise ValueError(f"{spec.report}: report file missing") from error
    ecg_report = reports.ecg_text(spec.ecg_statements)
    meta = dict(spec.meta, ecg_statements=list(spec.ecg_statements))
    return {"__key__": spec.key, "cxr.jpg": jpeg.tobytes(), "ecg.npy": buffer.getvalue(),
            "rad.txt": radiology.encode(), "ecg.txt": ecg_report.encode(),
            "meta.json": json.dumps(meta, sort_keys=True).encode()}


def _build_or_error(args) -> tuple[str, dict | None, str | None]:
    spec, options = args
    try:
        return spec.split, build_sample(spec, options), None
    except (ValueError, OSError) as error:
        return spec.split, None, f"{spec.key}: {error}"


def plan_shards(pairs: list[PairSpec], samples_per_shard: int) -> list[tuple[str, int, list[PairSpec]]]:
    """(split, shard number, pairs) for every shard, fixed before anything is read: a sample that
    fails shrinks its own shard only, so any split of the work into parts gives the same shards."""
    by_split: dict[str, list[PairSpec]] = {}
    for spec in pairs:
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
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    os.replace(tmp, path)
    return {"name": path.name, "samples": len(samples), "bytes": path.stat().st_size, "sha256": digest}


def part_index_path(out: Path, split: str, part: int, parts: int) -> Path:
    return out / split / "parts" / f"part-{part:05d}-of-{parts:05d}.json"


def write_shards(pairs: list[PairSpec], out: Path, options: BuildOptions, source: dict,
                 parts: int = 1, part: int = 0) -> dict:
    """Build this part's shards (every `parts`-th shard of the plan, from `part`) in a process pool
    when workers > 1, and its part index per split; with parts == 1 also the final index + tokenizer."""
    plan = [shard for k, shard in enumerate(plan_shards(pairs, options.samples_per_shard)) if k % parts == part]
    results: dict[str, dict] = {split: {"shards": [], "failures": []} for split in sorted({p.split for p in pairs})}
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
                 "failures": sorted(failures), "build": {**_build_options(options), **source}}
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


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def read_index(directory: str | Path) -> dict:
    """A shard set's index; checks that every listed shard exists with its recorded size."""
    directory = Path(directory)
    path = directory / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {INDEX_NAME} (expected a shard directory made by build_shards.py)")
    index = json.loads(path.read_text())
    for entry in index["shards"]:
        shard = directory / entry["name"]
        if not shard.is_file() or shard.stat().st_size != entry["bytes"]:
            raise ValueError(f"{shard}: missing or truncated (index says {entry['bytes']} bytes)")
    return index
