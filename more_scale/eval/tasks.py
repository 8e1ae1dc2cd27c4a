"""Zero-shot tasks read from a YAML a clinician can edit (eval/tasks.yaml): the label each sample's
meta.json holds, and the prompt ensembles that stand for each answer."""

from __future__ import annotations

import ast
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from more_scale.data.reports import joined_report

DEFAULT_TASKS_FILE = Path(__file__).with_name("tasks.yaml")
KINDS = ("binary", "multilabel", "ordinal")


def expand(prompts) -> tuple[str, ...]:
    """A list of sentences, or a {template, slot: [values]} mapping expanded into every combination."""
    if isinstance(prompts, (list, tuple)):
        return tuple(str(p) for p in prompts)
    template, slots = prompts["template"], {k: v for k, v in prompts.items() if k != "template"}
    names = re.findall(r"{(\w+)}", template)
    sentences = []
    for values in itertools.product(*(slots[n] for n in names)):
        text = re.sub(r"\s+", " ", template.format(**dict(zip(names, values)))).strip()
        sentences.append(text[:1].upper() + text[1:])
    return tuple(dict.fromkeys(sentences))


def _lookup(meta: dict, field: str | list[str]):
    for name in ([field] if isinstance(field, str) else field):
        node = meta
        for part in name.split("."):
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                break
        if node is not None and node != "":
            return node
    return None


def _as_list(value) -> list[str]:
    """A label list from a list, or a string holding one ("['NORM', 'MI']", "NORM, MI", "CD;MI", "NORM")."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    text = str(value).strip()
    if text.startswith("["):
        try:
            return [str(v) for v in ast.literal_eval(text)]
        except (ValueError, SyntaxError):
            pass
    return [t.strip() for t in re.split(r"[,;]", text) if t.strip()]


@dataclass(frozen=True)
class Task:
    name: str
    modality: str  # cxr | ecg: which embedding is scored
    kind: str  # binary | multilabel | ordinal
    labels: dict  # how to read the label from meta.json (see tasks.yaml)
    answers: dict[str, tuple[str, ...]]  # answer -> prompt sentences: positive/negative, classes, or levels
    priority: tuple[str, ...] = ()  # multilabel: the order that picks one label per sample

    def prompts(self, answer: str) -> list[str]:
        """The answer's sentences as the text tower saw reports in training."""
        return [joined_report(p, "") if self.modality == "cxr" else joined_report("", p) for p in self.answers[answer]]

    def label(self, meta: dict):
        """binary: 1.0 / 0.0 / None (unknown: never a target); multilabel: the set of classes or None;
        ordinal: the level (int) or None."""
        value = _lookup(meta, self.labels["field"])
        if self.kind == "binary":
            if "contains" in self.labels:
                if value is None:
                    return None
                text = " ".join(_as_list(value) if not isinstance(value, str) else [value]).lower()
                return float(any(term.lower() in text for term in self.labels["contains"]))
            if value is None:  # blank: negative only where the sample has that label table at all
                field = self.labels["field"]
                parent = field.rpartition(".")[0] if isinstance(field, str) else ""
                labelled = not parent or isinstance(_lookup(meta, parent), dict)
                return 0.0 if self.labels.get("blank") == "negative" and labelled else None
            if value in self.labels.get("positive", [1.0]):
                return 1.0
            return 0.0 if value in self.labels.get("negative", [0.0]) else None
        if value is None:
            return None
        if self.kind == "multilabel":
            present = {c for c in _as_list(value) if c in self.answers}
            return present or None
        try:
            level = int(float(value))
        except (TypeError, ValueError):
            return None
        return level if str(level) in self.answers else None


def load_tasks(path: str | Path | None = None) -> list[Task]:
    """Every task of a tasks YAML (default: the shipped eval/tasks.yaml); errors name the task and field."""
    path = Path(path) if path else DEFAULT_TASKS_FILE
    tree = yaml.safe_load(path.read_text())
    tasks = []
    for modality in ("cxr", "ecg"):
        for name, spec in (tree.get(modality) or {}).items():
            where = f"{path}: {modality}.{name}"
            kind = spec.get("kind", "binary")
            if kind not in KINDS:
                raise ValueError(f"{where}: kind {kind!r}, expected one of {KINDS}")
            if "labels" not in spec or "field" not in spec["labels"]:
                raise ValueError(f"{where}: needs labels: {{field: ...}}")
            if kind == "binary":
                answers = {"positive": expand(spec["positive"]), "negative": expand(spec["negative"])}
            elif kind == "multilabel":
                answers = {str(c): expand(p) for c, p in spec["classes"].items()}
            else:
                answers = {str(level): expand(p) for level, p in spec["levels"].items()}
            empty = [a for a, p in answers.items() if not p]
            if empty:
                raise ValueError(f"{where}: no prompts for {empty}")
            priority = tuple(spec.get("priority", ()))
            unknown = [c for c in priority if c not in answers]
            if unknown:
                raise ValueError(f"{where}: priority names classes without prompts: {unknown}")
            tasks.append(Task(name, modality, kind, dict(spec["labels"]), answers, priority))
    return tasks
