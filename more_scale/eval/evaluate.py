"""evaluate(run, shards) -> results.json, figures/*.png and report.html: zero-shot (binary, multi-label,
ordinal) with AUROC/AUPRC, retrieval in four directions with recall@K and median rank, linear probes at
1/10/100% of the labels, ROC curves, t-SNE, a retrieval grid, training curves and relevance maps. Every
metric sits beside its chance baseline."""

from __future__ import annotations

import base64
import html
import json
import os
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from more_scale import dist
from more_scale.config import input_shape
from more_scale.data import ecg
from more_scale.data.build import read_index
from more_scale.data.pipeline import iter_batches, stored_sample
from more_scale.eval import figures
from more_scale.eval.embed import embed, embed_texts, load_trained
from more_scale.eval.explain import SANITY_MAX_RANK_CORRELATION, cxr_relevance, ecg_relevance
from more_scale.eval.metrics import MIN_CLASS_FOR_INTERVAL, linear_probe, retrieval, zero_shot
from more_scale.eval.tasks import Task, check_fields, load_tasks
from more_scale.train.checkpoint import latest_tag, trained_from
from more_scale.train.engine import engine_device

RETRIEVAL_PAIRS = (("text", "cxr"), ("text", "ecg"), ("cxr", "ecg"), ("ecg", "cxr"))
EXPLAINED = 4  # X-rays (half positive, half negative where there are) and one ECG with relevance maps


