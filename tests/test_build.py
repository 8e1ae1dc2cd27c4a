"""Pairing, shard contents, the index, determinism and failure reporting of the MIMIC builder."""

import dataclasses
import datetime as dt
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from more_scale.data.build import BuildOptions, read_index, write_shards
from more_scale.data.mimic import mimic_samples, study_datetime


def _roots(raw):
    return raw / "mimic-cxr-jpg", raw / "mimic-cxr-reports", raw / "mimic-iv-ecg"


def test_study_time_with_lost_leading_zero():
    assert study_datetime(21800506, 80556.875) == dt.datetime(2180, 5, 6, 8, 5, 56, 875000)
    assert study_datetime(21800506, 235959.0) == dt.datetime(2180, 5, 6, 23, 59, 59)


def test_pairs_are_frontal_nearest_within_window(raw_root):
    options = BuildOptions(window_days=60)
    pairs, skipped = mimic_samples(*_roots(raw_root), options)
    meta = pd.read_csv(raw_root / "mimic-cxr-jpg/mimic-cxr-2.0.0-metadata.csv", dtype={"dicom_id": str})
    records = pd.read_csv(raw_root / "mimic-iv-ecg/record_list.csv", parse_dates=["ecg_time"])
    assert pairs and skipped["not frontal (PA/AP) image"] == (~meta.ViewPosition.isin(["PA", "AP"])).sum()
    for pair in pairs:
        row = meta[meta.dicom_id == pair.meta["dicom_id"]].iloc[0]
        assert row.ViewPosition in ("PA", "AP")
        when = study_datetime(row.StudyDate, row.StudyTime)
        mine = records[records.subject_id == pair.meta["subject_id"]]
        gaps = (mine.ecg_time - when).abs()
        assert gaps.min() <= pd.Timedelta(days=60)
        assert mine.loc[gaps.idxmin(), "study_id"] == pair.meta["ecg_id"]  # the nearest ECG
    all_pairs, _ = mimic_samples(*_roots(raw_root), BuildOptions(pairing="all"))
    assert len(all_pairs) >= len(pairs)
    assert all(abs(p.meta["gap_hours"]) <= 60 * 24 for p in all_pairs)


def test_every_frontal_image_and_the_chexpert_requirement(raw_root, tmp_path):
    """--images all --require-chexpert (the reference's pairing): a study given a second frontal image (the
    first one's file under a new dicom_id, AP) yields a sample per image and per ECG in the window, named by
    image; a study whose CheXpert row is removed is left out and counted. The default keeps the first image."""
    import shutil

    cxr_root, report_root, ecg_root = _roots(raw_root)
    mine = tmp_path / "mimic-cxr-jpg"
    shutil.copytree(cxr_root / "files", mine / "files")
    for table in cxr_root.glob("*.csv*"):
        shutil.copy(table, mine / table.name)
    meta = pd.read_csv(mine / "mimic-cxr-2.0.0-metadata.csv", dtype={"dicom_id": str})
    split = pd.read_csv(mine / "mimic-cxr-2.0.0-split.csv", dtype={"dicom_id": str})
    first, _ = mimic_samples(cxr_root, report_root, ecg_root, BuildOptions(pairing="all"))
    doubled, dropped = first[0].meta, first[-1].meta  # two studies with ECGs in their window
    assert doubled["study_id"] != dropped["study_id"]
    row = meta[meta.dicom_id == doubled["dicom_id"]].iloc[0].copy()
    row["dicom_id"], row["ViewPosition"] = "second-frontal", "AP"
    pd.concat([meta, row.to_frame().T]).to_csv(mine / "mimic-cxr-2.0.0-metadata.csv", index=False)
    extra = split[split.dicom_id == doubled["dicom_id"]].assign(dicom_id="second-frontal")
    pd.concat([split, extra]).to_csv(mine / "mimic-cxr-2.0.0-split.csv", index=False)
    image = Path(first[0].cxr)
    shutil.copy(image, mine / "files" / image.relative_to(cxr_root / "files").with_name("second-frontal.jpg"))
    labels = pd.read_csv(mine / "mimic-cxr-2.0.0-chexpert.csv")
    labels[labels.study_id != dropped["study_id"]].to_csv(mine / "mimic-cxr-2.0.0-chexpert.csv", index=False)

    default, skipped = mimic_samples(mine, report_root, ecg_root, BuildOptions(pairing="all"))
    assert len(default) == len(first) and skipped["another frontal image of a study (--images all keeps it)"] == 1
    every, skipped = mimic_samples(mine, report_root, ecg_root, BuildOptions(pairing="all", images="all",
                                                                              require_chexpert=True))

    def per_study(samples, study):
        return [s for s in samples if s.meta["study_id"] == study]

    assert len(per_study(every, doubled["study_id"])) == 2 * len(per_study(first, doubled["study_id"]))
    assert {s.meta["dicom_id"] for s in per_study(every, doubled["study_id"])} == {doubled["dicom_id"], "second-frontal"}
    assert not per_study(every, dropped["study_id"]) and skipped["X-ray study without a CheXpert row"] == 1
    assert len(every) == len(first) + len(per_study(first, doubled["study_id"])) - len(per_study(first, dropped["study_id"]))
    keys = [s.key for s in every]
    assert len(set(keys)) == len(keys) and f"_{doubled['study_id']}_second-frontal_" in " ".join(keys)


