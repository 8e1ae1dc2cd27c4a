"""ECG / X-ray / report preprocessing against scipy, OpenCV and hand-computed references."""

import io
import random
from collections import Counter

import cv2
import numpy as np
import pytest
import scipy.signal
from conftest import REAL_DATA

from more_scale.data import cxr, ecg, reports

MIMIC_ORDER = ("I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6")


def test_leads_reordered_by_name_not_position():
    signal = np.arange(12)[:, None] * np.ones((12, 3))  # row i holds value i
    out = ecg.reorder_leads(signal, MIMIC_ORDER)
    assert out[:, 0].tolist() == [MIMIC_ORDER.index(name) for name in ecg.LEADS]  # aVL<->aVF swapped back
    upper = ecg.reorder_leads(signal, [n.upper() for n in ecg.LEADS])  # PTB-XL writes AVR, AVL, AVF
    assert upper[:, 0].tolist() == list(range(12))
    with pytest.raises(ValueError, match=r"lacks leads \['V6'\]"):
        ecg.reorder_leads(signal[:11], MIMIC_ORDER[:11], "rec42")


def test_resample_keeps_a_tone():
    t = np.arange(5000) / 500
    x = np.sin(2 * np.pi * 5 * t)[None]
    y = ecg.resample(x, 500, 100)
    assert y.shape == (1, 1000)
    np.testing.assert_allclose(y[0, 50:-50], np.sin(2 * np.pi * 5 * np.arange(1000) / 100)[50:-50], atol=1e-2)
    np.testing.assert_allclose(y, scipy.signal.resample_poly(x, 1, 5, axis=-1))


def test_baseline_removal_equals_two_median_filters():
    rng = np.random.default_rng(0)
    t = np.arange(1000) / 100
    x = (0.5 * np.sin(2 * np.pi * 0.2 * t) + rng.normal(0, 0.05, t.size))[None]
    x[0, ::80] += 1.5  # beats
    expected = x[0] - scipy.signal.medfilt(scipy.signal.medfilt(x[0], 21), 61)
    out = ecg.remove_baseline(x, 100)
    np.testing.assert_allclose(out[0, 40:-40], expected[40:-40], atol=1e-12)  # edges: padding conventions differ
    assert abs(np.corrcoef(out[0], np.sin(2 * np.pi * 0.2 * t))[0, 1]) < 0.1  # the wander is gone


def test_model_input_min_max_and_flat_lead():
    x = np.stack([np.linspace(-3, 5, 800), np.zeros(800)] + [np.sin(np.arange(800))] * 10)
    out = ecg.to_model_input(x, 1000)
    assert out.shape == (12, 1000) and out.dtype == np.float32
    assert out[0, :800].min() == -1 and out[0, :800].max() == 1
    assert not out[1].any()  # a flat lead stays 0


@pytest.mark.skipif(not (REAL_DATA / "ecg").is_dir(), reason="shared/data/real absent")
def test_real_ptbxl_record_reads_in_standard_order():
    signal, fs = ecg.read_wfdb(REAL_DATA / "ecg/ptbxl_wfdb_ecg_image_kit/00001_lr")
    assert fs == 100 and signal.shape == (12, 1000)
    out, filled = ecg.preprocess_record(REAL_DATA / "ecg/ptbxl_wfdb_ecg_image_kit/00001_lr", 100)
    assert filled == 0
    assert out.dtype == np.float16 and np.isfinite(out).all()
    # Einthoven: III = II - I holds for the record in LEADS order
    np.testing.assert_allclose(signal[2], signal[1] - signal[0], atol=0.01)


@pytest.mark.skipif(not (REAL_DATA / "ecg").is_dir(), reason="shared/data/real absent")
def test_real_cinc_record_through_its_header():
    signal, fs = ecg.read_wfdb(REAL_DATA / "ecg/cinc2021_torch_ecg/HR06000")
    assert fs == 500 and signal.shape == (12, 5000)


def test_unreadable_record_names_the_file(tmp_path):
    with pytest.raises(ValueError, match="nothing_here"):
        ecg.read_wfdb(tmp_path / "nothing_here")


