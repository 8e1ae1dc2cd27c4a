"""Report text: MIMIC-CXR section parsing, ECG statements, the joined model input, and the MoRE reference's
cleanups (`build_shards.py --reports reference`)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from types import MappingProxyType

# The official MIMIC-CXR parser's header pattern: newline, one space, capitals, colon.
_HEADER = re.compile(r"\n\s?([A-Z][A-Z ()/,-]*):\s", re.MULTILINE)
_ALIASES = MappingProxyType({"CONCLUSION": "IMPRESSION", "CONCLUSIONS": "IMPRESSION", "SUMMARY": "IMPRESSION",
            "FINDINGS AND IMPRESSION": "IMPRESSION", "IMPRESSIONS": "IMPRESSION", "FINDING": "FINDINGS"})


# preprocessing/preprocess_notes.py of the reference: its clock-time pattern and its sentence splitter
_CLOCK_TIME = re.compile(r"\d{1,2}:\d{2}(?:\s?[ap]\.?m\.?)?|\d{1,2}\s?[ap]\.?m\.?")
_SENTENCE_BREAK = re.compile(r"(?<!\w\.\w.)(?<![A-Z][a-z]\.)(?<=\.|\?)\s")
# ... the CheXpert labels its label sentence names, in its order (Support Devices is not among them)
REFERENCE_LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
                    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
                    "Pneumothorax")
REFERENCE_ECG_STATEMENTS = 7  # the reference joins report_0 .. report_6 of machine_measurements.csv
MISSING_ECG_NOTE = "ECG note not available."  # what the reference writes for a paired ECG without statements


def clean(text: str) -> str:
    """Drop de-identification blanks and collapse whitespace."""
    return re.sub(r"\s+", " ", re.sub(r"_{2,}", " ", text)).strip()


def radiology_sections(text: str) -> dict[str, str]:
    """{"PREAMBLE": ..., "FINDINGS": ..., "IMPRESSION": ..., ...} from a MIMIC-CXR report file."""
    text = "\n" + text.replace("FINAL REPORT", "", 1)
    sections, matches = {}, list(_HEADER.finditer(text))
    sections["PREAMBLE"] = text[: matches[0].start()] if matches else text
    for match, following in zip(matches, matches[1:] + [None]):
        name = _ALIASES.get(match.group(1).strip(), match.group(1).strip())
        body = text[match.end(): following.start() if following else len(text)]
        sections[name] = (sections.get(name, "") + " " + body).strip()
    return {name: clean(body) for name, body in sections.items()}


def radiology_text(text: str) -> str:
    """FINDINGS + IMPRESSION; the whole cleaned report when neither section exists."""
    sections = radiology_sections(text)
    parts = [sections[s] for s in ("FINDINGS", "IMPRESSION") if sections.get(s)]
    return " ".join(parts) if parts else clean(text.replace("FINAL REPORT", "", 1))


def ecg_text(statements) -> str:
    """Machine statements (report_0..report_17, gaps allowed) -> one sentence list."""
    lines = [clean(str(s)) for s in statements if isinstance(s, str) and s.strip()]
    return ". ".join(line.rstrip(".") for line in lines) + ("." if lines else "")


def joined_report(radiology: str, ecg: str) -> str:
    """The single text-tower input of MoRE; a missing part is left out."""
    parts = []
    if radiology:
        parts.append(f"The report from Xray is: {radiology}")
    if ecg:
        parts.append(f"The report from ECG is: {ecg}")
    return " ".join(parts)


def tokenize_reports(tokenizer, pairs: Sequence[tuple[str, str]], pairing: str, max_tokens: int):
    """(radiology report, ECG report) per sample, either may be "" -> the text tower's tokens, padded to the
    longest. `joined`: one string, right-truncated; `pair`: the two framed reports as a tokenizer pair, the
    longer cut first (data.text_pairing). Training batches, evaluation's prompts and inference's queries all
    go through here, so a prompt reaches the tower framed as the training reports were."""
    if pairing == "pair":
        return tokenizer([joined_report(r, "") for r, _ in pairs], [joined_report("", e) for _, e in pairs],
                         padding="longest", truncation="longest_first", max_length=max_tokens, return_tensors="pt")
    return tokenizer([joined_report(r, e) for r, e in pairs], padding="longest", truncation=True,
                     max_length=max_tokens, return_tensors="pt")


def drop_clock_time_sentences(text: str) -> str:
    """The reference's cleanup: every sentence that holds a clock time ("at 10:45", "3 pm") is dropped (they
    report when a finding was phoned through, not the film)."""
    return " ".join(s for s in _SENTENCE_BREAK.split(text) if not _CLOCK_TIME.search(s))


def chexpert_sentence(labels: dict) -> str:
    """The reference's stand-in for an empty X-ray report, from the study's CheXpert labels (1 present,
    -1 uncertain): "Cardiomegaly, Edema is present. uncertain finding of Atelectasis"."""
    present = [name for name in REFERENCE_LABELS if labels.get(name) == 1.0]
    uncertain = [name for name in REFERENCE_LABELS if labels.get(name) == -1.0]
    parts = ([", ".join(present) + " is present"] if present else []) + \
        (["uncertain finding of " + ", ".join(uncertain)] if uncertain else [])
    return ". ".join(parts)
