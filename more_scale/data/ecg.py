"""12-lead ECG records -> filtered, resampled arrays in one lead order, and model tensors."""

from __future__ import annotations

import io
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType

import numpy as np
import scipy.ndimage
import scipy.signal
import wfdb

# Conventional order (PTB-XL's); MIMIC-IV-ECG stores aVF before aVL, so leads are matched by name.
LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
_BY_UPPER = MappingProxyType({name.upper(): i for i, name in enumerate(LEADS)})


def read_wfdb(path: str | Path) -> tuple[np.ndarray, float]:
    """WFDB record (path without extension, or its .hea) -> ((12, T) mV in LEADS order, sampling rate).
    The signal file (.dat, or CinC's .mat) is whatever the header names."""
    path = str(path)[:-4] if str(path).endswith(".hea") else str(path)
    try:
        record = wfdb.rdrecord(path)
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


def read_npy(path: str | Path, fs: float) -> tuple[np.ndarray, float]:
    """A (T, 12) or (12, T) array in LEADS order (as PTB-XL derived .npy files store it)."""
    if fs <= 0:
        raise ValueError(f"{path}: a .npy ECG needs its sampling rate (manifest column ecg_rate)")
    try:
        signal = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:  # EOFError: an empty file
        raise ValueError(f"{path}: unreadable .npy ({error})") from error
    if signal.ndim != 2 or len(LEADS) not in signal.shape:
        raise ValueError(f"{path}: ECG array of shape {signal.shape}, expected (T, 12) or (12, T)")
    return (signal.T if signal.shape[0] != len(LEADS) else signal).astype(np.float64), fs


MAX_GAP_S = 1.0  # a run of NaN/inf up to this long inside a lead is a dropout, filled; longer, the lead is broken
MAX_GAP_SHARE = 0.1  # ... and at most this share of a lead in all
MIN_SECONDS = 5.0  # shorter records cannot fill the model's 10 s window with half a record of signal


def fill_short_gaps(signal: np.ndarray, fs: float, source: str | Path = "") -> tuple[np.ndarray, int]:
    """(12, T) with short runs of NaN/inf set to 0 (the reference's NaN -> 0), and how many samples were
    filled. A lead with no finite sample, a run longer than MAX_GAP_S or gaps over MAX_GAP_SHARE of the
    lead raise ValueError naming the lead: such a record is broken, not a record with a dropout."""
    bad = ~np.isfinite(signal)
    if not bad.any():
        return signal, 0
    for lead, mask in zip(LEADS, bad):
        if not mask.any():
            continue
        if mask.all():
            raise ValueError(f"{source}: lead {lead} has no finite sample (all NaN/inf)")
        edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
        longest = int((edges[1::2] - edges[::2]).max())
        if longest > MAX_GAP_S * fs:
            raise ValueError(f"{source}: lead {lead} has a {longest / fs:.2f} s run of NaN/inf (> {MAX_GAP_S:g} s)")
        if mask.mean() > MAX_GAP_SHARE:
            raise ValueError(f"{source}: lead {lead} is {mask.mean():.0%} NaN/inf (> {MAX_GAP_SHARE:.0%})")
    return np.where(bad, 0.0, signal), int(bad.sum())


def preprocess_record(path: str | Path, fs_out: float = 100.0, npy_rate: float = 0.0) -> tuple[np.ndarray, int]:
    """What a shard stores of a record (see `preprocess_signal`). `path` is a WFDB record, or a .npy array
    sampled at `npy_rate`."""
    signal, fs = read_npy(path, npy_rate) if str(path).endswith(".npy") else read_wfdb(path)
    return preprocess_signal(signal, fs, fs_out, path)


def preprocess_signal(signal: np.ndarray, fs: float, fs_out: float = 100.0, source: str | Path = "") -> tuple[np.ndarray, int]:
    """(12, T) mV in LEADS order at `fs` -> (12, T') float16 at fs_out, short NaN/inf gaps filled with 0,
    baseline removed, and the number of samples filled."""
    if signal.ndim != 2 or signal.shape[0] != len(LEADS):
        raise ValueError(f"{source}: ECG shape {signal.shape}, expected ({len(LEADS)}, T) in the order {LEADS}")
    if signal.shape[1] < MIN_SECONDS * fs:
        raise ValueError(f"{source}: {signal.shape[1] / fs:.2f} s of signal at {fs:g} Hz (< {MIN_SECONDS:g} s)")
    signal, filled = fill_short_gaps(signal, fs, source)
    signal = remove_baseline(resample(signal, fs, fs_out), fs_out)
    return signal.astype(np.float16), filled


