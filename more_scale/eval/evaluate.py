"""evaluate(run, shards) -> results dict: zero-shot AUROC per task and retrieval recall@K."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from more_scale.config import input_shape
from more_scale.eval.embed import embed, embed_texts, load_trained
from more_scale.eval.metrics import retrieval, zero_shot
from more_scale.eval.tasks import DEFAULT_TASKS

RETRIEVAL_PAIRS = (("text", "cxr"), ("text", "ecg"), ("cxr", "ecg"))


def evaluate(run_dir: str | Path, shards: str | Path, out_dir: str | Path, tasks=DEFAULT_TASKS) -> dict:
    model, cfg, tokenizer = load_trained(run_dir)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    emb = embed(model, shards, cfg.data, input_shape(cfg.model), tokenizer)
    results = {"run": str(run_dir), "shards": str(shards), "samples": len(emb.keys), "zero_shot": {}, "retrieval": {}}
    for task in tasks:
        pos = embed_texts(model, tokenizer, task.prompts(task.positive), cfg.data.max_text_tokens)
        neg = embed_texts(model, tokenizer, task.prompts(task.negative), cfg.data.max_text_tokens)
        results["zero_shot"][task.name] = {"modality": task.modality, **zero_shot(emb, task, pos, neg)}
    for query, gallery in RETRIEVAL_PAIRS:
        results["retrieval"][f"{query}->{gallery}"] = retrieval(emb, query, gallery)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out_dir / "results.json")
    return results


def print_results(results: dict, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"zero-shot AUROC ({results['samples']} samples of {results['shards']})")
    for column in ("task", "modality", "n (pos)", "AUROC", "chance"):
        table.add_column(column, justify="right" if column != "task" else "left")
    for name, r in results["zero_shot"].items():
        table.add_row(name, r["modality"], f"{r['n']} ({r['n_positive']})", _fmt(r["auroc"]), _fmt(r["chance_auroc"]))
    console.print(table)
    table = Table(title="retrieval recall@K (own pair among all test pairs)")
    table.add_column("query->gallery")
    table.add_column("n", justify="right")
    for k in (1, 5, 10):
        table.add_column(f"R@{k}", justify="right")
        table.add_column(f"chance R@{k}", justify="right")
    for name, r in results["retrieval"].items():
        table.add_row(name, str(r["n"]), *[_fmt(r.get(f"{p}R@{k}")) for k in (1, 5, 10) for p in ("", "chance_")])
    console.print(table)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"
