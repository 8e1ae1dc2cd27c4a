"""Supervised fine-tuning as the MoRE reference does it (multimodal_infer.py): the pretrained tower and its
projection head, dropout and a new linear layer; the last blocks' qkv weights, the head and the new layer train
with BCE; uncertain labels are left out; the epoch with the best validation macro AUROC is kept, training stops
when the validation loss has not improved for `patience` epochs; the test split is scored by macro AUROC and mAP.

  finetune(run, Splits(train, validate, test), out, FinetuneConfig(...)) -> results.json, predictions.csv,
  classifier.safetensors, finetune.png
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import os
import typing
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import save_file
from sklearn.metrics import average_precision_score, roc_auc_score

from more_scale.config import ConfigError, apply_overrides, build_section, input_shape
from more_scale.data.pipeline import ModelInputs
from more_scale.eval.embed import load_trained
from more_scale.eval.finetune_data import LabelledSet, Targets
from more_scale.eval.metrics import binary_metrics
from more_scale.eval.tasks import load_tasks
from more_scale.models.more import MoRE
from more_scale.train.checkpoint import latest_tag, trained_from
from more_scale.train.engine import engine_device

BLOCK_PARAMS = ("qkv.weight", "all")


@dataclass(frozen=True)
class FinetuneConfig:
    """Defaults are the reference's (multimodal_infer.py, line numbers in the comments)."""
    # tasks-file names; the reference's 4 of its CSV's 13 CheXpert columns (:27, utils/create_dataset.py:557)
    targets: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Edema", "Pleural Effusion")
    tasks: str = ""  # the tasks file whose label rules read the targets; "" = the shipped eval/tasks.yaml
    epochs: int = 20  # at most (:102)
    batch_size: int = 64  # (:45)
    lr: float = 3e-5  # AdamW (:105)
    weight_decay: float = 0.02  # on every trained parameter (:105)
    restart_epochs: int = 5  # SGDR: cosine from lr to min_lr over this many epochs, then again (:107, T_0=5)
    min_lr: float = 3e-6  # (:107, eta_min)
    patience: int = 3  # stop after this many epochs without a lower validation loss (:111)
    blocks: int = 3  # the last blocks of the tower that train (:80-84, blocks[9:] of 12; head and layer :94-99)
    block_params: str = "qkv.weight"  # which of their weights: qkv.weight (the reference) | all
    drop_key: float = 0.2  # DropKey in the first block, linear to 0 in the last (:69-76); no DropToken
    dropout: float = 0.1  # before the new linear layer (:59)
    label_fraction: float = 1.0  # share of the labelled training rows used (:36, the paper's 1/10/100%)
    augment: bool = True  # the pretraining run's data augmentations on training batches
    seed: int = 0  # label subset, shuffling, augmentation, the new layer's init, dropout and DropKey
    workers: int = 2  # loader processes


def load_finetune_config(overrides: typing.Sequence[str] = ()) -> FinetuneConfig:
    """Defaults < `key=value` overrides (`epochs=5`, `targets=[Edema]`), checked; errors name the key."""
    cfg = build_section(FinetuneConfig, apply_overrides({}, overrides), "")
    problems = [
        (cfg.targets, "targets must name at least one task"),
        (cfg.epochs >= 1, f"epochs must be >= 1, got {cfg.epochs}"),
        (cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}"),
        (cfg.lr > 0, f"lr must be > 0, got {cfg.lr}"),
        (0 <= cfg.min_lr <= cfg.lr, f"min_lr ({cfg.min_lr}) must be in [0, lr ({cfg.lr})]"),
        (cfg.weight_decay >= 0, f"weight_decay must be >= 0, got {cfg.weight_decay}"),
        (cfg.restart_epochs >= 1, f"restart_epochs must be >= 1, got {cfg.restart_epochs}"),
        (cfg.patience >= 1, f"patience must be >= 1, got {cfg.patience}"),
        (cfg.blocks >= 0, f"blocks must be >= 0, got {cfg.blocks}"),
        (cfg.block_params in BLOCK_PARAMS, f"block_params must be one of {BLOCK_PARAMS}, got {cfg.block_params!r}"),
        (0 <= cfg.drop_key < 1, f"drop_key must be in [0, 1), got {cfg.drop_key}"),
        (0 <= cfg.dropout < 1, f"dropout must be in [0, 1), got {cfg.dropout}"),
        (0 < cfg.label_fraction <= 1, f"label_fraction must be in (0, 1], got {cfg.label_fraction}"),
        (cfg.workers >= 0, f"workers must be >= 0, got {cfg.workers}"),
    ]
    for ok, message in problems:
        if not ok:
            raise ConfigError(message)
    return cfg