def evaluate(run_dir: str | Path, shards: str | Path, out_dir: str | Path, tasks_file: str | Path | None = None,
             train_shards: str | Path | None = None, pictures: bool = True) -> dict | None:
    """Launched distributed (process group started), the ranks share the embedding of both shard sets and
    rank 0 alone scores, draws and writes; the other ranks return None."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    tasks = load_tasks(tasks_file)  # a bad tasks file fails in a second, not after the embedding
    model, cfg, tokenizer = load_trained(run_dir)
    model.to(engine_device())
    shape = input_shape(cfg.model)
    emb = embed(model, shards, cfg.data, shape, tokenizer)
    train_emb = embed(model, train_shards, cfg.data, shape, tokenizer) if train_shards else None
    if dist.rank() != 0:
        return None
    check_fields(tasks, emb.meta, shards, tasks_file)
    scale = float(model.scale().detach())
    results = {"run": str(run_dir), "shards": str(shards), "samples": len(emb.keys),
               "provenance": {**trained_from(run_dir, latest_tag(run_dir)),
                              "evaluated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")},
               "tasks_file": str(tasks_file or "shipped eval/tasks.yaml"), "zero_shot": {}, "retrieval": {}}
    prompt_embeddings = {}
    for task in tasks:
        prompt_embeddings[task.name] = {a: embed_texts(model, tokenizer, task.prompts(a), cfg.data.text_pairing,
                                                      cfg.data.max_text_tokens)
                                        for a in task.answers}
        results["zero_shot"][task.name] = zero_shot(emb, task, prompt_embeddings[task.name], scale)
    for query, gallery in RETRIEVAL_PAIRS:
        results["retrieval"][f"{query}->{gallery}"] = retrieval(emb, query, gallery)
    if train_emb is not None:
        results["linear_probe"] = {t.name: linear_probe(train_emb, emb, t) for t in tasks if t.kind != "ordinal"}
    out_dir.mkdir(parents=True, exist_ok=True)
    if pictures:
        results["figures"] = _pictures(model, cfg, tokenizer, emb, tasks, prompt_embeddings, results, run_dir,
                                       str(shards), out_dir)
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out_dir / "results.json")
    if pictures:
        (out_dir / "report.html").write_text(html_report(results, out_dir))
    return results


def _pictures(model, cfg, tokenizer, emb, tasks: list[Task], prompt_embeddings, results, run_dir: Path,
              shards: str, out_dir: Path) -> dict[str, str]:
    folder = out_dir / "figures"
    folder.mkdir(exist_ok=True)
    made = {
        "ROC curves": figures.roc_curves(results, folder / "roc.png"),
        "Embeddings (t-SNE)": figures.tsne(emb, tasks, folder / "tsne.png"),
        "Retrieval": figures.retrieval_grid(emb, folder / "retrieval.png"),
        "Training": figures.training_curves(run_dir, folder / "training.png"),
    }
    batch = next(iter(iter_batches(shards, cfg.data, input_shape(cfg.model), tokenizer, 32)))
    device = next(model.parameters()).device
    results["relevance"] = {}
    for modality in ("cxr", "ecg"):
        # the binary task with the most positives in this batch, explained on positives and negatives alike
        candidates = [t for t in tasks if t.modality == modality and t.kind == "binary"]
        present = batch.cxr_mask if modality == "cxr" else batch.ecg_mask
        labels = {t.name: [t.label(m) if present[i] else None for i, m in enumerate(batch.info.meta)] for t in candidates}
        task = max(candidates, key=lambda t: sum(v == 1.0 for v in labels[t.name]), default=None)
        if task is None or not present.any():
            continue
        positives = [i for i, v in enumerate(labels[task.name]) if v == 1.0]
        negatives = [i for i, v in enumerate(labels[task.name]) if v == 0.0]
        unlabelled = [i for i, v in enumerate(labels[task.name]) if v is None and present[i]]
        count = EXPLAINED if modality == "cxr" else 1
        chosen = positives[:count // 2] + negatives[:count // 2]
        # one side short: the other fills, then samples without this label (a map still says where the match
        # to the sentence came from; the caption says no answer is known)
        chosen += (positives[count // 2:] + negatives[count // 2:] + unlabelled)[:count - len(chosen)]
        query = torch.from_numpy(prompt_embeddings[task.name]["positive"].mean(0)).float().to(device)
        query = query / query.norm()
        sentence = task.answers["positive"][0]
        picked = batch.rows(torch.tensor(chosen)).to(device)
        answer = {1.0: "yes", 0.0: "no", None: "not labelled"}
        captions = [f"{task.name}: {answer[labels[task.name][i]]}" for i in chosen]
        if modality == "cxr":
            relevance = cxr_relevance(model, picked.cxr, query)
            made[f"Relevance: X-ray, {task.name}"] = figures.relevance_cxr(picked.cxr.cpu(), relevance, sentence,
                                                                           folder / "relevance_cxr.png", captions)
        else:
            rate = float(read_index(shards)["build"]["ecg_rate"])
            relevance = ecg_relevance(model, picked.ecg, query, rate)
            stored = ecg.load_npy(stored_sample(shards, batch.info.positions[chosen[0]])["ecg.npy"])
            made[f"Relevance: ECG, {task.name}"] = figures.relevance_ecg(
                stored, relevance, sentence, folder / "relevance_ecg.png", captions[0], rate)
        results["relevance"][modality] = {"task": task.name, "samples": captions,
                                          "rank_correlation_with_random_weights": relevance.rank_correlation,
                                          "passes_sanity_check": relevance.passes}
    return {name: str(path.relative_to(out_dir)) for name, path in made.items() if path is not None}


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def with_ci(r: dict, metric: str) -> str:
    """`0.731 [0.64, 0.81]`, the value with its bootstrap 95% interval when there is one."""
    ci = r.get(f"{metric}_ci")
    return _fmt(r.get(metric)) + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def verdict(r: dict, metric: str = "auroc") -> str:
    """Against chance: 'above' / 'below' when the 95% interval excludes it, 'at chance' when it holds it. A
    result below chance says the prompts point the wrong way, not that the embeddings know nothing."""
    ci, chance = r.get(f"{metric}_ci"), r.get(f"chance_{metric}")
    if r.get(metric) is not None and not ci:
        return f"too few to judge (< {MIN_CLASS_FOR_INTERVAL} of a class)"
    if not ci or chance is None:
        return ""
    return "above chance" if ci[0] > chance else "BELOW CHANCE" if ci[1] < chance else "at chance"


def sanity_summary(results: dict) -> str:
    """One line per explained modality: the randomisation check's rank correlations and what they mean."""
    lines = []
    for modality, r in results.get("relevance", {}).items():
        rhos = ", ".join(f"{v:.2f}" for v in r["rank_correlation_with_random_weights"])
        what = "X-ray" if modality == "cxr" else "ECG"
        lines.append(f"{what} ({r['task']}): rank correlation with the same model's map at random weights {rhos}; "
                     + ("passes" if r["passes_sanity_check"] else "FAILS: the map shows the input more than what the "
                        "model learned, do not read it as evidence"))
    return (f"Model-parameter randomisation check (Adebayo et al. 2018): a map must differ from the map of the "
            f"same architecture with re-drawn weights (Spearman < {SANITY_MAX_RANK_CORRELATION}). "
            + " ".join(lines) + ". A map says where the match came from, never that a finding is there.")


