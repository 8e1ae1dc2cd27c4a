"""Pictures of an evaluation: ROC curves, t-SNE of the embeddings by label, a retrieval grid, training
curves, relevance maps. Each function writes one PNG and returns its path (None when there is nothing
to draw), so the HTML report lists only what exists."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from more_scale.data.ecg import LEADS  # noqa: E402
from more_scale.eval.embed import Embeddings  # noqa: E402
from more_scale.eval.explain import SANITY_MAX_RANK_CORRELATION  # noqa: E402
from more_scale.eval.tasks import Task  # noqa: E402

DPI = 110
STYLE = {"axes.spines.top": False, "axes.spines.right": False, "font.size": 9, "axes.titlesize": 10}


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


CLASS_CURVES = 8  # a multi-label panel draws its classes with the most positives; the tables list every one


def roc_curves(results: dict, path: Path) -> Path | None:
    """One panel per binary task, and one per multi-label task with a curve per class (the CLASS_CURVES with
    the most positives), chance diagonal dashed."""
    panels = []  # (title, [(legend label, curve)])
    for name, r in results["zero_shot"].items():
        where = "X-ray" if r["modality"] == "cxr" else "ECG"
        if "roc" in r:
            panels.append((f"{name} ({where}; {r['n_positive']} of {r['n']} positive)",
                           [(f"AUROC {r['auroc']:.2f} (chance {r['chance_auroc']:.2f})", r)]))
        classes = sorted(((cls, c) for cls, c in r.get("classes", {}).items() if "roc" in c),
                         key=lambda item: -item[1]["n_positive"])
        if classes:
            more = len(classes) - CLASS_CURVES
            title = f"{name} ({where}): macro AUROC {r['macro_auroc']:.2f}" + \
                (f"; {more} more class{'es' if more > 1 else ''} in the table" if more > 0 else "")
            panels.append((title, [(f"{cls} {c['auroc']:.2f} ({c['n_positive']} pos.)", c)
                                   for cls, c in classes[:CLASS_CURVES]]))
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.7 * rows), squeeze=False)
        for ax, (title, curves) in zip(axes.flat, panels):
            for i, (label, c) in enumerate(curves):
                color = "#1f5fa8" if len(curves) == 1 else plt.cm.tab10(i)
                ax.plot(c["roc"]["fpr"], c["roc"]["tpr"], color=color, lw=2 if len(curves) == 1 else 1.4, label=label)
            ax.plot([0, 1], [0, 1], ls="--", color="#999999", lw=1)
            ax.set(title=textwrap.fill(title, 40), xlabel="false positive rate", ylabel="true positive rate",
                   xlim=(0, 1), ylim=(0, 1.02), aspect="equal")
            ax.legend(loc="lower right", frameon=False, fontsize=7 if len(curves) > 1 else 8)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.suptitle("Zero-shot ROC curves (dashed: chance)", fontweight="bold")
        fig.tight_layout()
        return _save(fig, path)


def _binary_colouring(emb: Embeddings, tasks: list[Task], modality: str):
    """(name, rows with this modality, their labels, separability) of the binary task the embeddings separate
    best: the highest 3-fold cross-validated AUROC of a logistic regression on them (the picture then shows
    structure that is there, not the weakest task's noise); tasks with fewer than 5 of a class are passed over."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    rows = np.flatnonzero(emb.masks[modality])
    best = (None, rows, None, None)
    for task in tasks:
        if task.modality != modality or task.kind != "binary":
            continue
        labels = np.array([task.label(emb.meta[i]) for i in rows], dtype=object)
        known = labels != None  # noqa: E711 - elementwise on an object array
        y = labels[known].astype(float)
        if min(y.sum(), len(y) - y.sum()) < 5:
            continue
        auroc = cross_val_score(LogisticRegression(max_iter=1000), emb.vectors[modality][rows[known]], y, cv=3,
                                scoring="roc_auc").mean()
        if best[3] is None or auroc > best[3]:
            best = (task.name, rows, labels, float(auroc))
    return best


def tsne(emb: Embeddings, tasks: list[Task], path: Path, seed: int = 0) -> Path | None:
    """X-ray and ECG embeddings in 2-D (t-SNE), each coloured by the label its embeddings separate best (the
    legend gives that label's cross-validated linear-probe AUROC on the same embeddings)."""
    from sklearn.manifold import TSNE

    panels = [m for m in ("cxr", "ecg") if emb.masks[m].sum() >= 5]
    if not panels:
        return None
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
        for ax, modality in zip(axes.flat, panels):
            name, rows, labels, separability = _binary_colouring(emb, tasks, modality)
            points = TSNE(perplexity=min(30, len(rows) - 1), random_state=seed, init="pca").fit_transform(
                emb.vectors[modality][rows])
            if labels is None:
                ax.scatter(points[:, 0], points[:, 1], s=10, color="#1f5fa8", alpha=0.7)
            else:
                for value, colour, label in ((None, "#cccccc", "unlabelled"), (0.0, "#1f5fa8", "negative"),
                                             (1.0, "#d9541a", "positive")):
                    chosen = np.array([v == value if value is not None else v is None for v in labels])
                    if chosen.any():
                        ax.scatter(points[chosen, 0], points[chosen, 1], s=12, color=colour, alpha=0.75,
                                   label=f"{label} ({chosen.sum()})")
                ax.legend(frameon=False, title=f"{name} (probe AUROC {separability:.2f})", loc="upper center",
                          bbox_to_anchor=(0.5, -0.02), ncol=3)  # below the panel: never over the points
            ax.set(title=f"{'X-ray' if modality == 'cxr' else 'ECG'} embeddings (t-SNE, {len(rows)} samples)",
                   xticks=[], yticks=[])
        fig.tight_layout()
        return _save(fig, path)


HIT = "#1a7f37"  # the true item's frame in the retrieval grid


def retrieval_grid(emb: Embeddings, path: Path, queries: int = 4, top: int = 5, seed: int = 0) -> Path | None:
    """For a few reports: the X-rays ranked first for them, then the report's own X-ray with its rank; the own
    X-ray is framed in green wherever it appears (always in the last column)."""
    rows = np.flatnonzero(emb.masks["cxr"])
    reported = np.flatnonzero(emb.masks["cxr"] & emb.masks["text"])  # a query needs a report and its own X-ray
    if len(rows) < top or not len(reported) or emb.thumbnails is None:
        return None
    chosen = np.random.default_rng(seed).choice(reported, min(queries, len(reported)), replace=False)
    sims = emb.vectors["text"][chosen] @ emb.vectors["cxr"][rows].T
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(len(chosen), top + 2, figsize=(1.8 * (top + 1) + 3.6, 2.1 * len(chosen)),
                                 gridspec_kw={"width_ratios": [3.2] + [1] * (top + 1)}, squeeze=False)
        for r, (query, scores) in enumerate(zip(chosen, sims)):
            text = emb.texts[query] if emb.texts else emb.keys[query]
            text = text.replace("The report from Xray is:", "X-ray report:").replace("The report from ECG is:", "\nECG report:")
            short = textwrap.shorten(text.split("\n")[0], 200, placeholder=" ...")
            axes[r, 0].text(0, 0.5, textwrap.fill(short, 38), va="center", fontsize=9)
            axes[r, 0].axis("off")
            ranking = np.argsort(-scores, kind="stable")
            own = int(np.flatnonzero(rows[ranking] == query)[0])
            for c, j in enumerate([*ranking[:top], ranking[own]]):
                ax = axes[r, c + 1]
                ax.imshow(emb.thumbnails[rows[j]], cmap="gray")
                hit = rows[j] == query
                title = f"own: #{own + 1}" if c == top else f"#{c + 1}"
                ax.set_title(f"{title}\n{scores[j]:.3f}", fontsize=8, color=HIT if hit else "black")
                ax.set(xticks=[], yticks=[])
                for spine in ax.spines.values():
                    spine.set_visible(True)
                    spine.set(color=HIT if hit else "#bbbbbb", linewidth=4 if hit else 0.8)
        fig.suptitle(f"Text -> X-ray retrieval among {len(rows)} X-rays: the top {top} for each report (cosine "
                     "similarity), then the report's own X-ray and its rank, framed in green", fontweight="bold")
        fig.tight_layout()
        return _save(fig, path)


def training_curves(run_dir: Path, path: Path) -> Path | None:
    """Loss terms, learning rate and speed over the steps of the run's metrics.jsonl."""
    log = run_dir / "metrics.jsonl"
    if not log.is_file():
        return None
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    rows = [r for r in lines if "loss" in r]  # training windows; validation has lines of its own
    validation = [r for r in lines if "val/loss" in r]
    if len(rows) < 2:
        return None
    steps = [r["step"] for r in rows]
    panels = [("loss", [k for k in rows[-1] if k.startswith("loss")]), ("learning rate", ["lr"]),
              ("samples / s", ["samples_per_s"]), ("MFU", ["mfu"])]
    panels = [(t, [k for k in keys if k in rows[-1]]) for t, keys in panels]
    panels = [(t, keys) for t, keys in panels if keys]
    y_labels = {"loss": "contrastive loss (nats)", "learning rate": "learning rate", "samples / s": "samples / s",
                "MFU": "MFU (% of measured matmul peak)"}
    scale = {"mfu": 100.0}  # the console prints MFU in percent: the plot too
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 2.9), squeeze=False)
        for ax, (title, keys) in zip(axes.flat, panels):
            for k in keys:
                label = k.removeprefix("loss/") if k != "loss" else "total"
                ax.plot(steps, [r.get(k, np.nan) * scale.get(k, 1.0) for r in rows], lw=1.6, label=label)
            if title == "loss" and validation:
                ax.plot([r["step"] for r in validation], [r["val/loss"] for r in validation], "o--", lw=1.4,
                        color="black", label="validation")
            ax.set(title=title, xlabel="optimizer step", ylabel=y_labels[title])
            if title in ("samples / s", "MFU", "learning rate"):
                ax.set_ylim(bottom=0)  # speeds from zero: a 5% wobble should look like one
            if len(keys) > 1 or (title == "loss" and validation):
                ax.legend(frameon=False)
        fig.suptitle(f"Training ({run_dir.name})", fontweight="bold")
        fig.tight_layout()
        return _save(fig, path)