@dataclass(frozen=True)
class Splits:
    """The three shard directories (folders or s3:// prefixes)."""
    train: str
    validate: str
    test: str


class Classifier(nn.Module):
    """A trained MoRE reduced to one tower and its projection head, then dropout and a new linear layer with one
    logit per target column: the reference's XrayModel (multimodal_infer.py:53-66)."""

    def __init__(self, more: MoRE, modality: str, embed_dim: int, columns: int, dropout: float):
        super().__init__()
        more.encoders = nn.ModuleDict({modality: more.encoders[modality]})
        more.heads = nn.ModuleDict({modality: more.heads[modality]})
        self.more, self.modality = more, modality
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(embed_dim, columns)

    @property
    def tower(self) -> nn.Module:
        return self.more.encoders[self.modality]

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:  # (B, ...) -> (B, columns) logits
        return self.fc(self.dropout(self.more.project(self.modality, inputs).float()))


def prepare(model: Classifier, cfg: FinetuneConfig) -> list[str]:
    """Freeze all but the last `cfg.blocks` blocks' chosen weights, the projection head and the new layer; set the
    fine-tuning DropKey schedule and switch DropToken off. Returns the trained parameters' names."""
    blocks = model.tower.blocks
    if cfg.blocks > len(blocks):
        raise ConfigError(f"blocks={cfg.blocks}, but the trained {model.modality} tower has {len(blocks)} blocks")
    for p in model.parameters():
        p.requires_grad = False
    for block in blocks[len(blocks) - cfg.blocks:]:
        for name, p in block.named_parameters():
            p.requires_grad = cfg.block_params == "all" or name.endswith(cfg.block_params)
    for p in [*model.more.heads.parameters(), *model.fc.parameters()]:
        p.requires_grad = True
    for i, block in enumerate(blocks):
        block.attn.drop_key = cfg.drop_key * (1 - i / max(1, len(blocks) - 1))
    model.tower.keep = 1.0  # DropToken saves pretraining compute; the reference fine-tunes on every patch
    return [name for name, p in model.named_parameters() if p.requires_grad]


@dataclass
class Pass:
    """One pass over a split: mean BCE, sigmoid probabilities and labels of the samples that decoded."""
    loss: float
    probs: np.ndarray  # (N, columns)
    labels: np.ndarray  # (N, columns)
    rows: list[int]
    skipped: Counter


def run_pass(model: Classifier, data: LabelledSet, cfg: FinetuneConfig, device: torch.device, progress: Progress,
             title: str, epoch: int = 0, optimizer: torch.optim.Optimizer | None = None) -> Pass:
    """Train (with `optimizer`) or score one pass, shown as a bar of `progress`. Losses and probabilities stay on the
    device until the end: no host-device sync per batch."""
    training = optimizer is not None
    model.train(training)
    criterion = nn.BCEWithLogitsLoss(reduction="sum")
    total, probs, labels, rows, skipped = torch.zeros((), device=device), [], [], [], Counter()
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")
    loader = data.loader(cfg.batch_size, cfg.workers, shuffle=training, epoch=epoch, pin_memory=device.type == "cuda")
    bar = progress.add_task(title, total=len(loader))
    with torch.set_grad_enabled(training):
        for batch in progress.track(loader, task_id=bar):
            skipped += batch.skipped
            if batch.inputs is None:
                continue
            x, y = batch.inputs.to(device, non_blocking=True), batch.labels.to(device, non_blocking=True)
            with autocast:
                logits = model(x)
            loss = criterion(logits.float(), y)
            if training:
                optimizer.zero_grad(set_to_none=True)
                (loss / (len(y) * y.shape[1])).backward()  # the reference's mean BCE per batch
                optimizer.step()
            total += loss.detach()
            probs.append(torch.sigmoid(logits.detach().float()))
            labels.append(y)
            rows += batch.rows
    progress.remove_task(bar)
    columns = len(data.targets.columns)
    probs_np = torch.cat(probs).cpu().numpy() if probs else np.zeros((0, columns), np.float32)
    labels_np = torch.cat(labels).cpu().numpy() if labels else np.zeros((0, columns), np.float32)
    return Pass(float(total) / max(1, labels_np.size), probs_np, labels_np, rows, skipped)