def not_scored(results: dict) -> list[str]:
    """Tasks this split cannot score (no labels here, or one class only), named once instead of rows of dashes."""
    return [f"{name} ({r['note']}, n = {r['n']})" for name, r in results["zero_shot"].items() if "note" in r]


def _zero_shot_rows(results: dict) -> list[list[str]]:
    rows = []
    for name, r in results["zero_shot"].items():
        if "note" in r:
            continue
        if r["kind"] == "binary":
            rows.append([name, r["modality"], f"{r['n']} ({r.get('n_positive', 0)})", with_ci(r, "auroc"),
                         _fmt(r.get("chance_auroc")), with_ci(r, "auprc"), _fmt(r.get("chance_auprc")), verdict(r)])
        elif r["kind"] == "multilabel":
            rows.append([f"{name} (macro)", r["modality"], str(r["n"]), _fmt(r.get("macro_auroc")),
                         _fmt(r.get("chance_macro_auroc")), "", "", ""])
            for cls, c in r.get("classes", {}).items():
                rows.append([f"  {cls}", "", f"({c.get('n_positive', '-')})", with_ci(c, "auroc"),
                             _fmt(c.get("chance_auroc")), with_ci(c, "auprc"), _fmt(c.get("chance_auprc")),
                             verdict(c) or c.get("note", "")])
            if "single_label" in r:
                s = r["single_label"]
                rows.append(["  single label by priority: macro AUROC / accuracy", "", str(s["n"]),
                             f"{_fmt(s.get('macro_auroc'))} / {_fmt(s['accuracy'])}",
                             f"{_fmt(s.get('chance_macro_auroc'))} / {_fmt(s['chance_accuracy'])}", "", "", ""])
        else:
            rows.append([f"{name} (Spearman / accuracy)", r["modality"], str(r["n"]),
                         f"{_fmt(r.get('spearman'))} / {_fmt(r.get('accuracy'))}",
                         f"{_fmt(r.get('chance_spearman'))} / {_fmt(r.get('chance_accuracy'))}", "", "",
                         "below chance (accuracy)" if r.get("accuracy", 1) < r.get("chance_accuracy", 0) else ""])
    return rows


ZERO_SHOT_COLUMNS = ("task", "modality", "n (pos)", "AUROC [95% CI]", "chance", "AUPRC [95% CI]", "chance",
                     "vs chance")
RETRIEVAL_COLUMNS = ("query -> gallery", "n", "R@1 [95% CI]", "chance", "R@5 [95% CI]", "chance", "R@10 [95% CI]", "chance",
                     "median rank", "chance")
def _retrieval_rows(results: dict) -> list[list[str]]:
    rows = []
    for name, r in results["retrieval"].items():
        cells = [name, str(r["n"])]
        for k in (1, 5, 10):
            cells += [with_ci(r, f"R@{k}"), _fmt(r.get(f"chance_R@{k}"))]
        rows.append(cells + [_fmt(r.get("median_rank"), 1), _fmt(r.get("chance_median_rank"), 1)])
    return rows


PROBE_COLUMNS = ("task", "n train", "1%", "10%", "100%")


