"""Fault suite, building shards: every bad input is reported with its reason and nothing else is lost.
Each case is recorded for docs/RELIABILITY.md (tests/reliability_report.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import wfdb
from conftest import ROOT
from faults import record

from more_scale.data import ecg
from more_scale.data.build import BuildOptions, read_index, write_shards
from more_scale.data.mimic import mimic_samples

FS = 500


def _signal(seconds: float = 10.0, leads: int = 12) -> np.ndarray:
    t = np.arange(int(seconds * FS)) / FS
    return np.stack([np.sin(2 * np.pi * (1 + i / 10) * t) * 0.5 for i in range(leads)], axis=1)  # (T, leads) mV


def _wfdb(folder, name, signal, fs=FS, lead_names=ecg.LEADS):
    wfdb.wrsamp(name, fs=fs, units=["mV"] * signal.shape[1], sig_name=list(lead_names)[:signal.shape[1]],
                p_signal=signal, fmt=["16"] * signal.shape[1], adc_gain=[200.0] * signal.shape[1],
                baseline=[0] * signal.shape[1], write_dir=str(folder))
    return name


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, raw_root):
    """A manifest of good rows and one row per kind of broken file, built with --skip-bad-rows off and on."""
    folder = tmp_path_factory.mktemp("bad_inputs")
    good_image = next((raw_root / "mimic-cxr-jpg" / "files").rglob("*.jpg"))
    shutil.copy(good_image, folder / "good.jpg")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG body" * 10)
    cv2.imwrite(str(folder / "full.png"), np.full((64, 64), 128, np.uint8))
    (folder / "corrupt.png").write_bytes((folder / "full.png").read_bytes()[:40])  # header, then cut
    (folder / "empty.jpg").write_bytes(b"")
    np.save(folder / "good.npy", _signal())
    gap = _signal()
    gap[1000:1200, 3] = np.nan  # a 0.4 s dropout in aVR
    np.save(folder / "gap.npy", gap)
    flat = _signal()
    flat[:, 4] = np.nan  # aVL never recorded
    np.save(folder / "allnan.npy", flat)
    spike = _signal()
    spike[2000:2600, 0] = np.inf  # 1.2 s of inf in lead I
    np.save(folder / "infrun.npy", spike)
    (folder / "empty.npy").write_bytes(b"")
    _wfdb(folder, "leads11", _signal(leads=11))
    _wfdb(folder, "short", _signal(seconds=2.5))
    _wfdb(folder, "fastheader", _signal(), fs=2500)  # 5000 samples said to be 2500 Hz: a 2 s record
    _wfdb(folder, "cutdata", _signal())
    data = (folder / "cutdata.dat").read_bytes()
    (folder / "cutdata.dat").write_bytes(data[:len(data) // 2])  # the header promises twice what the file holds
    rows = [("ok_image", "good.jpg", "", "", "Heart size normal."),
            ("ok_ecg", "", "good.npy", "500", ""),
            ("gap_ecg", "", "gap.npy", "500", ""),
            ("allnan_ecg", "", "allnan.npy", "500", ""),
            ("infrun_ecg", "", "infrun.npy", "500", ""),
            ("corrupt_jpeg", "corrupt.jpg", "", "", "x"),
            ("corrupt_png", "corrupt.png", "", "", "x"),
            ("empty_jpeg", "empty.jpg", "", "", "x"),
            ("empty_npy", "", "empty.npy", "500", ""),
            ("eleven_leads", "", "leads11", "", ""),
            ("short_ecg", "", "short", "", ""),
            ("rate_header", "", "fastheader", "", ""),
            ("cut_data", "", "cutdata", "", ""),
            ("ok_image", "good.jpg", "", "", "a repeated key"),  # bad row
            ("no_files", "", "", "", "text without a file")]  # bad row
    lines = ["key,cxr,ecg,ecg_rate,cxr_text,ecg_text,split"]
    lines += [f"{k},{c},{e},{r},{t},{'Sinus rhythm.' if e else ''},train" for k, c, e, r, t in rows]
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    command = [sys.executable, str(ROOT / "launch" / "build_shards.py"), "--source", "csv", "--manifest",
               str(folder / "manifest.csv"), "--out", str(folder / "shards"), "--workers", "1", "--tokenizer-vocab", "300"]
    strict = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    lenient = subprocess.run(command + ["--skip-bad-rows"], capture_output=True, text=True, cwd=ROOT)
    return folder, strict, lenient


def _failure(index: dict, key: str) -> str:
    return next((f.split(": ", 1)[1] for f in index["failures"] if f.startswith(f"{key}: ")), "built")


def test_bad_manifest_rows_are_all_reported_at_once(bad_inputs):
    folder, strict, lenient = bad_inputs
    manifest = folder / "manifest.csv"
    rows = [line.removeprefix(f"{manifest} ") for line in strict.stderr.splitlines()[1:]]
    observed = f"exit {strict.returncode}; " + "; ".join(rows)
    record("build", "CSV manifest with a repeated key and a row with neither X-ray nor ECG",
           "exit 2; row 15: key 'ok_image' repeats row 2's; row 16: neither cxr nor ecg is given", observed)
    index = read_index(folder / "shards" / "train")
    rejected = [r.removeprefix(f"{manifest} ") for r in index["build"]["rejected_rows"]]
    record("build", "the same manifest with --skip-bad-rows",
           "built; shards.json lists 2 rejected rows", f"{'built' if lenient.returncode == 0 else lenient.stderr[-300:]}; "
           f"shards.json lists {len(rejected)} rejected rows")


CASES = [  # (key, fault, expected reason in shards.json, or "built")
    ("ok_image", "a good X-ray", "built"),
    ("ok_ecg", "a good ECG", "built"),
    ("corrupt_jpeg", "corrupt JPEG bytes", "{f}/corrupt.jpg: not a readable image (expected JPEG/PNG)"),
    ("corrupt_png", "a PNG cut after its header", "{f}/corrupt.png: not a readable image (expected JPEG/PNG)"),
    ("empty_jpeg", "a zero-byte image file", "{f}/empty.jpg: not a readable image (expected JPEG/PNG)"),
    ("empty_npy", "a zero-byte .npy ECG", "{f}/empty.npy: unreadable .npy"),
    ("allnan_ecg", "an ECG lead that is all NaN", "{f}/allnan.npy: lead aVL has no finite sample (all NaN/inf)"),
    ("infrun_ecg", "an ECG with 1.2 s of inf in one lead", "{f}/infrun.npy: lead I has a 1.20 s run of NaN/inf (> 1 s)"),
    ("eleven_leads", "an 11-lead WFDB record",
     "{f}/leads11: ECG lacks leads ['V6'] (has ['I', 'II', 'III', 'aVR', 'aVL', 'aVF', 'V1', 'V2', 'V3', 'V4', 'V5'])"),
    ("short_ecg", "a 2.5 s ECG", "{f}/short: 2.50 s of signal at 500 Hz (< 5 s)"),
    ("rate_header", "a header rate (2500 Hz) that makes the record 2 s", "{f}/fastheader: 2.00 s of signal at 2500 Hz (< 5 s)"),
    ("cut_data", "a header promising more samples than its data file holds",
     "{f}/cutdata: unreadable WFDB record (Samples were not loaded correctly)"),
]


@pytest.mark.parametrize("key, fault, expected", CASES, ids=[c[0] for c in CASES])
def test_each_broken_file_fails_alone_with_its_reason(bad_inputs, key, fault, expected):
    folder, _, _ = bad_inputs
    index = read_index(folder / "shards" / "train")
    observed = _failure(index, key)
    if expected.endswith("unreadable .npy"):
        observed = observed.split(" (")[0]  # numpy's own words follow in brackets
    record("build", fault, expected.format(f=folder), observed)


def test_a_short_nan_gap_is_filled_and_counted(bad_inputs):
    folder, _, _ = bad_inputs
    index = read_index(folder / "shards" / "train")
    meta = {}
    for entry in index["shards"]:
        with tarfile.open(folder / "shards" / "train" / entry["name"]) as tar:
            for m in tar.getmembers():
                if m.name.endswith("meta.json"):
                    meta[m.name.split(".")[0]] = json.loads(tar.extractfile(m).read())
    record("build", "an ECG with a 0.4 s NaN dropout in one lead", "built; 200 samples filled and counted in meta.json",
           f"{_failure(index, 'gap_ecg')}; {meta.get('gap_ecg', {}).get('ecg_gap_samples_filled')} samples filled and "
           "counted in meta.json")


def test_reports_not_utf8_or_huge(raw_root, tmp_path):
    """MIMIC layout: one report file in Latin-1, one of 1 MB."""
    raw = tmp_path / "raw"
    shutil.copytree(raw_root, raw)
    options = BuildOptions(short_side=64, samples_per_shard=64, tokenizer_vocab=0)
    specs, _ = mimic_samples(raw / "mimic-cxr-jpg", raw / "mimic-cxr-reports", raw / "mimic-iv-ecg", options)
    # Both in one split, so one shard index reports both.
    latin = specs[0]
    huge = next(spec for spec in specs[1:] if spec.split == latin.split)
    Path(latin.report_file).write_bytes("FINDINGS: Coeur normal, épanchement pleural.".encode("latin-1"))
    Path(huge.report_file).write_text("FINDINGS: " + "The lungs are clear. " * 50_000)  # ~1 MB
    write_shards([latin, huge], tmp_path / "shards", options, {"source": "mimic"})
    split = latin.split
    index = read_index(tmp_path / "shards" / split)
    record("build", "a report file that is not UTF-8 (Latin-1)",
           f"{latin.report_file}: not UTF-8 text (invalid continuation byte at byte 24)", _failure(index, latin.key))
    with tarfile.open(tmp_path / "shards" / split / index["shards"][0]["name"]) as tar:
        text = tar.extractfile(f"{huge.key}.rad.txt").read()
        meta = json.loads(tar.extractfile(f"{huge.key}.meta.json").read())
    record("build", "a 1 MB report", "built; cut to 20000 characters, the cut counted in meta.json",
           f"{_failure(index, huge.key)}; cut to {len(text)} characters, the cut "
           f"{'counted' if meta.get('rad.txt_chars_cut', 0) > 0 else 'not counted'} in meta.json")
