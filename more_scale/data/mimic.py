"""MIMIC-CXR-JPG 2.0.0 + MIMIC-CXR reports + MIMIC-IV-ECG 1.0 -> sample specs (build.py writes them).

Frontal studies (PA preferred over AP) are paired with ECGs of the same subject within a window: the
nearest one, or all of them. `keep_unpaired` also keeps X-ray-only studies and ECG-only records, which
train with a modality mask (DESIGN.md "The batch"). Split: MIMIC-CXR's official one, per subject.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from pathlib import Path

import pandas as pd

from more_scale.data import reports
from more_scale.data.build import BuildOptions, SampleSpec

FRONTAL_VIEWS = ("PA", "AP")  # PA preferred: AP (portable) films magnify the heart


def find_table(root: Path, name: str) -> Path:
    """`name`.csv or `name`.csv.gz under root (MIMIC ships both forms)."""
    for candidate in (root / f"{name}.csv", root / f"{name}.csv.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{root}: expected {name}.csv or {name}.csv.gz")


EDEMA_SEVERITY_FILES = ("regex_report_edema_severity", "expert_report_edema_severity",
                        "consensus_image_edema_severity")  # weakest first: a later file overrides


def edema_severity(root: Path) -> dict:
    """MIMIC-CXR pulmonary edema severity (PhysioNet mimic-cxr-pe-severity, 0-3) by study id, and by dicom id
    for the image-level consensus set, from whichever of its CSVs lie under `root` (none: {})."""
    grades = {}
    for name in EDEMA_SEVERITY_FILES:
        try:
            table = pd.read_csv(find_table(root, name), dtype={"dicom_id": str})
        except FileNotFoundError:
            continue
        key = "dicom_id" if "dicom_id" in table else "study_id"
        grades.update({k: int(v) for k, v in zip(table[key], table["edema_severity"]) if pd.notna(v)})
    return grades


def study_datetime(date: int, time: float) -> dt.datetime:
    """MIMIC-CXR StudyDate (YYYYMMDD) + StudyTime (HHMMSS.fff float that lost its leading zero)."""
    whole = int(time)
    base = dt.datetime.strptime(f"{int(date)}{whole:06d}", "%Y%m%d%H%M%S")
    return base + dt.timedelta(seconds=round(float(time) - whole, 6))


class _Tables:
    """The CSVs, read once."""

    def __init__(self, cxr_root: Path, ecg_root: Path, reference_reports: bool = False, every_image: bool = False):
        meta = pd.read_csv(find_table(cxr_root, "mimic-cxr-2.0.0-metadata"), dtype={"dicom_id": str})
        split = pd.read_csv(find_table(cxr_root, "mimic-cxr-2.0.0-split"), dtype={"dicom_id": str})
        self.labels = pd.read_csv(find_table(cxr_root, "mimic-cxr-2.0.0-chexpert")).set_index("study_id")
        self.records = pd.read_csv(ecg_root / "record_list.csv")
        self.records["when"] = pd.to_datetime(self.records["ecg_time"]).dt.to_pydatetime() if len(self.records) else []
        statements = pd.read_csv(ecg_root / "machine_measurements.csv", low_memory=False).set_index("study_id")
        columns = [c for c in statements.columns if c.startswith("report_")]
        self.reference_reports = reference_reports
        if reference_reports:
            columns = [c for c in columns if int(c.split("_")[1]) < reports.REFERENCE_ECG_STATEMENTS]
        self.statements = statements[columns]
        self.frontal = meta[meta["ViewPosition"].isin(FRONTAL_VIEWS)].merge(split[["dicom_id", "split"]],
                                                                              on="dicom_id", how="left")
        self.not_frontal = len(meta) - len(self.frontal)
        self.frontal = self.frontal.assign(view_rank=self.frontal["ViewPosition"].map({"PA": 0, "AP": 1}))
        self.frontal = self.frontal.sort_values(["study_id", "view_rank", "dicom_id"])
        self.other_frontal = 0  # frontal images left out: a study's after its first (PA before AP)
        if not every_image:
            every = len(self.frontal)
            self.frontal = self.frontal.drop_duplicates("study_id")
            self.other_frontal = every - len(self.frontal)
        self.subject_split = dict(zip(split["subject_id"], split["split"])) if "subject_id" in split else {}
        self.edema = edema_severity(cxr_root)

    def ecg_statements(self, ecg_id: int) -> list[str]:
        if ecg_id not in self.statements.index:
            return []
        return [s for s in self.statements.loc[ecg_id] if isinstance(s, str)]

    def edema_grade(self, study_id: int, dicom_id: str) -> int | None:
        return self.edema.get(dicom_id, self.edema.get(study_id))

    def chexpert(self, study_id: int) -> dict:
        if study_id not in self.labels.index:
            return {}
        row = self.labels.loc[study_id].drop("subject_id", errors="ignore")
        return {name: (None if pd.isna(v) else float(v)) for name, v in row.items()}


def mimic_samples(cxr_root: Path, report_root: Path, ecg_root: Path,
                  options: BuildOptions) -> tuple[list[SampleSpec], Counter]:
    """Sample specs (pairs first, then the unpaired ones if kept) and the counts of what was left out."""
    tables = _Tables(cxr_root, ecg_root, options.reports == "reference", every_image=options.images == "all")
    skipped, samples, paired_ecgs = Counter(), [], set()
    skipped["not frontal (PA/AP) image"] = tables.not_frontal
    skipped["another frontal image of a study (--images all keeps it)"] = tables.other_frontal

    def study_key(row) -> str:  # a study with several frontal images (--images all): each sample names its image
        return f"{row.subject_id}_{row.study_id}" + (f"_{row.dicom_id}" if options.images == "all" else "")

    ecgs_by_subject = {s: g for s, g in tables.records.groupby("subject_id")}
    window = dt.timedelta(days=options.window_days)
    unpaired_studies = []
    for row in tables.frontal.itertuples(index=False):
        if options.require_chexpert and row.study_id not in tables.labels.index:
            skipped["X-ray study without a CheXpert row"] += 1
            continue
        when = study_datetime(row.StudyDate, row.StudyTime)
        candidates = ecgs_by_subject.get(row.subject_id)
        gaps = [] if candidates is None else [
            (abs(r.when - when), r) for r in candidates.itertuples(index=False) if abs(r.when - when) <= window]
        if not gaps:
            unpaired_studies.append((row, when))
            continue
        gaps.sort(key=lambda g: (g[0], g[1].study_id))
        for _, record in gaps[:1] if options.pairing == "nearest" else gaps:
            paired_ecgs.add(record.study_id)
            samples.append(_spec(f"{study_key(row)}_{record.study_id}", tables, cxr_root, report_root,
                                 ecg_root, study=(row, when), record=record))
    no_ecg = f"X-ray study without an ECG within {options.window_days:g} days"
    unpaired_records = [r for r in tables.records.itertuples(index=False) if r.study_id not in paired_ecgs]
    if options.keep_unpaired:
        samples += [_spec(f"{study_key(row)}_none", tables, cxr_root, report_root, ecg_root, study=(row, when))
                    for row, when in unpaired_studies]
        samples += [_spec(f"{r.subject_id}_none_{r.study_id}", tables, cxr_root, report_root, ecg_root, record=r)
                    for r in unpaired_records]
    else:
        skipped[no_ecg] = len(unpaired_studies)
        skipped["ECG not paired with a frontal X-ray study"] = len(unpaired_records)
    return samples, +skipped


def _spec(key: str, tables: _Tables, cxr_root: Path, report_root: Path, ecg_root: Path,
          study: tuple | None = None, record=None) -> SampleSpec:
    """One sample from an X-ray study (row, time), an ECG record row, or both."""
    fields, meta = {}, {}
    if study is not None:
        row, when = study
        group = f"p{str(row.subject_id)[:2]}/p{row.subject_id}"
        fields.update(cxr=str(cxr_root / "files" / group / f"s{row.study_id}" / f"{row.dicom_id}.jpg"),
                      report_file=str(report_root / "files" / group / f"s{row.study_id}.txt"))
        meta.update(subject_id=int(row.subject_id), study_id=int(row.study_id), dicom_id=row.dicom_id,
                    view=row.ViewPosition, split=row.split, cxr_time=when.isoformat(),
                    chexpert=tables.chexpert(row.study_id))
        if (grade := tables.edema_grade(row.study_id, row.dicom_id)) is not None:
            meta["edema_severity"] = grade
        split = row.split
    if record is not None:
        statements = tables.ecg_statements(record.study_id)
        text = reports.ecg_text(statements) or (reports.MISSING_ECG_NOTE if tables.reference_reports else "")
        fields.update(ecg=str(ecg_root / record.path), ecg_text=text)
        meta.update(subject_id=int(record.subject_id), ecg_id=int(record.study_id), ecg_time=record.when.isoformat(),
                    ecg_statements=statements)
        if study is None:
            split = tables.subject_split.get(record.subject_id, "train")  # the subject's X-ray split keeps test subjects out
    if study is not None and record is not None:
        meta["gap_hours"] = round((record.when - study[1]).total_seconds() / 3600, 3)
    return SampleSpec(key=key, split=split if isinstance(split, str) else "train", meta=meta, **fields)