def finetune_curves(results: dict, path: Path) -> Path:
    """A fine-tuning run: BCE per epoch (training, validation) with the kept epoch marked, validation macro AUROC,
    and the test split's ROC curve per column beside chance."""
    history, test = results["history"], results["test"]
    epochs = [h["epoch"] for h in history]
    best = results["best_epoch"]
    classes = sorted(test["classes"].items(), key=lambda item: -item[1]["n_positive"])[:CLASS_CURVES]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 3, figsize=(11.4, 3.5))
        loss, auroc, roc = axes
        loss.plot(epochs, [h["train_loss"] for h in history], "o-", lw=1.6, label="training")
        loss.plot(epochs, [h["val_loss"] for h in history], "o--", lw=1.6, color="black", label="validation")
        auroc.plot(epochs, [np.nan if h["val_macro_auroc"] is None else h["val_macro_auroc"] for h in history], "o-",
                   lw=1.6, color="#1f5fa8")
        for ax in (loss, auroc):
            ax.axvline(best, color="#c0392b", lw=1, ls=":", label=f"kept: epoch {best}")
        loss.set(title="loss", xlabel="epoch", ylabel="binary cross-entropy")
        loss.legend(frameon=False)
        auroc.set(title="validation macro AUROC", xlabel="epoch", ylabel="macro AUROC", ylim=(0, 1))
        auroc.axhline(0.5, color="#999999", lw=1, ls="--")
        for i, (name, c) in enumerate(classes):
            roc.plot(c["roc"]["fpr"], c["roc"]["tpr"], color=plt.cm.tab10(i), lw=1.4,
                     label=f"{name} {c['auroc']:.2f} ({c['n_positive']} pos.)")
        roc.plot([0, 1], [0, 1], ls="--", color="#999999", lw=1)
        macro = f"macro AUROC {test['macro_auroc']:.2f}, mAP {test['map']:.2f}" if "macro_auroc" in test else "no column scored"
        roc.set(title=f"test ({test['n']} samples): {macro}", xlabel="false positive rate", ylabel="true positive rate",
                xlim=(0, 1), ylim=(0, 1.02), aspect="equal")
        if classes:
            roc.legend(loc="lower right", frameon=False, fontsize=7)
        where = "X-ray" if results["modality"] == "cxr" else "ECG"
        fig.suptitle(f"Fine-tuning the {where} tower ({results['trained_parameters']:,} trained parameters)",
                     fontweight="bold")
        fig.tight_layout()
        return _save(fig, path)


