"""Zero-shot tasks: labels read from a sample's meta.json, prompt ensembles in the report format."""

from __future__ import annotations

from dataclasses import dataclass

from more_scale.data.reports import joined_report


@dataclass(frozen=True)
class ZeroShotTask:
    name: str
    modality: str  # which embedding is scored: cxr | ecg
    positive: tuple[str, ...]  # report phrases meaning "present" (averaged: a prompt ensemble)
    negative: tuple[str, ...]

    def prompts(self, phrases: tuple[str, ...]) -> list[str]:
        return [joined_report(p, "") if self.modality == "cxr" else joined_report("", p) for p in phrases]

    def label(self, meta: dict) -> float | None:
        """1/0, or None when unknown (CheXpert blank or uncertain -1: never a target)."""
        if self.modality == "cxr":
            value = meta.get("chexpert", {}).get(self.name)
            return value if value in (0.0, 1.0) else None
        statements = " ".join(meta.get("ecg_statements", [])).lower()
        return float(self.name.lower() in statements)


CHEXPERT_TASKS = (
    ZeroShotTask("Cardiomegaly", "cxr",
                 ("The heart is mildly enlarged.", "The heart is moderately enlarged.", "Cardiomegaly."),
                 ("Heart size is normal.", "The cardiac silhouette is within normal limits.")),
    ZeroShotTask("Pleural Effusion", "cxr",
                 ("There is a small left pleural effusion.", "Right pleural effusion.", "Bilateral pleural effusions."),
                 ("No pleural effusion.", "There is no pleural effusion or pneumothorax.")),
    ZeroShotTask("Edema", "cxr",
                 ("Mild pulmonary edema.", "Moderate pulmonary edema with vascular congestion.", "Pulmonary edema."),
                 ("No pulmonary edema.", "The lungs are clear without edema.")),
)
ECG_STATEMENT_TASKS = (
    ZeroShotTask("Atrial fibrillation", "ecg", ("Atrial fibrillation. Abnormal ECG.",),
                 ("Sinus rhythm. Normal ECG.", "Sinus rhythm.")),
    ZeroShotTask("Sinus bradycardia", "ecg", ("Sinus bradycardia. Borderline ECG.", "Sinus bradycardia."),
                 ("Sinus rhythm. Normal ECG.", "Sinus tachycardia.")),
    ZeroShotTask("Sinus tachycardia", "ecg", ("Sinus tachycardia. Borderline ECG.", "Sinus tachycardia."),
                 ("Sinus rhythm. Normal ECG.", "Sinus bradycardia.")),
    ZeroShotTask("Left ventricular hypertrophy", "ecg",
                 ("Left ventricular hypertrophy. Abnormal ECG.",), ("Sinus rhythm. Normal ECG.",)),
)
DEFAULT_TASKS = CHEXPERT_TASKS + ECG_STATEMENT_TASKS
