"""A deterministic fake MIMIC-CXR-JPG 2.0.0 + MIMIC-CXR reports + MIMIC-IV-ECG 1.0 raw dataset.

Real file formats and folder layouts (see shared/notes/dataset-schemas.md), invented content that
carries learnable signal: a finding changes both the picture and the report's words (cardiomegaly
widens the heart shadow, an effusion whitens a lung base, edema hazes the lungs); a rhythm or LVH
changes the waveform and the machine statements. Same seed and sizes give the same bytes.

Layout written under `out`:
  mimic-cxr-jpg/files/pXX/pSUBJECT/sSTUDY/<dicom_id>.jpg + mimic-cxr-2.0.0-{metadata,split,chexpert}.csv
  mimic-cxr-reports/files/pXX/pSUBJECT/sSTUDY.txt
  mimic-iv-ecg/files/pXXXX/pSUBJECT/sSTUDY/STUDY.{hea,dat} + record_list.csv + machine_measurements.csv
"""

from __future__ import annotations

import csv
import datetime as dt
import multiprocessing
import textwrap
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import cv2
import numpy as np
import wfdb
from rich.progress import track

CHEXPERT_LABELS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
)
MIMIC_ECG_LEADS = ("I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6")
CXR_METADATA_COLUMNS = (
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns",
    "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
ECG_MEASUREMENT_COLUMNS = (
    ("subject_id", "study_id", "cart_id", "ecg_time")
    + tuple(f"report_{i}" for i in range(18))
    + ("bandwidth", "filtering", "rr_interval", "p_onset", "p_end", "qrs_onset", "qrs_end", "t_end",
       "p_axis", "qrs_axis", "t_axis")
)
ECG_RATE_HZ = 500
ECG_SECONDS = 10
# machine_measurements.csv's codes for "not measured": an onset/offset of a wave that is absent (no P wave
# in AF) is 29999 ms, an axis that cannot be computed 32767, as in the real MIMIC-IV-ECG table
NO_ONSET_MS = 29999
NO_AXIS = 32767
SPLIT_FRACTIONS = (("train", 0.75), ("validate", 0.05), ("test", 0.2))  # by subject; a big test split for eval


@dataclass
class CxrFindings:
    heart_grade: int  # 0 normal, 1 mild, 2 moderate, 3 marked cardiomegaly
    effusion_side: str  # "" none | left | right | bilateral (the patient's side)
    edema_grade: int  # MIMIC's edema severity: 0 none, 1 vascular congestion, 2 interstitial, 3 alveolar
    atelectasis_side: str = ""  # "" none | left | right: a plate-like basal opacity

    @property
    def cardiomegaly(self) -> bool:
        return self.heart_grade > 0

    @property
    def effusion(self) -> bool:
        return bool(self.effusion_side)

    @property
    def edema(self) -> bool:
        return self.edema_grade > 0

    @property
    def atelectasis(self) -> bool:
        return bool(self.atelectasis_side)


@dataclass
class EcgFindings:
    rhythm: str  # sinus | brady | tachy | afib
    lvh: bool


MAX_STUDIES = 2  # per subject and modality


def make_synthetic(out: str | Path, subjects: int = 200, seed: int = 0, image_size: int = 320,
                   workers: int = 1) -> dict:
    """Write the fake raw dataset under `out`; returns counts of what was written.
    Subjects are generated independently (own RNG, pre-drawn ids), so `workers` never changes a byte."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    subject_ids = sorted(10_000_000 + rng.choice(9_999_999, size=subjects, replace=False))
    cxr_ids = 50_000_000 + rng.choice(9_999_999, size=(subjects, MAX_STUDIES), replace=False)
    ecg_ids = 40_000_000 + rng.choice(9_999_999, size=(subjects, MAX_STUDIES), replace=False)
    jobs = [(out, seed, i, int(subject_ids[i]), [int(v) for v in cxr_ids[i]], [int(v) for v in ecg_ids[i]], image_size)
            for i in range(subjects)]
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    rows = {"metadata": [], "splits": [], "chexpert": [], "edema": [], "record_list": [], "measurements": []}
    results = pool.imap(_make_subject, jobs, chunksize=4) if pool else map(_make_subject, jobs)
    for subject_rows in track(results, total=subjects, description="synthetic subjects"):
        for name, values in subject_rows.items():
            rows[name] += values
    if pool:
        pool.close()
        pool.join()
    cxr_root, ecg_root = out / "mimic-cxr-jpg", out / "mimic-iv-ecg"
    _write_csv(cxr_root / "mimic-cxr-2.0.0-metadata.csv", CXR_METADATA_COLUMNS, rows["metadata"])
    _write_csv(cxr_root / "mimic-cxr-2.0.0-split.csv", ("dicom_id", "study_id", "subject_id", "split"), rows["splits"])
    _write_csv(cxr_root / "mimic-cxr-2.0.0-chexpert.csv", ("subject_id", "study_id") + CHEXPERT_LABELS,
               rows["chexpert"])
    # as PhysioNet's mimic-cxr-pe-severity ships it (report-regex grades of the studies that mention edema)
    _write_csv(cxr_root / "regex_report_edema_severity.csv", ("subject_id", "study_id", "edema_severity"), rows["edema"])
    (cxr_root / "IMAGE_FILENAMES").write_text("".join(
        f"files/p{str(r[1])[:2]}/p{r[1]}/s{r[2]}/{r[0]}.jpg\n" for r in rows["metadata"]))
    _write_csv(ecg_root / "record_list.csv", ("subject_id", "study_id", "file_name", "ecg_time", "path"),
               rows["record_list"])
    _write_csv(ecg_root / "machine_measurements.csv", ECG_MEASUREMENT_COLUMNS, rows["measurements"])
    return {"subjects": subjects, "images": len(rows["metadata"]), "cxr_studies": len(rows["chexpert"]),
            "ecgs": len(rows["record_list"])}


def _make_subject(job) -> dict[str, list]:
    """All files of one subject; returns its CSV rows."""
    out, seed, index, subject, cxr_ids, ecg_ids, image_size = job
    cxr_root, report_root, ecg_root = out / "mimic-cxr-jpg", out / "mimic-cxr-reports", out / "mimic-iv-ecg"
    rows = {"metadata": [], "splits": [], "chexpert": [], "edema": [], "record_list": [], "measurements": []}
    srng = np.random.default_rng([seed, index])  # per subject: adding subjects keeps earlier bytes
    split = _split_for(srng.random())
    heart_disease = srng.random() < 0.4  # shared cause: makes X-ray and ECG findings co-occur
    base_day = dt.datetime(2150, 1, 1) + dt.timedelta(days=int(srng.integers(0, 365 * 30)))
    study_times = []
    for study in cxr_ids[: int(srng.integers(1, MAX_STUDIES + 1))]:
        when = base_day + dt.timedelta(days=int(srng.integers(0, 200)), seconds=float(srng.integers(0, 86400)),
                                       milliseconds=int(srng.integers(0, 1000)))
        study_times.append(when)
        findings = CxrFindings(
            heart_grade=int(srng.integers(1, 4)) if srng.random() < (0.65 if heart_disease else 0.12) else 0,
            effusion_side=str(srng.choice(["left", "right", "bilateral"]))
            if srng.random() < (0.45 if heart_disease else 0.15) else "",
            edema_grade=int(srng.integers(1, 4)) if srng.random() < (0.4 if heart_disease else 0.08) else 0,
            atelectasis_side=str(srng.choice(["left", "right"])) if srng.random() < 0.2 else "",
        )
        study_dir = cxr_root / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}"
        views = [srng.choice(["PA", "AP"], p=[0.6, 0.4])] + (["LATERAL"] if srng.random() < 0.5 else [])
        for view in views:
            dicom_id = "-".join(f"{int(v):08x}" for v in srng.integers(0, 2**32, size=5))
            image = _render_cxr(srng, findings, view, image_size)
            study_dir.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(study_dir / f"{dicom_id}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
            rows["metadata"].append(_metadata_row(dicom_id, subject, study, view, image.shape, when))
            rows["splits"].append((dicom_id, study, subject, split))
        report_path = report_root / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}.txt"
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(_radiology_report(srng, findings, views[0]))
        rows["chexpert"].append(_chexpert_row(srng, subject, study, findings))
        if findings.edema or srng.random() < 0.3:  # the severity set holds the studies whose report speaks of edema
            rows["edema"].append((subject, study, findings.edema_grade))
    for study in ecg_ids[: int(srng.integers(1, MAX_STUDIES + 1))]:
        anchor = study_times[int(srng.integers(0, len(study_times)))]
        when = anchor + dt.timedelta(days=int(srng.integers(-80, 81)), seconds=int(srng.integers(0, 86400)))
        when = when.replace(second=0, microsecond=0)
        findings = EcgFindings(
            rhythm=str(srng.choice(["sinus", "brady", "tachy", "afib"],
                                   p=[0.4, 0.15, 0.15, 0.3] if heart_disease else [0.6, 0.15, 0.15, 0.1])),
            lvh=srng.random() < (0.5 if heart_disease else 0.08),
        )
        rel = Path("files") / f"p{str(subject)[:4]}" / f"p{subject}" / f"s{study}" / str(study)
        _write_ecg(srng, ecg_root / rel, subject, findings, when)
        ecg_time = when.strftime("%Y-%m-%d %H:%M:%S")
        rows["record_list"].append((subject, study, study, ecg_time, str(rel)))
        rows["measurements"].append(_measurement_row(srng, subject, study, ecg_time, findings))
    return rows


def _split_for(u: float) -> str:
    for name, fraction in SPLIT_FRACTIONS:
        if u < fraction:
            return name
        u -= fraction
    return SPLIT_FRACTIONS[-1][0]


def _write_csv(path: Path, header, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


# --- chest X-ray -----------------------------------------------------------------------------------


def _render_cxr(rng: np.random.Generator, f: CxrFindings, view: str, size: int) -> np.ndarray:
    """A frontal or lateral chest radiograph cartoon; findings alter the anatomy they would."""
    s = size
    img = np.full((s, s), 25.0, np.float32)
    cx, cy = s / 2 + rng.normal(0, s * 0.02), s / 2 + rng.normal(0, s * 0.02)
    if view == "LATERAL":
        cv2.ellipse(img, (int(cx), int(cy)), (int(s * 0.30), int(s * 0.42)), 0, 0, 360, 120, -1)
        cv2.ellipse(img, (int(cx - s * 0.02), int(cy - s * 0.02)), (int(s * 0.2), int(s * 0.32)), 0, 0, 360, 60, -1)
        cv2.circle(img, (int(cx + s * 0.08), int(cy + s * 0.1)), int(s * (0.16 if f.cardiomegaly else 0.11)), 170, -1)
    else:
        cv2.ellipse(img, (int(cx), int(cy)), (int(s * 0.44), int(s * 0.46)), 0, 0, 360, 130, -1)  # soft tissue
        lungs = np.zeros_like(img)
        for side in (-1, 1):
            cv2.ellipse(lungs, (int(cx + side * s * 0.19), int(cy - s * 0.02)), (int(s * 0.15), int(s * 0.33)),
                        0, 0, 360, 1.0, -1)
        img = img * (1 - lungs) + 45.0 * lungs
        for k in range(7):  # ribs
            y = cy - s * 0.3 + k * s * 0.085
            for side in (-1, 1):
                cv2.ellipse(img, (int(cx + side * s * 0.05), int(y)), (int(s * 0.32), int(s * 0.06)), 0,
                            200 if side < 0 else -20, 340 if side < 0 else 160, 95, max(1, s // 90))
        if f.atelectasis:  # a plate-like band above the dome of the diaphragm, on the patient's side
            side = 1 if f.atelectasis_side == "left" else -1
            y = int(cy + s * rng.uniform(0.12, 0.2))
            cv2.line(img, (int(cx + side * s * 0.1), y), (int(cx + side * s * 0.3), y - int(s * 0.03)), 140,
                     max(2, s // 60))
        if f.edema:  # perihilar haze: raises lung density centrally
            yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
            haze = np.exp(-(((xx - cx) / (s * 0.2)) ** 2 + ((yy - cy) / (s * 0.25)) ** 2))
            img += lungs * haze * (35 + 30 * f.edema_grade)
        if f.effusion:  # dependent opacity with a meniscus; the patient's left is the image's right
            sides = {"left": (1,), "right": (-1,), "bilateral": (-1, 1)}[f.effusion_side]
            for side in sides:
                level = cy + s * rng.uniform(0.08, 0.18)
                fluid = np.zeros_like(img)
                cv2.ellipse(fluid, (int(cx + side * s * 0.19), int(level + s * 0.2)), (int(s * 0.2), int(s * 0.2)),
                            0, 0, 360, 1.0, -1)
                img = np.where((fluid * lungs) > 0, 150.0, img)
        heart_w = s * (rng.uniform(0.13, 0.16) + 0.045 * f.heart_grade)
        heart_w *= 1.1 if view == "AP" else 1.0  # AP magnifies the heart, as in real films
        cv2.ellipse(img, (int(cx - s * 0.03), int(cy + s * 0.12)), (int(heart_w), int(s * 0.15)), -15, 0, 360, 185, -1)
        cv2.rectangle(img, (int(cx - s * 0.05), int(cy - s * 0.4)), (int(cx + s * 0.05), int(cy)), 170, -1)  # spine
    img = cv2.GaussianBlur(img, (0, 0), s / 150)
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _metadata_row(dicom_id, subject, study, view, shape, when: dt.datetime) -> tuple:
    description = {"PA": "CHEST (PA AND LAT)", "AP": "CHEST (PORTABLE AP)", "LATERAL": "CHEST (PA AND LAT)"}[view]
    orientation = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral"}[view]
    # StudyTime is HHMMSS.fff stored as a float, so a leading zero is lost (80556.875 = 08:05:56.875)
    study_time = float(when.strftime("%H%M%S")) + round(when.microsecond / 1e6, 3)
    return (dicom_id, subject, study, description, view, shape[0], shape[1], int(when.strftime("%Y%m%d")),
            study_time, "CHEST (PA AND LAT)", orientation, "Erect")


# Several wordings per finding, none of them a prompt of eval/tasks.yaml (tests/test_evaluation.py checks):
# zero-shot scores must come from what the model learned, not from reading its own training sentences back.
HEART = MappingProxyType({
    0: ("Heart size is normal.", "The cardiac silhouette is within normal limits.",
        "Cardiomediastinal contours are unremarkable."),
    1: ("The heart is mildly enlarged.", "Heart size is at the upper limit of normal to mildly enlarged."),
    2: ("The heart is moderately enlarged.", "Moderate enlargement of the heart."),
    3: ("Marked enlargement of the cardiac silhouette.", "The heart is severely enlarged.")})
FLUID = MappingProxyType({
    "": ("No pleural effusion.", "There is no pleural effusion or pneumothorax.", "No pleural fluid is seen."),
    "left": ("There is a small left pleural effusion.", "Blunting of the left costophrenic angle from fluid."),
    "right": ("Right pleural effusion with blunting of the costophrenic angle.", "Small right-sided effusion."),
    "bilateral": ("Moderate bilateral pleural effusions.", "Effusions layer on both sides.")})
LUNGS = MappingProxyType({
    0: ("No pulmonary edema.", "The lungs are clear without edema.", "No signs of fluid overload."),
    1: ("Mild pulmonary vascular engorgement.", "Cephalization of the pulmonary vessels."),
    2: ("Mild pulmonary edema.", "Interstitial markings are prominent, consistent with edema."),
    3: ("Moderate pulmonary edema with vascular congestion.", "Diffuse airspace opacities from pulmonary edema.")})
COLLAPSE = MappingProxyType({
    "left": ("Streaky left basilar opacity, likely atelectasis.", "Left lower lobe volume loss."),
    "right": ("Right basilar linear opacity consistent with atelectasis.", "Discoid atelectasis on the right.")})


def _radiology_report(rng: np.random.Generator, f: CxrFindings, view: str) -> str:
    heart, fluid, lungs = (str(rng.choice(t)) for t in (HEART[f.heart_grade], FLUID[f.effusion_side],
                                                         LUNGS[f.edema_grade]))
    collapse = str(rng.choice(COLLAPSE[f.atelectasis_side])) + "  " if f.atelectasis else ""
    positives = [name for name, on in (("cardiomegaly", f.cardiomegaly), ("pleural effusion", f.effusion),
                                       ("pulmonary edema", f.edema), ("atelectasis", f.atelectasis)) if on]
    impression = ("Findings of " + " and ".join(positives) + ".") if positives else \
        str(rng.choice(["No acute cardiopulmonary process.", "No acute intrathoracic abnormality."]))
    findings = f"{heart}  {lungs}  {collapse}{fluid}  No pneumothorax."
    lines = [" " * 33 + "FINAL REPORT",
             f" EXAMINATION:  CHEST ({'PORTABLE AP' if view == 'AP' else 'PA AND LAT'})", " ",
             " INDICATION:  ___ year old with dyspnea  // eval for fluid", " ", " COMPARISON:  ___", " "]
    if rng.random() < 0.1:  # some reports have no FINDINGS/IMPRESSION header: builders fall back
        lines += _wrap(f"{findings}  {impression}")
    else:
        lines += [" FINDINGS: ", " "] + _wrap(findings) + [" ", " IMPRESSION: ", " "] + _wrap(impression)
    return "\n".join(lines) + "\n"


def _wrap(text: str) -> list[str]:
    return [" " + line for line in textwrap.wrap(text, 78)]


def _chexpert_row(rng: np.random.Generator, subject, study, f: CxrFindings) -> tuple:
    labels = dict.fromkeys(CHEXPERT_LABELS, "")
    for name, on in (("Cardiomegaly", f.cardiomegaly), ("Pleural Effusion", f.effusion), ("Edema", f.edema)):
        labels[name] = 1.0 if on else 0.0
    labels["Atelectasis"] = 1.0 if f.atelectasis else (-1.0 if rng.random() < 0.05 else 0.0 if rng.random() < 0.5 else "")
    if not (f.cardiomegaly or f.effusion or f.edema or f.atelectasis):
        labels["No Finding"] = 1.0
    return (subject, study) + tuple(labels.values())


# --- ECG -------------------------------------------------------------------------------------------

# Frontal-plane angle (deg) of each limb lead and horizontal-plane angle of each chest lead: a lead
# records the projection of the heart's electrical vector onto its axis.
_LEAD_AXES = MappingProxyType({"I": 0, "II": 60, "III": 120, "aVR": -150, "aVF": 90, "aVL": -30,
              "V1": 115, "V2": 95, "V3": 75, "V4": 55, "V5": 30, "V6": 0})


def _beat_times(rng: np.random.Generator, rhythm: str) -> tuple[np.ndarray, float]:
    rate = {"sinus": rng.uniform(62, 95), "brady": rng.uniform(40, 55),
            "tachy": rng.uniform(105, 140), "afib": rng.uniform(80, 130)}[rhythm]
    rr = 60.0 / rate
    times, t = [], rng.uniform(0, rr)
    while t < ECG_SECONDS:
        times.append(t)
        jitter = 0.22 if rhythm == "afib" else 0.02  # AF: irregularly irregular
        t += rr * float(np.clip(1 + rng.normal(0, jitter), 0.55, 1.6))
    return np.array(times), rate


def _synth_ecg(rng: np.random.Generator, f: EcgFindings) -> tuple[np.ndarray, float]:
    """(5000, 12) millivolts in MIMIC lead order, and the mean rate in bpm."""
    t = np.arange(ECG_RATE_HZ * ECG_SECONDS) / ECG_RATE_HZ
    beats, rate = _beat_times(rng, f.rhythm)
    qrs_axis = np.deg2rad(rng.uniform(20, 70) - (35 if f.lvh else 0))
    horiz = np.deg2rad(rng.uniform(40, 60))
    qrs_gain = 2.4 if f.lvh else 1.0
    def wave_per_beat(offset: float, width: float) -> np.ndarray:  # one Gaussian wave per beat, summed
        return np.exp(-(((t[:, None] - beats[None, :] - offset) / width) ** 2)).sum(axis=1)

    p_wave, r_wave = wave_per_beat(-0.16, 0.025), wave_per_beat(0.0, 0.012)
    s_wave, t_wave = wave_per_beat(0.03, 0.01), wave_per_beat(0.3, 0.05)
    signal = np.zeros((t.size, len(MIMIC_ECG_LEADS)))
    for i, lead in enumerate(MIMIC_ECG_LEADS):
        axis = np.deg2rad(_LEAD_AXES[lead])
        proj = np.cos(axis - (horiz if lead.startswith("V") else qrs_axis))
        p_amp = 0.0 if f.rhythm == "afib" else 0.15 * proj
        t_amp = 0.3 * proj * (-0.8 if (f.lvh and lead in ("I", "aVL", "V5", "V6")) else 1.0)  # strain
        signal[:, i] = p_amp * p_wave + qrs_gain * (1.1 * proj * r_wave - 0.25 * s_wave) + t_amp * t_wave
        if f.rhythm == "afib":  # fibrillatory baseline
            signal[:, i] += 0.05 * np.sin(2 * np.pi * rng.uniform(5, 7) * t + rng.uniform(0, 6))
    wander = rng.uniform(0.1, 0.4) * np.sin(2 * np.pi * rng.uniform(0.15, 0.4) * t + rng.uniform(0, 6))
    signal += wander[:, None] + rng.normal(0, 0.015, signal.shape)
    return signal, rate


def _write_ecg(rng: np.random.Generator, path: Path, subject: int, f: EcgFindings, when: dt.datetime) -> None:
    signal, _ = _synth_ecg(rng, f)
    if rng.random() < 0.03:  # real records carry NaN runs (digital -32768)
        start = int(rng.integers(0, signal.shape[0] - 200))
        signal[start:start + 200, int(rng.integers(0, 12))] = np.nan
    path.parent.mkdir(parents=True, exist_ok=True)
    wfdb.wrsamp(path.name, fs=ECG_RATE_HZ, units=["mV"] * 12, sig_name=list(MIMIC_ECG_LEADS), p_signal=signal,
                fmt=["16"] * 12, adc_gain=[200.0] * 12, baseline=[0] * 12, base_time=when.time(),
                base_date=when.date(), comments=[f"<subject_id>: {subject}"], write_dir=str(path.parent))


def ecg_statements(rng: np.random.Generator, f: EcgFindings) -> list[str]:
    rhythm = {"sinus": "Sinus rhythm", "brady": "Sinus bradycardia", "tachy": "Sinus tachycardia",
              "afib": str(rng.choice(["Atrial fibrillation", "Atrial fibrillation with rapid ventricular response"]))
              }[f.rhythm]
    lines = [rhythm]
    if f.lvh:
        lines += ["Left ventricular hypertrophy", "Inferior/lateral ST-T changes are probably due to ventricular hypertrophy"]
    normal = f.rhythm == "sinus" and not f.lvh
    lines.append("Normal ECG" if normal else ("Borderline ECG" if f.rhythm in ("brady", "tachy") and not f.lvh
                                              else "Abnormal ECG"))
    return lines


def _measurement_row(rng: np.random.Generator, subject, study, ecg_time: str, f: EcgFindings) -> tuple:
    statements = ecg_statements(rng, f)
    reports = [""] * 18
    slot = 0
    for line in statements:
        if slot == 2 and rng.random() < 0.3:
            slot += 1  # real report columns have gaps (report_2 blank, report_3 filled)
        reports[slot] = line
        slot += 1
    rr = int(60000 / {"sinus": 75, "brady": 50, "tachy": 120, "afib": 100}[f.rhythm] + rng.integers(-40, 40))
    no_p = f.rhythm == "afib"
    return (subject, study, int(rng.integers(6000, 9000)), ecg_time, *reports, "0.005-150 Hz",
            "60 Hz notch Baseline filter", rr, NO_ONSET_MS if no_p else 40, NO_ONSET_MS if no_p else 150, 200, 290, 600,
            NO_AXIS if no_p else int(rng.integers(0, 80)), int(rng.integers(-30, 90)), int(rng.integers(0, 90)))
