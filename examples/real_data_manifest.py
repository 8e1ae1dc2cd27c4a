"""Write a more_scale CSV manifest for the small real public data in shared/data/real (see its README):
covid-chestxray X-rays with their clinical notes, CinC 2021 12-lead ECGs (.mat read through .hea) with
their diagnosis names, PTB-XL ECGs (raw WFDB and 500 Hz .npy) with their free-text reports.

  python examples/real_data_manifest.py ../shared/data/real real_manifest.csv
  python launch/build_shards.py --source csv --manifest real_manifest.csv --root ../shared/data/real \\
      --label-columns source,finding,view,superclass,subclass,rhythm --out real_shards

An example of turning a folder of your own into a manifest. Every X-ray and ECG file it finds is either
a manifest row or listed with the reason it is not; the build then reports unreadable ones.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import pandas as pd

from more_scale.data.ptbxl import scp_labels

COVID = Path("cxr/covid_chestxray_subset")
CINC = Path("ecg/cinc2021_torch_ecg")
PTBXL_PAIRS = Path("ecg/ptbxl_ecg_report_pairs.csv")
PTBXL_STATEMENTS = Path("ecg/ptbxl_meta/scp_statements.csv")
PTBXL_SPLITS = {9: "validate", 10: "test"}


def manifest_rows(real: Path) -> tuple[list[dict], dict[str, str]]:
    """Manifest rows, and {file: reason} for X-ray/ECG files under `real` that are not rows."""
    rows = []
    covid = pd.read_csv(real / COVID / "metadata_subset.csv", dtype=str, keep_default_na=False)
    patients = sorted(covid["patientid"].unique(), key=lambda p: (len(p), p))
    test_patients = set(patients[int(0.8 * len(patients)):])  # the last fifth of patients: no patient in two splits
    for i, r in enumerate(covid.to_dict("records")):
        rows.append({"key": f"covid_{i:03d}", "split": "test" if r["patientid"] in test_patients else "train",
                     "cxr": str(COVID / r["path"]), "cxr_text": r["clinical_notes"], "source": "covid-chestxray",
                     "finding": r["finding"], "view": r["view"]})
    pairs = pd.read_csv(real / PTBXL_PAIRS, dtype={"signal_path": str})
    statements = pd.read_csv(real / PTBXL_STATEMENTS, index_col=0)
    for r in pairs.itertuples(index=False):
        npy = r.signal_path.endswith(".npy")
        labels = scp_labels(ast.literal_eval(r.scp_codes), statements)  # as the ptbxl builder derives them
        rows.append({"key": f"ptbxl_{r.ecg_id:05d}_{'npy' if npy else 'wfdb'}",
                     "split": PTBXL_SPLITS.get(int(r.strat_fold), "train"), "ecg": r.signal_path,
                     "ecg_rate": "500" if npy else "", "ecg_text": r.report, "source": "ptb-xl",
                     "finding": r.diagnostic_superclass, "superclass": r.diagnostic_superclass,
                     "subclass": ";".join(labels["subclass"]), "rhythm": ";".join(labels["rhythm"])})
    in_pairs = {Path(p).as_posix() for p in pairs["signal_path"]}
    not_rows = {}
    for r in pd.read_csv(real / CINC / "labels.csv", dtype=str, keep_default_na=False).to_dict("records"):
        record = (CINC / r["record"]).as_posix()
        if record in in_pairs:
            not_rows[record] = "the same recording is a PTB-XL report pair row (its report is the richer text)"
            continue
        rows.append({"key": f"cinc_{r['record']}", "split": "train", "ecg": record, "ecg_text": r["dx_text"],
                     "source": "cinc2021", "finding": r["dx_text"]})
    listed = {row.get("cxr") or row.get("ecg") for row in rows}
    for path in sorted(_signal_and_image_files(real)):
        if path not in listed and path not in not_rows:
            not_rows[path] = "no metadata row names it"
    return rows, not_rows


def _signal_and_image_files(real: Path):
    """X-ray images and ECG records (one name per WFDB record: its path without extension)."""
    for path in (real / COVID / "images").iterdir():
        yield path.relative_to(real).as_posix()
    for header in (real / "ecg").rglob("*.hea"):
        yield header.with_suffix("").relative_to(real).as_posix()
    for array in (real / "ecg").rglob("*.npy"):
        yield array.relative_to(real).as_posix()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("real", type=Path, help="the shared/data/real folder")
    parser.add_argument("out", type=Path, help="manifest CSV to write")
    args = parser.parse_args()
    rows, not_rows = manifest_rows(args.real)
    pd.DataFrame(rows).fillna("").to_csv(args.out, index=False)
    print(f"{args.out}: {len(rows)} rows")
    for path, reason in not_rows.items():
        print(f"not a row: {path}: {reason}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