def test_cxr_steps_match_opencv(tmp_path):
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 255, (300, 200, 4), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "x.png"), rgba)
    gray = cxr.read_gray(tmp_path / "x.png")
    np.testing.assert_array_equal(gray, cv2.cvtColor(rgba, cv2.COLOR_BGRA2GRAY))
    np.testing.assert_array_equal(cxr.clahe(gray), cv2.createCLAHE(2.0, (8, 8)).apply(gray))
    assert cxr.resize_short_side(gray, 100).shape == (150, 100)
    x = cxr.to_model_input(gray, 64)
    assert x.shape == (1, 64, 64)
    resized = cv2.resize(gray, (64, 96), interpolation=cv2.INTER_LINEAR)
    top = (resized.shape[0] - 64) // 2
    np.testing.assert_allclose(x[0], (resized[top:top + 64] / 255.0 - 0.499) / 0.293, rtol=1e-5, atol=1e-5)
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="bad.jpg: not a readable image"):
        cxr.read_gray(tmp_path / "bad.jpg")


EXAMPLE = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PORTABLE AP)
 
 INDICATION:  ___ year old man with dyspnea  // eval for fluid
 
 COMPARISON:  ___
 
 FINDINGS: 
 
 Heart size is mildly enlarged.  Mild pulmonary vascular congestion.  No
 focal consolidation, pleural effusion or pneumothorax.
 
 IMPRESSION: 
 
 Mild cardiomegaly with vascular congestion.