def test_shards_hold_the_format_and_the_index_matches(shards):
    index = read_index(shards / "train")
    assert index["samples"] == sum(e["samples"] for e in index["shards"]) > 0
    entry = index["shards"][0]
    data = (shards / "train" / entry["name"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
        key = names[0].split(".")[0]
        assert {f"{key}.{m}" for m in ("cxr.jpg", "ecg.npy", "rad.txt", "ecg.txt", "meta.json")} <= set(names)
        signal = np.load(io.BytesIO(tar.extractfile(f"{key}.ecg.npy").read()))
        meta = json.loads(tar.extractfile(f"{key}.meta.json").read())
    assert signal.dtype == np.float16 and signal.shape == (12, 1000)
    assert key == f"{meta['subject_id']}_{meta['study_id']}_{meta['ecg_id']}"
    assert set(meta["chexpert"]) >= {"Cardiomegaly", "Edema", "Pleural Effusion"} and meta["ecg_statements"]


def test_build_is_byte_identical_and_parallel_equals_serial(raw_root, tmp_path):
    pairs, _ = mimic_samples(*_roots(raw_root), BuildOptions())
    pairs = pairs[:12]
    write_shards(pairs, tmp_path / "a", BuildOptions(samples_per_shard=5, tokenizer_vocab=0), {"source": "mimic"})
    write_shards(pairs, tmp_path / "b", BuildOptions(samples_per_shard=5, tokenizer_vocab=0, workers=2),
                 {"source": "mimic"})
    for tar in sorted((tmp_path / "a").rglob("*.tar")):
        assert tar.read_bytes() == (tmp_path / "b" / tar.relative_to(tmp_path / "a")).read_bytes()


def test_truncated_shard_is_detected(shards, tmp_path):
    import shutil

    copy = tmp_path / "train"
    shutil.copytree(shards / "train", copy)
    first = sorted(copy.glob("*.tar"))[0]
    first.write_bytes(first.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"{first.name}: missing or truncated"):
        read_index(copy)


def test_bad_raw_files_are_reported_not_fatal(raw_root, tmp_path):
    pairs, _ = mimic_samples(*_roots(raw_root), BuildOptions())
    pairs = pairs[:4]
    broken_image = tmp_path / "broken.jpg"
    broken_image.write_bytes(b"\xff\xd8 garbage")
    bad = [dataclasses.replace(pairs[0], cxr=str(broken_image)),
           dataclasses.replace(pairs[1], ecg=str(tmp_path / "missing_record"))]
    summary = write_shards(bad + pairs[2:], tmp_path / "out", BuildOptions(tokenizer_vocab=0), {"source": "mimic"})
    failures = [f for split in summary["failures"] for f in read_index(tmp_path / "out" / split)["failures"]]
    assert sum(summary["failures"].values()) == 2
    text = " ".join(failures)
    assert "broken.jpg: not a readable image" in text and "missing_record: unreadable WFDB record" in text


def test_each_shard_carries_its_member_table_and_wids_opens_the_set(shards, tmp_path):
    """The member table stored beside each tar at build time is the one a scan of the tar gives (readers use it and
    never scan); a table written for another tar is refused by name; wids (a third-party reader) opens shards.json
    as it is and reads the samples ours reads."""
    import shutil

    import wids

    from more_scale.data.pipeline import stored_sample
    from more_scale.data.shard_reader import ShardMismatch, ShardReader, ShardTable, load_table, table_path

    directory = shards / "train"
    index = read_index(directory)
    for entry in index["shards"]:
        tar = str(directory / entry["name"])
        stored, scanned = load_table(tar), ShardTable.scan(tar)
        assert stored.keys == scanned.keys and stored.exts == scanned.exts
        for name in ("first", "headers", "data", "sizes"):
            assert np.array_equal(getattr(stored, name), getattr(scanned, name)), name

    dataset = wids.ShardListDataset(str(directory / "shards.json"), cache_dir=str(tmp_path / "wids_cache"))
    assert len(dataset) == index["samples"]
    for position in (0, index["shards"][0]["samples"], len(dataset) - 1):  # first, another shard's first, last
        theirs, ours = dataset[position], stored_sample(directory, position)
        assert theirs["__key__"] == ours["__key__"]
        assert theirs[".meta.json"] == json.loads(ours["meta.json"])
        assert theirs[".rad.txt"] == ours["rad.txt"].decode()
        assert np.array_equal(theirs[".ecg.npy"], np.load(io.BytesIO(ours["ecg.npy"])))

    copy = tmp_path / "train"
    shutil.copytree(directory, copy)
    first = copy / index["shards"][0]["name"]
    size = first.stat().st_size
    with first.open("ab") as f:  # the tar replaced by a longer one after its table was written
        f.write(bytes(10240))
    with pytest.raises(ShardMismatch, match=f"{first.stem}.table.json describes a tar of {size} bytes, {first} has "
                                            f"{size + 10240}"):
        ShardReader([str(first)]).read(0, 0)
    assert table_path(str(first)) == str(copy / f"{first.stem}.table.json")
    table_file = Path(table_path(str(first)))
    table_file.write_text(table_file.read_text()[:100])  # cut short
    with pytest.raises(ShardMismatch, match=f"{first.stem}.table.json is not a member table"):
        ShardReader([str(first)]).read(0, 0)
