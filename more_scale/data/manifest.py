"""A user's own data as a CSV manifest -> sample specs. One row per sample; columns:

  cxr         X-ray file (JPEG/PNG)                          } at least one of the two
  ecg         WFDB record (no extension, or .hea) or .npy    }
  cxr_text    radiology report text                          } at least one of the two
  ecg_text    ECG report text / diagnosis names              }
  ecg_rate    sampling rate in Hz, needed for .npy ECGs
  split       train | validate | test (default train)
  key         unique sample name (default row<N>)

The columns `image` and `image_text` (this format's first names) are read as `cxr` and `cxr_text`.
Relative paths are taken from `root` (default: the manifest's folder). Columns named in
`label_columns` are copied into meta.json; any other column is reported as ignored.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import MappingProxyType

import pandas as pd

from more_scale.data.build import SampleSpec

COLUMNS = ("key", "split", "cxr", "cxr_text", "ecg", "ecg_text", "ecg_rate")
ALIASES = MappingProxyType({"image": "cxr", "image_text": "cxr_text"})
SPLITS = ("train", "validate", "test")


def manifest_samples(manifest: Path, root: Path | None = None, label_columns: tuple[str, ...] = ()
                     ) -> tuple[list[SampleSpec], list[str], list[str]]:
    """(specs of the good rows, the manifest columns nothing reads, one message per bad row). Every row
    is checked before anything is built, so one pass reports them all; each message names the row
    (as a spreadsheet numbers it) and the column."""
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    table = table.rename(columns={old: new for old, new in ALIASES.items() if new not in table.columns})
    root = root or manifest.parent
    if not {"cxr", "ecg"} & set(table.columns) or not {"cxr_text", "ecg_text"} & set(table.columns):
        raise ValueError(f"{manifest}: needs a cxr or ecg column and a cxr_text or ecg_text column "
                         f"(has {list(table.columns)})")
    unknown = [c for c in label_columns if c not in table.columns]
    if unknown:
        raise ValueError(f"{manifest}: label columns {unknown} are not in the manifest")
    specs, bad, first_row = [], [], {}
    for number, row in enumerate(table.to_dict("records")):
        where = f"{manifest} row {number + 2}"  # the line number a spreadsheet shows (header is line 1)
        problems = []
        key = re.sub(r"[^A-Za-z0-9_-]", "_", row.get("key") or f"row{number:06d}")  # no dots: WebDataset splits on them
        if key in first_row:
            problems.append(f"key {key!r} repeats row {first_row[key]}'s")
        first_row.setdefault(key, number + 2)
        split = row.get("split") or "train"
        if split not in SPLITS:
            problems.append(f"split {split!r}, expected one of {SPLITS}")
        cxr, ecg = (_resolve(root, row.get(c, "")) for c in ("cxr", "ecg"))
        if not cxr and not ecg:
            problems.append("neither cxr nor ecg is given")
        if not (row.get("cxr_text", "").strip() or row.get("ecg_text", "").strip()):
            problems.append("neither cxr_text nor ecg_text is given")
        rate = row.get("ecg_rate") or "0"
        try:
            ecg_rate = float(rate)
        except ValueError:
            problems.append(f"ecg_rate {rate!r} is not a number")
            ecg_rate = 0.0
        if problems:
            bad.append(f"{where}: {'; '.join(problems)}")
            continue
        meta = {"source_row": number, "cxr_path": row.get("cxr", ""), "ecg_path": row.get("ecg", ""),
                **{c: row[c] for c in label_columns}}
        specs.append(SampleSpec(key=key, split=split, cxr=cxr, cxr_text=row.get("cxr_text", ""), ecg=ecg,
                                ecg_npy_rate=ecg_rate, ecg_text=row.get("ecg_text", ""), meta=meta))
    ignored = [c for c in table.columns if c not in COLUMNS and c not in label_columns]
    return specs, ignored, bad


def _resolve(root: Path, path: str) -> str:
    return "" if not path.strip() else str(root / path.strip())
