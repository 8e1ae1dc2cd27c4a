"""Report text: MIMIC-CXR section parsing, ECG statements, the joined model input."""

from __future__ import annotations

import re
from types import MappingProxyType

# The official MIMIC-CXR parser's header pattern: newline, one space, capitals, colon.
_HEADER = re.compile(r"\n\s?([A-Z][A-Z ()/,-]*):\s", re.MULTILINE)
_ALIASES = MappingProxyType({"CONCLUSION": "IMPRESSION", "CONCLUSIONS": "IMPRESSION", "SUMMARY": "IMPRESSION",
            "FINDINGS AND IMPRESSION": "IMPRESSION", "IMPRESSIONS": "IMPRESSION", "FINDING": "FINDINGS"})


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
