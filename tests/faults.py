"""Shared by the fault suite (tests/test_faults*.py) and the report it feeds (tests/reliability_report.py):
each case records what was expected and what was observed, side by side."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

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