def relevance_cxr(images: torch.Tensor, relevance, query: str, path: Path, captions: list[str]) -> Path | None:
    """X-rays (positives and negatives side by side), the trained model's continuous relevance map over each,
    and the same map from randomised weights with its rank correlation (the sanity check)."""
    if len(images) == 0:
        return None
    rows = (("X-ray", None), ("trained model", relevance.maps), ("random weights\n(sanity check)", relevance.random_maps))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(3, len(images), figsize=(2.6 * len(images), 8.2), squeeze=False)
        for c, image in enumerate(images):
            gray = image[0].numpy()
            for r, (_, maps) in enumerate(rows):
                axes[r, c].imshow(gray, cmap="gray")
                if maps is not None:
                    overlay = axes[r, c].imshow(maps[c], cmap="inferno", alpha=0.55, vmin=0, vmax=1)
                axes[r, c].set(xticks=[], yticks=[])
            axes[0, c].set_title(captions[c], fontsize=9)
            rho = relevance.rank_correlation[c]
            axes[2, c].set_title(f"rank corr. {rho:.2f}" + (" (fails)" if rho >= SANITY_MAX_RANK_CORRELATION else ""),
                                 fontsize=9, color="#b00" if rho >= SANITY_MAX_RANK_CORRELATION else "#222")
        for r, (label, _) in enumerate(rows):
            axes[r, 0].set_ylabel(label)
        fig.colorbar(overlay, ax=list(axes[1:].flat), fraction=0.02, pad=0.01,
                     label="relevance (0 = least, 1 = most on that image)")
        verdict = ("passes the randomisation check" if relevance.passes else
                   "FAILS the randomisation check: it shows the image more than what the model learned")
        fig.suptitle(textwrap.fill(f"Where the X-ray matches \"{query}\": the map {verdict} (it needs Spearman "
                                   f"< {SANITY_MAX_RANK_CORRELATION} with the random-weights map)", 90), fontweight="bold")
        return _save(fig, path)