def scored_columns(labels: np.ndarray) -> list[int]:
    """Columns with positives and negatives: the only ones an AUROC exists for."""
    return [c for c in range(labels.shape[1]) if 0 < labels[:, c].sum() < len(labels)]


def macro_auroc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    scored = scored_columns(labels)
    return float(np.mean([roc_auc_score(labels[:, c], probs[:, c]) for c in scored])) if scored else None


def column_metrics(columns: tuple[str, ...], labels: np.ndarray, probs: np.ndarray) -> dict:
    """Per column AUROC and AUPRC with 95% intervals beside chance; their macro means (mAP: the mean average
    precision, the reference's calculate_multilabel_map); the reference's micro AUROC (every column's scores as
    one ranking) and prevalence-weighted AUPRC (utils/metrics.py, multimodal_infer.py:240-242)."""
    scored = scored_columns(labels)
    per = {columns[c]: {"n_positive": int(labels[:, c].sum()), **binary_metrics(labels[:, c], probs[:, c])}
           for c in scored}
    out = {"n": int(len(labels)), "classes": per,
           "unscored": [columns[c] for c in range(len(columns)) if c not in scored]}
    if scored:
        out.update(macro_auroc=float(np.mean([r["auroc"] for r in per.values()])),
                   chance_macro_auroc=float(np.mean([r["chance_auroc"] for r in per.values()])),
                   map=float(np.mean([r["auprc"] for r in per.values()])),
                   chance_map=float(np.mean([r["chance_auprc"] for r in per.values()])),
                   micro_auroc=float(roc_auc_score(labels[:, scored].ravel(), probs[:, scored].ravel())),
                   weighted_auprc=float(average_precision_score(labels[:, scored], probs[:, scored], average="weighted")))
    return out


class EarlyStop:
    """True once the validation loss has gone `patience` epochs above its minimum (the reference's EarlyStopping,
    utils/metrics.py:148-165: a tie with the minimum starts the count again)."""

    def __init__(self, patience: int):
        self.patience, self.best, self.waited = patience, float("inf"), 0

    def __call__(self, loss: float) -> bool:
        if loss <= self.best:
            self.best, self.waited = loss, 0
        else:
            self.waited += 1
        return self.waited >= self.patience


