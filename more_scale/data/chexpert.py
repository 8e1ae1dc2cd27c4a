"""Stanford CheXpert's CSV layout (train.csv / valid.csv, or the test set's groundtruth.csv) -> X-ray-only sample
specs for zero-shot evaluation, the MoRE reference's X-ray protocol. Columns: `Path` (relative to the folder
that holds the dataset's own folder, as CheXpert writes it), `Frontal/Lateral`, and the 14 observations, each
1 (positive), 0 (negative), -1 (uncertain) or blank (not mentioned).

Labels go into meta.json as `chexpert: {observation: value}`, blank left out (the tasks file reads a blank as
negative where the label table exists, as for MIMIC-CXR's CheXpert file). The uncertain policy is explicit and
recorded in each sample: `ignore` keeps -1 (never a target), `positive` / `negative` map it to 1 / 0 (the
CheXpert paper's U-Ones / U-Zeros). CheXpert has no reports: the samples carry none, which evaluation allows
(no text retrieval on them) and training refuses.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from types import MappingProxyType

import pandas as pd

from more_scale.data.build import SampleSpec

OBSERVATIONS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                "Fracture", "Support Devices")
UNCERTAIN_POLICIES = MappingProxyType({"ignore": -1.0, "positive": 1.0, "negative": 0.0})
VALUES = (1.0, 0.0, -1.0)


def chexpert_samples(csv_path: Path, root: Path, split: str = "test",
                     uncertain: str = "ignore") -> tuple[list[SampleSpec], Counter]:
    """Specs of every frontal image of `csv_path`, in `split`; raises ValueError naming the file, row and column
    of anything that is not CheXpert's layout (every bad cell at once)."""
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain policy {uncertain!r}, expected one of {tuple(UNCERTAIN_POLICIES)}")
    table = pd.read_csv(csv_path, dtype={"Path": str, "Frontal/Lateral": str})
    missing = [c for c in ("Path", "Frontal/Lateral") if c not in table.columns]
    observations = [c for c in OBSERVATIONS if c in table.columns]
    if missing or not observations:
        raise ValueError(f"{csv_path}: not CheXpert's layout: missing columns {missing or list(OBSERVATIONS)} "
                         f"(found {list(table.columns)[:20]})")
    bad = [f"{csv_path}: row {n + 2}, column {name!r}: {value!r}, expected 1, 0, -1 or blank"
           for name in observations for n, value in table[name].items()
           if not (pd.isna(value) or _number(value) in VALUES)]
    if bad:
        raise ValueError(f"{len(bad)} bad label cells:\n" + "\n".join(bad[:20]))
    specs, skipped = [], Counter()
    for row in table.to_dict("records"):
        if str(row["Frontal/Lateral"]).strip().lower() != "frontal":
            skipped["lateral image"] += 1
            continue
        values = {name: float(row[name]) for name in observations if not pd.isna(row[name])}  # blank: left out
        labels = {name: UNCERTAIN_POLICIES[uncertain] if v == -1.0 else v for name, v in values.items()}
        path = row["Path"]
        # "CheXpert-v1.0/valid/patient64541/study1/view1_frontal.jpg" -> "valid_patient64541_study1_view1_frontal"
        key = re.sub(r"[^A-Za-z0-9]+", "_", Path(path).with_suffix("").as_posix().split("/", 1)[-1]).strip("_")
        view = row.get("AP/PA")
        specs.append(SampleSpec(key=key, split=split, cxr=str(root / path), needs_text=False,
                                meta={"chexpert": labels, "path": path, "view": "" if pd.isna(view) else str(view),
                                      "uncertain_policy": uncertain}))
    return specs, +skipped


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