def load_npy(data: bytes) -> np.ndarray:
    """np.load of a stored ECG from its bytes, parsing each distinct header once: np.load parses the
    header with ast, which costs more than reading a 12 x 1000 float16 array. Truncated data raises, and so
    does any dtype but real numbers (a complex one would lose its imaginary part in astype, silently)."""
    if data[:6] != b"\x93NUMPY" or data[6] != 1:  # other versions: the general reader
        array = np.load(io.BytesIO(data), allow_pickle=False)
    else:
        end = 10 + int.from_bytes(data[8:10], "little")
        shape, fortran, dtype = _npy_header(bytes(data[:end]))
        if dtype.hasobject:
            raise ValueError("ecg.npy holds Python objects")
        array = np.frombuffer(data, dtype, count=int(np.prod(shape)), offset=end)
        array = array.reshape(shape, order="F" if fortran else "C")
    if array.dtype.kind not in "fiu" or array.dtype.names is not None:
        raise ValueError(f"ecg.npy dtype {array.dtype}, expected real numbers (float or integer)")
    return array


@lru_cache(maxsize=64)
def _npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    stream = io.BytesIO(header)
    np.lib.format.read_magic(stream)
    return np.lib.format.read_array_header_1_0(stream)


def to_model_input(signal: np.ndarray, samples: int) -> np.ndarray:
    """(12, T) -> (12, samples) float32, per-lead min-max to [-1, 1]; cropped or zero-padded."""
    x = np.asarray(signal, np.float32)[:, :samples]
    if x.shape[1] < samples:
        x = np.pad(x, ((0, 0), (0, samples - x.shape[1])))
    lo = x.min(axis=1, keepdims=True)
    span = x.max(axis=1, keepdims=True) - lo
    scale = np.divide(2.0, span, out=np.zeros_like(span), where=span > 1e-6)  # a flat lead stays 0
    offset = np.where(span > 1e-6, -1.0 - lo * scale, 0.0).astype(np.float32)
    return np.clip(x * scale + offset, -1.0, 1.0)  # rounding may overshoot by an ulp


def time_warp(signal: np.ndarray, rng: np.random.Generator, max_stretch: float, knots: int = 4) -> np.ndarray:
    """Stretch and compress time piecewise: each of `knots` + 1 stretches runs at a speed drawn from
    1 +- max_stretch, rescaled so the record keeps its length and both end points. Returns float32."""
    length = signal.shape[-1]
    speeds = 1.0 + rng.uniform(-max_stretch, max_stretch, knots + 1)
    warped = np.concatenate([[0.0], np.cumsum(np.repeat(speeds, -(-length // (knots + 1)))[:length - 1])])
    warped *= (length - 1) / warped[-1]
    # linear interpolation of all leads at once at the warped times (np.interp, one lead at a time, is 3x slower)
    left = np.minimum(warped.astype(np.int64), length - 2)
    frac = (warped - left).astype(np.float32)
    x = np.asarray(signal, np.float32)
    return x[:, left] * (1 - frac) + x[:, left + 1] * frac


def permute_segments(signal: np.ndarray, rng: np.random.Generator, pieces: int) -> np.ndarray:
    """Cut the record into `pieces` equal stretches of time and put them back in a random order."""
    parts = np.array_split(signal, pieces, axis=-1)
    return np.concatenate([parts[i] for i in rng.permutation(pieces)], axis=-1)


def augment(signal: np.ndarray, rng: np.random.Generator, max_stretch: float, pieces: int,
            none: bool = False) -> np.ndarray:
    """The paper's ECG augmentation: time-warp or segment permutation, one of them per record, equally likely
    (`none`: the unchanged record is a third choice, as in the reference's ECGAugmentor)."""
    choices = [c for c, on in (("warp", max_stretch > 0), ("permute", pieces > 1), ("none", none)) if on]
    choice = choices[rng.integers(len(choices))] if choices else "none"
    if choice == "warp":
        return time_warp(signal, rng, max_stretch)
    if choice == "permute":
        return permute_segments(signal, rng, pieces)
    return signal