def relevance_ecg(signal_mv: np.ndarray, relevance, query: str, path: Path, caption: str, rate: float) -> Path:
    """One 12-lead ECG in mV (as stored: baseline removed), each lead over its own gradient x input (darker =
    drove the match), its share of the attribution beside its name, and the attention rollout over time on top."""
    heat, share = relevance.per_lead[0], relevance.lead_share[0]
    t = np.arange(heat.shape[-1]) / rate
    shown = min(signal_mv.shape[-1], heat.shape[-1])  # the model zero-pads a short record: nothing to draw there
    with plt.rc_context(STYLE):
        fig = plt.figure(figsize=(12, 9))
        grid = fig.add_gridspec(7, 2, height_ratios=[0.5] + [1] * 6, hspace=0.35)
        top = fig.add_subplot(grid[0, :])
        top.plot(t, relevance.over_time[0], color="#444")
        top.set(ylabel="rollout", xlim=(t[0], t[-1]), ylim=(0, 1.05), xticks=[])
        top.set_title("attention rollout over time (all leads: the Conv1d stem mixes them)", fontsize=9)
        for i in range(len(LEADS)):
            ax = fig.add_subplot(grid[1 + i % 6, i // 6])
            lead = signal_mv[i, :shown].astype(np.float32)
            low, high = float(lead.min()) - 0.1, float(lead.max()) + 0.1
            image = ax.imshow(heat[i][None], aspect="auto", cmap="Reds", vmin=0, vmax=1,
                              extent=(t[0], t[-1], low, high))
            ax.plot(t[:shown], lead, color="black", lw=0.7)
            ax.set_ylim(low, high)
            ax.set_ylabel(f"{LEADS[i]}\n{share[i]:.0%}", rotation=0, ha="right", va="center", labelpad=14)
            ax.tick_params(labelsize=7)
            if i % 6 == 5:
                ax.set_xlabel("seconds")
            else:
                ax.set_xticklabels([])
        fig.text(0.02, 0.45, "mV (baseline removed); under each lead's name: its share of |gradient x input|",
                 rotation=90, va="center", fontsize=8)
        fig.colorbar(image, ax=fig.axes, fraction=0.015, pad=0.01, label="gradient x input (0 = least, 1 = most)")
        rho = relevance.rank_correlation[0]
        verdict = "passes" if relevance.passes else "FAILS"
        fig.suptitle(textwrap.fill(f"Which leads and moments match \"{query}\" ({caption}); randomisation check "
                                   f"{verdict}: rank corr. {rho:.2f} with random weights (must be < "
                                   f"{SANITY_MAX_RANK_CORRELATION})", 110), fontweight="bold")
        return _save(fig, path)