"""


def test_radiology_sections_and_text():
    sections = reports.radiology_sections(EXAMPLE)
    assert sections["EXAMINATION"] == "CHEST (PORTABLE AP)"
    assert sections["INDICATION"] == "year old man with dyspnea // eval for fluid"  # ___ removed
    assert sections["FINDINGS"].startswith("Heart size is mildly enlarged.")
    assert reports.radiology_text(EXAMPLE) == (
        "Heart size is mildly enlarged. Mild pulmonary vascular congestion. No focal consolidation, pleural "
        "effusion or pneumothorax. Mild cardiomegaly with vascular congestion.")
    no_headers = "          FINAL REPORT\n Heart is normal.\n No effusion.\n"
    assert reports.radiology_text(no_headers) == "Heart is normal. No effusion."
    conclusion = " FINDINGS: clear.\n CONCLUSION: fine.\n"
    assert reports.radiology_sections(conclusion)["IMPRESSION"] == "fine."


def test_ecg_text_and_joined_report():
    assert reports.ecg_text(["Sinus rhythm", "Normal ECG", float("nan"), "", "Borderline."]) == \
        "Sinus rhythm. Normal ECG. Borderline."
    assert reports.joined_report("A.", "B.") == "The report from Xray is: A. The report from ECG is: B."
    assert reports.joined_report("", "B.") == "The report from ECG is: B."


def test_time_warp_keeps_length_and_ends_and_moves_the_middle():
    rng = np.random.default_rng(0)
    ramp = np.tile(np.linspace(-1, 1, 1000, dtype=np.float32), (12, 1))
    assert np.array_equal(ecg.time_warp(ramp, np.random.default_rng(0), 0.0), ramp)
    warped = ecg.time_warp(ramp, rng, 0.3)
    assert warped.shape == ramp.shape and warped.dtype == ramp.dtype
    assert np.allclose(warped[:, [0, -1]], ramp[:, [0, -1]], atol=1e-6)
    assert (np.diff(warped, axis=1) > 0).all()  # time runs forward, only at another speed
    assert np.abs(warped - ramp).max() > 0.01
    sine = np.sin(np.linspace(0, 20, 1000, dtype=np.float32))[None].repeat(12, 0) * np.arange(1, 13)[:, None]
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    times = _warped_times(rng_b, 0.3, 1000)
    reference = np.stack([np.interp(times, np.arange(1000), lead) for lead in sine])
    assert np.allclose(ecg.time_warp(sine.astype(np.float32), rng_a, 0.3), reference, atol=1e-5)


def _warped_times(rng, max_stretch, length, knots=4):
    """The warp's sample times, written out: piecewise-constant speeds, rescaled to keep both ends."""
    speeds = 1.0 + rng.uniform(-max_stretch, max_stretch, knots + 1)
    step = np.repeat(speeds, -(-length // (knots + 1)))[:length - 1]
    times = np.concatenate([[0.0], np.cumsum(step)])
    return times * (length - 1) / times[-1]


def test_permute_segments_reorders_equal_pieces():
    signal = np.arange(12 * 10, dtype=np.float32).reshape(12, 10)
    out = ecg.permute_segments(signal, np.random.default_rng(1), 5)
    perm = np.random.default_rng(1).permutation(5)
    assert np.array_equal(out, np.concatenate([signal[:, 2 * i:2 * i + 2] for i in perm], axis=1))
    assert sorted(map(tuple, out.T)) == sorted(map(tuple, signal.T))


def test_ecg_augmentation_branches_are_equally_likely_with_the_none_branch():
    """Over 900 seeds each branch is taken a third of the time with data.ecg_none (the reference's no_aug),
    half and half without it; 3 binomial standard deviations (0.016 at p = 1/3, 0.017 at 1/2) bound the
    shares. Which branch ran is read off the output: unchanged, a reordering of the same columns, or new values
    (10 pieces, so a permutation that happens to keep the order, 1 in 10!, never passes for the none branch)."""
    pieces = 10
    signal = np.random.default_rng(0).standard_normal((12, 1000)).astype(np.float32)

    def branch(out):
        if np.array_equal(out, signal):
            return "none"
        return "permute" if sorted(map(tuple, out.T)) == sorted(map(tuple, signal.T)) else "warp"

    for none, share in ((True, 1 / 3), (False, 1 / 2)):
        counts = Counter(branch(ecg.augment(signal, np.random.default_rng(seed), 0.25, pieces, none)) for seed in range(900))
        assert set(counts) == ({"none", "permute", "warp"} if none else {"permute", "warp"}), counts
        bound = 3 * np.sqrt(share * (1 - share) / 900)
        assert all(abs(n / 900 - share) < bound for n in counts.values()), counts
    assert np.array_equal(ecg.augment(signal, np.random.default_rng(0), 0.0, 1, False), signal)  # both off


def test_cxr_augmentation_is_seeded_and_reduces_to_a_resize():
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur((rng.random((256, 300)) * 255).astype(np.uint8), (9, 9), 3)
    aug = cxr.train_augmentation(64, (0.2, 1.0), 0.4, 0.5, 0.5)
    a, b, c = (cxr.augmented_input(image, aug, np.random.default_rng(seed), random.Random(seed)) for seed in (1, 1, 2))
    assert a.shape == (1, 64, 64) and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    whole = cxr.train_augmentation(64, (1.0, 1.0), 0.0, 0.0, 0.0)  # crop = the whole film, nothing else
    expected = cxr.normalise(cv2.resize(image, (64, 64), interpolation=cv2.INTER_LINEAR))
    assert np.allclose(cxr.augmented_input(image, whole, np.random.default_rng(0), random.Random(0)), expected, atol=1e-6)


def test_load_npy_equals_np_load_and_rejects_truncation():
    buffer = io.BytesIO()
    signal = np.random.default_rng(0).normal(size=(12, 1000)).astype(np.float16)
    np.save(buffer, signal)
    data = buffer.getvalue()
    assert np.array_equal(ecg.load_npy(data), np.load(io.BytesIO(data)))
    assert np.array_equal(ecg.load_npy(data), signal)  # twice: the second parse comes from the header cache
    with pytest.raises(ValueError):
        ecg.load_npy(data[:-10])


def test_short_nan_gaps_are_filled_and_counted_broken_leads_rejected():
    fs = 500.0
    signal = np.sin(np.arange(5000) / 50.0)[None].repeat(12, 0)
    gap = signal.copy()
    gap[3, 1000:1200] = np.nan  # a 0.4 s dropout, as real MIMIC records have
    gap[7, 10] = np.inf
    filled, count = ecg.fill_short_gaps(gap, fs, "rec")
    assert count == 201 and np.isfinite(filled).all() and (filled[3, 1000:1200] == 0).all()
    assert np.array_equal(filled[0], signal[0])  # untouched leads unchanged
    flat = signal.copy()
    flat[4] = np.nan
    with pytest.raises(ValueError, match="rec: lead aVL has no finite sample"):
        ecg.fill_short_gaps(flat, fs, "rec")
    long_gap = signal.copy()
    long_gap[0, 1000:1600] = np.inf
    with pytest.raises(ValueError, match=r"rec: lead I has a 1.20 s run of NaN/inf \(> 1 s\)"):
        ecg.fill_short_gaps(long_gap, fs, "rec")
