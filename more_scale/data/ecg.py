"""12-lead ECG records -> filtered, resampled arrays in one lead order, and model tensors."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import scipy.ndimage
import scipy.signal
import wfdb

# Conventional order (PTB-XL's); MIMIC-IV-ECG stores aVF before aVL, so leads are matched by name.
LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
_BY_UPPER = {name.upper(): i for i, name in enumerate(LEADS)}


def read_wfdb(path: str | Path) -> tuple[np.ndarray, float]:
    """WFDB record (path without extension) -> ((12, T) mV in LEADS order, sampling rate)."""
    try:
        record = wfdb.rdrecord(str(path))
    except (FileNotFoundError, ValueError, OSError) as error:
        raise ValueError(f"{path}: unreadable WFDB record ({error})") from error
    return reorder_leads(record.p_signal.T, record.sig_name, path), float(record.fs)


def reorder_leads(signal: np.ndarray, names, source: str | Path = "") -> np.ndarray:
    """(L, T) in the record's lead order -> (12, T) in LEADS order, matched by name."""
    index = {}
    for i, name in enumerate(names):
        key = name.strip().upper()
        if key in _BY_UPPER:
            index[_BY_UPPER[key]] = i
    missing = [LEADS[j] for j in range(len(LEADS)) if j not in index]
    if missing:
        raise ValueError(f"{source}: ECG lacks leads {missing} (has {list(names)})")
    return signal[[index[j] for j in range(len(LEADS))]]


def resample(signal: np.ndarray, fs_in: float, fs_out: float) -> np.ndarray:
    """Polyphase resampling along time (anti-aliased)."""
    if fs_in == fs_out:
        return signal
    up, down = _ratio(fs_out, fs_in)
    return scipy.signal.resample_poly(signal, up, down, axis=-1)


def _ratio(a: float, b: float) -> tuple[int, int]:
    f = Fraction(a / b).limit_denominator(1000)
    return f.numerator, f.denominator


def remove_baseline(signal: np.ndarray, fs: float) -> np.ndarray:
    """Subtract the baseline estimated by two median filters (0.2 s, then 0.6 s), as the paper."""
    k1 = int(round(0.2 * fs)) | 1  # odd kernel sizes
    k2 = int(round(0.6 * fs)) | 1
    baseline = scipy.ndimage.median_filter(signal, size=(1, k1), mode="nearest")
    baseline = scipy.ndimage.median_filter(baseline, size=(1, k2), mode="nearest")
    return signal - baseline


def preprocess_record(path: str | Path, fs_out: float = 100.0) -> np.ndarray:
    """What a shard stores: (12, T) float16 mV at fs_out, NaN -> 0, baseline removed."""
    signal, fs = read_wfdb(path)
    signal = np.nan_to_num(signal, nan=0.0, posinf=0.0, neginf=0.0)
    signal = remove_baseline(resample(signal, fs, fs_out), fs_out)
    return signal.astype(np.float16)


def to_model_input(signal: np.ndarray, samples: int) -> np.ndarray:
    """(12, T) -> (12, samples) float32, per-lead min-max to [-1, 1]; cropped or zero-padded."""
    x = np.asarray(signal, np.float32)[:, :samples]
    if x.shape[1] < samples:
        x = np.pad(x, ((0, 0), (0, samples - x.shape[1])))
    lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    span = np.where(hi - lo > 1e-6, hi - lo, 1.0)  # a flat lead stays 0 instead of dividing by 0
    return np.where(hi - lo > 1e-6, 2 * (x - lo) / span - 1, 0.0).astype(np.float32)
