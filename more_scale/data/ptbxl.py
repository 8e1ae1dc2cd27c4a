"""PTB-XL 1.0.x -> ECG-only sample specs: records100/ or records500/ WFDB records, the free-text
`report` column as ECG text, SCP statements aggregated into meta.json, split by strat_fold
(1-8 train, 9 validate, 10 test, the folds PTB-XL recommends).
"""

from __future__ import annotations

import ast
from pathlib import Path
from types import MappingProxyType

import pandas as pd

from more_scale.data.build import SampleSpec

FOLD_SPLITS = MappingProxyType({9: "validate", 10: "test"})  # every other fold trains


def scp_labels(codes: dict, statements: pd.DataFrame) -> dict:
    """SCP codes -> the label groups of PTB-XL's benchmark: diagnostic superclass and subclass (from the
    diagnostic statements), form and rhythm statements; each a sorted list."""
    known = [c for c in codes if c in statements.index]
    diagnostic = [c for c in known if statements.at[c, "diagnostic"] == 1]

    def column(codes_, name):
        return sorted({str(statements.at[c, name]) for c in codes_ if pd.notna(statements.at[c, name])})

    return {"superclass": column(diagnostic, "diagnostic_class"), "subclass": column(diagnostic, "diagnostic_subclass"),
            "form": sorted(c for c in known if statements.at[c, "form"] == 1),
            "rhythm": sorted(c for c in known if statements.at[c, "rhythm"] == 1)}


def ptbxl_samples(root: Path, rate: int = 100) -> list[SampleSpec]:
    """One ECG-only spec per row of ptbxl_database.csv (rate 100 reads filename_lr, 500 filename_hr)."""
    database_csv, statements_csv = root / "ptbxl_database.csv", root / "scp_statements.csv"
    for path in (database_csv, statements_csv):
        if not path.is_file():
            raise FileNotFoundError(f"{root}: no {path.name} (expected the PTB-XL folder)")
    database = pd.read_csv(database_csv)
    missing = {"ecg_id", "report", "scp_codes", "strat_fold", "filename_lr", "filename_hr"} - set(database.columns)
    if missing:
        raise ValueError(f"{database_csv}: missing columns {sorted(missing)}")
    statements = pd.read_csv(statements_csv, index_col=0)
    column = {100: "filename_lr", 500: "filename_hr"}[rate]
    specs = []
    for row in database.itertuples(index=False):
        codes = ast.literal_eval(row.scp_codes)
        meta = {"ecg_id": int(row.ecg_id), "strat_fold": int(row.strat_fold), "scp_codes": codes,
                **scp_labels(codes, statements)}
        for name in ("patient_id", "age", "sex"):
            value = getattr(row, name, None)
            meta[name] = None if value is None or pd.isna(value) else float(value)
        specs.append(SampleSpec(key=f"ptbxl_{int(row.ecg_id):05d}", split=FOLD_SPLITS.get(int(row.strat_fold), "train"),
                                ecg=str(root / getattr(row, column)), ecg_text=str(row.report), meta=meta))
    return specs
