"""Shared by the fault suite (tests/test_faults*.py), the report it feeds (tests/reliability_report.py) and the
soak (benchmarks/soak.py): each case records what was expected and what was observed, side by side; the bad
samples of every decoding class that both inject."""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

RESULTS_ENV = "MORE_RELIABILITY_JSON"  # set by reliability_report.py: where the cases are appended


@dataclass
class Case:
    area: str  # "build" | "train" | "checkpoint" | "inputs"
    fault: str  # what was done
    expected: str  # the behaviour promised
    observed: str  # what happened, in the same words when it matches

    @property
    def matches(self) -> bool:
        return self.expected == self.observed


def record(area: str, fault: str, expected: str, observed: str) -> None:
    """Append a case to the results file (when the report asked for one), then assert it matched."""
    case = Case(area, fault, expected, observed)
    path = os.environ.get(RESULTS_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(asdict(case)) + "\n")
    assert case.matches, f"{fault}: expected {expected!r}, observed {observed!r}"


def read_cases(path: Path) -> list[Case]:
    return [Case(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


REPORT = b"Heart size is normal. No acute process."


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _jpeg_claiming(height: int, width: int) -> bytes:
    """A real 32 x 32 JPEG whose frame header (SOF0) claims another size."""
    data = bytearray(cv2.imencode(".jpg", np.full((32, 32), 128, np.uint8))[1].tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


BAD_SAMPLES = {  # key -> (members, the skip reason counted)
    "huge": ({"cxr.jpg": _jpeg_claiming(65000, 65000), "rad.txt": REPORT}, "error"),  # cv2.error
    "nested": ({"ecg.npy": _npy(np.zeros((12, 1000), np.float16)), "ecg.txt": REPORT,
                "meta.json": b"[" * 100_000 + b"]" * 100_000}, "RecursionError"),
    "structured": ({"ecg.npy": _npy(np.zeros((12, 1000), [("a", "f4"), ("b", "f4")])), "ecg.txt": REPORT},
                   "ValueError"),
    "complex": ({"ecg.npy": _npy(np.ones((12, 1000), np.complex64)), "ecg.txt": REPORT}, "ValueError"),
}