def finetune(run_dir: str | Path, splits: Splits, out_dir: str | Path, cfg: FinetuneConfig) -> dict:
    """Fine-tune a trained run on labelled splits and score the test split; writes OUT/results.json (history, test
    metrics, samples kept and left out by reason), OUT/predictions.csv, OUT/classifier.safetensors, OUT/finetune.png."""
    from more_scale.eval.figures import finetune_curves

    out_dir = Path(out_dir)
    targets = Targets.of(load_tasks(cfg.tasks or None), cfg.targets)  # a bad target fails before anything loads
    more, run_cfg, _ = load_trained(run_dir)
    shape = input_shape(run_cfg.model)
    sets = {name: LabelledSet(getattr(splits, name),
                              targets, ModelInputs(run_cfg.data, shape, augment=name == "train" and cfg.augment),
                              cfg.seed, cfg.label_fraction if name == "train" else 1.0)
            for name in ("train", "validate", "test")}
    for name, data in sets.items():
        if not len(data):
            raise ValueError(f"{getattr(splits, name)}: no sample with a {targets.modality} input and every target "
                             f"label known ({', '.join(targets.columns)}); left out: {dict(data.dropped)}")
    if not scored_columns(sets["train"].labels):
        raise ValueError(f"{splits.train}: no target column has both positives and negatives to learn from")
    torch.manual_seed(cfg.seed)
    model = Classifier(more, targets.modality, run_cfg.model.embed_dim, len(targets.columns), cfg.dropout)
    trained = prepare(model, cfg)
    device = engine_device()
    model.to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay, fused=True)
    # stepped once per epoch, as the reference: the LR is constant within an epoch
    schedule = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=cfg.restart_epochs,
                                                                    eta_min=cfg.min_lr)
    history, best, best_state, stop, skipped = [], None, None, EarlyStop(cfg.patience), Counter()
    print(f"fine-tuning the {targets.modality} tower: {len(trained)} tensors train "
          f"({sum(p.numel() for p in model.parameters() if p.requires_grad):,} parameters); samples train "
          f"{len(sets['train'])}, validate {len(sets['validate'])}, test {len(sets['test'])}", flush=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as progress:
        for epoch in range(cfg.epochs):
            lr = optimizer.param_groups[0]["lr"]
            title = f"epoch {epoch + 1}/{cfg.epochs}"
            train = run_pass(model, sets["train"], cfg, device, progress, f"{title} train", epoch, optimizer)
            schedule.step()
            val = run_pass(model, sets["validate"], cfg, device, progress, f"{title} validate")
            skipped += train.skipped + val.skipped
            entry = {"epoch": epoch + 1, "lr": lr, "train_loss": train.loss, "val_loss": val.loss,
                     "val_macro_auroc": macro_auroc(val.labels, val.probs)}
            history.append(entry)
            progress.console.print(f"epoch {epoch + 1}: train loss {train.loss:.4f}, validation loss {val.loss:.4f}, "
                                   f"macro AUROC {_fmt(entry['val_macro_auroc'])}, lr {lr:.2e}", soft_wrap=True)
            # the best epoch by validation macro AUROC; by lower loss where the validation split scores no column
            score = entry["val_macro_auroc"] if entry["val_macro_auroc"] is not None else -val.loss
            if best is None or score > best[0]:
                best, best_state = (score, epoch + 1), copy.deepcopy(model.state_dict())
            if stop(val.loss):
                progress.console.print(f"stopped: validation loss above its minimum {stop.best:.4f} for "
                                       f"{cfg.patience} epochs", soft_wrap=True)
                break
        model.load_state_dict(best_state)
        test = run_pass(model, sets["test"], cfg, device, progress, "test")
    skipped += test.skipped
    results = {
        "run": str(run_dir), "provenance": {**trained_from(run_dir, latest_tag(run_dir)),
                                            "finetuned": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")},
        "splits": {k: str(v) for k, v in dataclasses.asdict(splits).items()},
        "config": dataclasses.asdict(cfg), "modality": targets.modality, "columns": list(targets.columns),
        "samples": {name: len(data) for name, data in sets.items()},
        "left_out": {name: dict(data.dropped) for name, data in sets.items()}, "skipped": dict(skipped),
        "trained_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "trained_names": trained, "history": history, "best_epoch": best[1],
        "stopped_early": len(history) < cfg.epochs, "test": column_metrics(targets.columns, test.labels, test.probs),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_predictions(out_dir / "predictions.csv", sets["test"], test, targets.columns)
    tmp = out_dir / "classifier.safetensors.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp),
              metadata={"columns": json.dumps(targets.columns), "modality": targets.modality})
    os.replace(tmp, out_dir / "classifier.safetensors")
    results["figure"] = str(finetune_curves(results, out_dir / "finetune.png"))
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out_dir / "results.json")
    return results


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _write_predictions(path: Path, data: LabelledSet, scored: Pass, columns: tuple[str, ...]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", *(f"label {c}" for c in columns), *(f"prob {c}" for c in columns)])
        for row, y, p in zip(scored.rows, scored.labels, scored.probs):
            writer.writerow([data.key(row), *(int(v) for v in y), *(f"{v:.6f}" for v in p)])
    os.replace(tmp, path)
