"""Zero-shot tasks read from a YAML a clinician can edit (eval/tasks.yaml): the label each sample's
meta.json holds, and the prompt ensembles that stand for each answer."""

from __future__ import annotations

import ast
import difflib
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

DEFAULT_TASKS_FILE = Path(__file__).with_name("tasks.yaml")
SHIPPED_TASKS = {"default": DEFAULT_TASKS_FILE, "reference": Path(__file__).with_name("tasks_reference.yaml")}
KINDS = ("binary", "multilabel", "ordinal")
SCORES = ("centroid", "max")  # binary tasks: see tasks.yaml's header
ANSWER_KEYS = {"binary": ("positive", "negative"), "multilabel": ("classes",), "ordinal": ("levels",)}


class TasksError(ValueError):
    """A tasks file that cannot be scored as written; the message names the file, the task and the field."""


def expand(prompts) -> tuple[str, ...]:
    """A list of sentences, or a {template, slot: [values]} mapping expanded into every combination."""
    if isinstance(prompts, (list, tuple)):
        return tuple(str(p) for p in prompts)
    if not isinstance(prompts, dict) or not isinstance(prompts.get("template"), str):
        raise TasksError(f"prompts must be a list of sentences or a {{template: ..., slot: [values]}} mapping, "
                         f"got {prompts!r:.80}")
    template, slots = prompts["template"], {k: v for k, v in prompts.items() if k != "template"}
    names = re.findall(r"{(\w+)}", template)
    missing = [n for n in names if not isinstance(slots.get(n), list)]
    if missing:
        raise TasksError(f"template {template!r} names slots without a list of values: {missing}")
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
    score: str = "centroid"  # binary: centroid (positive minus negative mean prompt) | max (the highest positive prompt)

    def prompts(self, answer: str) -> list[tuple[str, str]]:
        """The answer's sentences as (radiology, ECG report) pairs: the report of this task's modality."""
        return [(p, "") if self.modality == "cxr" else ("", p) for p in self.answers[answer]]

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
    """Every task of a tasks YAML (default: the shipped eval/tasks.yaml; `reference`: the MoRE reference's X-ray
    protocol, eval/tasks_reference.yaml); TasksError names the file, task and field."""
    path = SHIPPED_TASKS.get(str(path), Path(path)) if path else DEFAULT_TASKS_FILE
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise TasksError(f"tasks file {path}: {error.strerror or error}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise TasksError(f"tasks file {path} is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(tree, dict) or not set(tree) & {"cxr", "ecg"}:
        raise TasksError(f"tasks file {path} holds no tasks: expected top-level cxr: and/or ecg: mappings of "
                         "task name -> {labels, prompts} (see the shipped more_scale/eval/tasks.yaml)")
    unknown = sorted(set(tree) - {"cxr", "ecg"})
    if unknown:
        raise TasksError(f"tasks file {path}: unknown top-level keys {unknown} (expected cxr and ecg)")
    tasks = []
    for modality in ("cxr", "ecg"):
        group = tree.get(modality) or {}
        if not isinstance(group, dict):
            raise TasksError(f"tasks file {path}: {modality} must map task names to tasks, got {type(group).__name__}")
        for name, spec in group.items():
            where = f"tasks file {path}: {modality}.{name}"
            try:
                tasks.append(_task(str(name), modality, spec))
            except TasksError as error:
                raise TasksError(f"{where}: {error}") from None
    if not tasks:
        raise TasksError(f"tasks file {path} holds no tasks under cxr: or ecg:")
    return tasks


def _task(name: str, modality: str, spec) -> Task:
    if not isinstance(spec, dict):
        raise TasksError(f"expected a mapping (kind, labels, prompts), got {type(spec).__name__}")
    kind = spec.get("kind", "binary")
    if kind not in KINDS:
        raise TasksError(f"kind {kind!r}, expected one of {KINDS}")
    labels = spec.get("labels")
    if not isinstance(labels, dict) or not isinstance(labels.get("field"), (str, list)) or not labels["field"]:
        raise TasksError("needs labels: {field: NAME} (a meta.json field, dotted for nested ones, or a list of them)")
    missing = [key for key in ANSWER_KEYS[kind] if not spec.get(key)]
    if missing:
        raise TasksError(f"a {kind} task needs prompts under {list(ANSWER_KEYS[kind])}; missing or empty: {missing}")
    score, rule = "centroid", spec.get("score", {})
    if kind == "binary":
        answers = {"positive": expand(spec["positive"]), "negative": expand(spec["negative"])}
        score, answers["positive"] = _score_rule(rule, answers["positive"])
    elif rule:
        raise TasksError(f"score applies to binary tasks only, not {kind}")
    else:
        table = spec[ANSWER_KEYS[kind][0]]
        if not isinstance(table, dict):
            raise TasksError(f"{ANSWER_KEYS[kind][0]} must map each answer to its prompts, got {type(table).__name__}")
        answers = {str(answer): expand(prompts) for answer, prompts in table.items()}
    empty = [a for a, p in answers.items() if not p]
    if empty:
        raise TasksError(f"no prompts for {empty}")
    priority = tuple(spec.get("priority", ()))
    unknown = [c for c in priority if c not in answers]
    if unknown:
        raise TasksError(f"priority names classes without prompts: {unknown}")
    return Task(name, modality, kind, dict(labels), answers, priority, score)


def _score_rule(rule, positives: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """score: {method: centroid | max, sample: K, seed: S}: `sample` keeps K of the positive prompts, drawn
    with numpy's generator seeded S (the reference draws 5 with Python's unseeded random.sample)."""
    if not isinstance(rule, dict) or set(rule) - {"method", "sample", "seed"}:
        raise TasksError(f"score must be a mapping of method, sample, seed, got {rule!r:.80}")
    method = rule.get("method", "centroid")
    if method not in SCORES:
        raise TasksError(f"score.method {method!r}, expected one of {SCORES}")
    sample = rule.get("sample", 0)
    if not isinstance(sample, int) or not 0 <= sample <= len(positives):
        raise TasksError(f"score.sample must be an integer from 0 (all) to the {len(positives)} positive prompts, "
                         f"got {sample!r}")
    if sample:
        keep = np.random.default_rng(int(rule.get("seed", 0))).choice(len(positives), sample, replace=False)
        positives = tuple(positives[i] for i in sorted(keep))
    return method, positives


def check_fields(tasks: list[Task], metas: list[dict], shards: str | Path, tasks_file: str | Path | None) -> None:
    """Refuse a task whose labels would all come from the blank rule: its field is in no sample's meta.json
    although labels are drawn (a misspelt column reads as all negative). A task whose label table is absent
    altogether (a PTB-XL task on MIMIC shards) has no labels here and is reported as such, not refused."""
    for task in tasks:
        names = [task.labels["field"]] if isinstance(task.labels["field"], str) else task.labels["field"]
        if any(_holds(m, name) for m in metas for name in names):  # present, if only blank (CheXpert's unmentioned)
            continue
        if any(task.label(m) is not None for m in metas):
            fields = sorted({key for m in metas for key in _dotted_keys(m)})
            near = difflib.get_close_matches(names[0], fields, n=3)
            raise TasksError(f"tasks file {tasks_file or DEFAULT_TASKS_FILE}: {task.modality}.{task.name}: labels.field "
                             f"{task.labels['field']!r} is in no sample's meta.json of {shards}, so every label would "
                             "be a blank read as negative; " + (f"did you mean {' or '.join(near)}?" if near else
                                                                f"fields there: {', '.join(fields[:40])}"))


def _holds(meta: dict, field: str) -> bool:
    node = meta
    for part in field.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _dotted_keys(meta: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in meta.items():
        keys += _dotted_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return keys