def _probe_rows(results: dict) -> list[list[str]]:
    """One row per probed task with labels in both splits (the others are named with the zero-shot ones)."""
    return [[f"{name} (macro, {r['classes']} classes)" if "classes" in r else name, str(r["n_train"]),
             *[_fmt(r.get(f"auroc@{f}")) for f in ("0.01", "0.1", "1")]]
            for name, r in results["linear_probe"].items() if "note" not in r]


def print_results(results: dict, console: Console | None = None) -> None:
    console = console or Console(width=None if Console().is_terminal else 140)  # logs: wide enough for the tables
    for title, columns, rows in (
            (f"zero-shot ({results['samples']} samples of {results['shards']})", ZERO_SHOT_COLUMNS, _zero_shot_rows(results)),
            ("retrieval (own pair among all test pairs)", RETRIEVAL_COLUMNS, _retrieval_rows(results))):
        table = Table(title=title)
        for i, column in enumerate(columns):
            table.add_column(column, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
        if columns is ZERO_SHOT_COLUMNS and not_scored(results):
            console.print(f"not scored on this split: {'; '.join(not_scored(results))}")
    if "linear_probe" in results:
        table = Table(title="linear probe (test AUROC, macro over classes for multi-label; logistic regression on "
                            "frozen embeddings)")
        for column in PROBE_COLUMNS:
            table.add_column(column, justify="right")
        for row in _probe_rows(results):
            table.add_row(*row)
        console.print(table)


def _html_table(columns, rows) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_report(results: dict, out_dir: Path) -> str:
    """One self-contained page (figures embedded: the file alone can be shared): provenance, the tables with
    intervals and verdicts against chance, the tasks not scored here, then every figure."""
    where = results.get("provenance", {})
    provenance = ", ".join(f"{k} {html.escape(str(v))}" for k, v in where.items() if v is not None)
    parts = [f"<h1>MoRE evaluation</h1><p class='meta'>run <code>{html.escape(results['run'])}</code> on "
             f"<code>{html.escape(results['shards'])}</code>: {results['samples']} samples; tasks from "
             f"<code>{html.escape(results['tasks_file'])}</code>.<br>{provenance}</p>"
             "<p class='meta'>Every figure beside its chance baseline on the same samples; intervals are bootstrap "
             "95% (stratified, 1000 draws). <b>BELOW CHANCE</b>: the interval lies under chance, which says the "
             "prompts point the wrong way rather than that the embeddings know nothing (compare the linear probe).</p>",
             "<h2>Zero-shot classification</h2>", _html_table(ZERO_SHOT_COLUMNS, _zero_shot_rows(results))]
    skipped = not_scored(results)
    if skipped:
        parts.append(f"<p class='meta'>Not scored on this split: {html.escape('; '.join(skipped))}.</p>")
    parts += ["<h2>Cross-modal retrieval</h2>", _html_table(RETRIEVAL_COLUMNS, _retrieval_rows(results))]
    if "linear_probe" in results:
        parts += ["<h2>Linear probe (test AUROC; macro over classes for multi-label)</h2>",
                  _html_table(PROBE_COLUMNS, _probe_rows(results))]
    if results.get("relevance"):
        parts += ["<h2>Relevance maps: can they be trusted?</h2>", f"<p class='meta'>{html.escape(sanity_summary(results))}</p>"]
    for name, path in results.get("figures", {}).items():
        data = base64.b64encode((out_dir / path).read_bytes()).decode()
        parts.append(f"<h2>Figure: {html.escape(name)}</h2><img src='data:image/png;base64,{data}' "
                     f"alt='{html.escape(name)}'>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222;padding:0 1em}"
             "table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:14px}"
             "th,td{border-bottom:1px solid #ddd;padding:4px 10px;text-align:right}"
             "th:first-child,td:first-child{text-align:left}th{background:#f4f6f8}"
             "img{max-width:100%;border:1px solid #eee;margin-bottom:1em}.meta{color:#555}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>MoRE evaluation</title><style>{style}</style>" \
           f"</head><body>{''.join(parts)}</body></html>"
