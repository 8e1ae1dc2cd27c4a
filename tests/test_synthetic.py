"""The fake raw dataset copies the real MIMIC layouts and carries learnable signal."""

import hashlib
import re

import numpy as np
import pandas as pd
import pytest
import wfdb

from more_scale.data import synthetic
from more_scale.data.synthetic import CxrFindings, EcgFindings, make_synthetic


def _tree_digest(root):
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_any_worker_count(tmp_path):
    make_synthetic(tmp_path / "a", subjects=6, seed=5, image_size=64, workers=1)
    make_synthetic(tmp_path / "b", subjects=6, seed=5, image_size=64, workers=2)
    make_synthetic(tmp_path / "c", subjects=6, seed=6, image_size=64)
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    assert _tree_digest(tmp_path / "a") != _tree_digest(tmp_path / "c")


def test_layout_and_schemas_match_mimic(raw_root):
    cxr, ecg = raw_root / "mimic-cxr-jpg", raw_root / "mimic-iv-ecg"
    meta = pd.read_csv(cxr / "mimic-cxr-2.0.0-metadata.csv", dtype={"dicom_id": str})
    assert list(meta.columns) == list(synthetic.CXR_METADATA_COLUMNS)
    assert list(pd.read_csv(cxr / "mimic-cxr-2.0.0-split.csv").columns) == ["dicom_id", "study_id", "subject_id", "split"]
    assert list(pd.read_csv(cxr / "mimic-cxr-2.0.0-chexpert.csv").columns)[2:] == list(synthetic.CHEXPERT_LABELS)
    row = meta.iloc[0]
    assert re.fullmatch(r"([0-9a-f]{8}-){4}[0-9a-f]{8}", row.dicom_id)
    assert str(row.subject_id).startswith("1") and len(str(row.subject_id)) == 8
    assert str(row.study_id).startswith("5") and len(str(row.study_id)) == 8
    image = cxr / "files" / f"p{str(row.subject_id)[:2]}" / f"p{row.subject_id}" / f"s{row.study_id}" / f"{row.dicom_id}.jpg"
    assert image.is_file()
    assert (raw_root / "mimic-cxr-reports" / "files" / f"p{str(row.subject_id)[:2]}" / f"p{row.subject_id}"
            / f"s{row.study_id}.txt").is_file()
    assert set(meta.ViewPosition) <= {"PA", "AP", "LATERAL"}
    assert (meta.StudyTime < 100000).any()  # leading zero lost, as in the real table
    records = pd.read_csv(ecg / "record_list.csv")
    assert list(records.columns) == ["subject_id", "study_id", "file_name", "ecg_time", "path"]
    measurements = pd.read_csv(ecg / "machine_measurements.csv")
    assert list(measurements.columns) == list(synthetic.ECG_MEASUREMENT_COLUMNS)
    first = records.iloc[0]
    assert first.path == f"files/p{str(first.subject_id)[:4]}/p{first.subject_id}/s{first.study_id}/{first.study_id}"
    header = (ecg / f"{first.path}.hea").read_text().splitlines()
    assert re.fullmatch(rf"{first.study_id} 12 500 5000 \d\d:\d\d:\d\d \d\d/\d\d/\d{{4}}", header[0])
    assert [line.split()[-1] for line in header[1:13]] == list(synthetic.MIMIC_ECG_LEADS)  # aVF before aVL
    assert all(" 16 200.0(0)/mV " in line for line in header[1:13])
    assert header[13] == f"# <subject_id>: {first.subject_id}"
    record = wfdb.rdrecord(str(ecg / first.path))
    assert record.p_signal.shape == (5000, 12) and record.fs == 500


def test_report_structure(raw_root):
    text = next((raw_root / "mimic-cxr-reports").rglob("*.txt")).read_text()
    lines = text.splitlines()
    assert lines[0].strip() == "FINAL REPORT" and lines[0].startswith(" " * 20)
    assert all(line.startswith(" ") and len(line) <= 79 for line in lines[1:])
    assert " INDICATION:  ___" in text


def test_findings_change_the_image():
    rng = np.random.default_rng(0)
    normal = [synthetic._render_cxr(rng, CxrFindings(0, "", 0), "PA", 128) for _ in range(5)]
    big_heart = [synthetic._render_cxr(rng, CxrFindings(3, "", 0), "PA", 128) for _ in range(5)]
    fluid = [synthetic._render_cxr(rng, CxrFindings(0, "bilateral", 0), "PA", 128) for _ in range(5)]

    def bright_fraction(images, rows):
        return np.mean([(im[rows] > 160).mean() for im in images])

    heart_rows = slice(64, 100)  # the heart shadow sits below the centre
    assert bright_fraction(big_heart, heart_rows) > 1.3 * bright_fraction(normal, heart_rows)
    base_rows = slice(80, 118)  # effusions whiten the lung bases
    assert np.mean([im[base_rows].mean() for im in fluid]) > np.mean([im[base_rows].mean() for im in normal]) + 5


@pytest.mark.parametrize("rhythm, low, high", [("brady", 40, 56), ("sinus", 60, 97), ("tachy", 103, 142)])
def test_rhythm_sets_the_rate(rhythm, low, high):
    times, rate = synthetic._beat_times(np.random.default_rng(1), rhythm)
    assert low <= 60 / np.diff(times).mean() <= high and low <= rate <= high


def test_af_is_irregular_and_lvh_is_tall():
    rng = np.random.default_rng(2)
    sinus = np.diff(synthetic._beat_times(rng, "sinus")[0])
    af = np.diff(synthetic._beat_times(rng, "afib")[0])
    assert np.std(af) / np.mean(af) > 3 * np.std(sinus) / np.mean(sinus)
    v5 = synthetic.MIMIC_ECG_LEADS.index("V5")
    normal, _ = synthetic._synth_ecg(np.random.default_rng(3), EcgFindings("sinus", False))
    lvh, _ = synthetic._synth_ecg(np.random.default_rng(3), EcgFindings("sinus", True))
    assert np.ptp(lvh[:, v5]) > 1.5 * np.ptp(normal[:, v5])
