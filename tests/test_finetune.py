"""The MoRE reference's fine-tuning protocol (launch/finetune.py): who trains, which samples are kept, the schedule,
the kept epoch, and test metrics equal to scikit-learn's on the written predictions."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from safetensors.torch import load_file
from sklearn.metrics import average_precision_score, roc_auc_score

from more_scale.config import ConfigError, load_config
from more_scale.data.build import read_index
from more_scale.data.pipeline import stored_sample
from more_scale.eval.finetune import EarlyStop, load_finetune_config

CHEXPERT_FOUR = ("Atelectasis", "Cardiomegaly", "Edema", "Pleural Effusion")


def _known(meta: dict) -> bool:
    """By hand, the reference's rule on the shipped tasks' label fields: CheXpert 1 or 0, or blank (read as
    negative, as tasks.yaml says); an uncertain -1 leaves the sample out (multimodal_infer.py:29)."""
    table = meta.get("chexpert")
    return isinstance(table, dict) and all(table.get(n) in (1.0, 0.0, None, "") for n in CHEXPERT_FOUR)


def test_finetune_follows_the_reference_protocol(two_step_run, shards, tmp_path):
    from launch_helpers import finetune_main

    from more_scale.eval.embed import load_trained

    out = tmp_path / "ft"
    lr, min_lr, restart = 1e-3, 1e-4, 2
    assert finetune_main(["--checkpoint", str(two_step_run), "--shards", str(shards), "--out", str(out), "epochs=4",
                          "blocks=1", "batch_size=8", "workers=0", f"lr={lr}", f"min_lr={min_lr}",
                          f"restart_epochs={restart}", "patience=4"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["columns"] == list(CHEXPERT_FOUR) and results["modality"] == "cxr"

    # kept: every sample with an X-ray and all four labels known; the uncertain ones are counted as left out
    for split in ("train", "validate", "test"):
        metas = [stored_sample(shards / split, i) for i in range(sum(e["samples"] for e in read_index(shards / split)["shards"]))]
        metas = [json.loads(m["meta.json"]) for m in metas if "cxr.jpg" in m]
        assert results["samples"][split] == sum(map(_known, metas)), split
        uncertain = sum(m["chexpert"].get("Atelectasis") == -1.0 for m in metas)
        assert results["left_out"][split].get("Atelectasis unknown", 0) == uncertain, split
    assert sum(results["left_out"]["train"].values()) > 0  # the synthetic set holds uncertain labels to leave out

    # trained: the last block's qkv weight, the projection head and the new layer, nothing else
    depth = load_config(two_step_run / "config.yaml").model.cxr.depth
    assert {n for n in results["trained_names"] if "blocks" in n} == {f"more.encoders.cxr.blocks.{depth - 1}.attn.qkv.weight"}
    assert all(n.startswith(("more.heads.cxr.", "fc.")) or "blocks" in n for n in results["trained_names"])
    assert {"fc.weight", "fc.bias"} <= set(results["trained_names"])
    weights = load_file(out / "classifier.safetensors")
    pretrained, _, _ = load_trained(two_step_run)
    before = {f"more.{k}": v for k, v in pretrained.state_dict().items()}
    changed = {k for k, v in weights.items() if k in before and not np.array_equal(v.numpy(), before[k].numpy())}
    trained_names = set(results["trained_names"])
    assert changed - trained_names <= {k for k in changed if "running_" in k or "num_batches" in k}  # BN statistics only
    assert f"more.encoders.cxr.blocks.{depth - 1}.attn.qkv.weight" in changed

    # SGDR stepped once per epoch: lr at epoch e is min_lr + (lr - min_lr)(1 + cos(pi ((e - 1) mod T0) / T0)) / 2
    for h in results["history"]:
        t = (h["epoch"] - 1) % restart
        assert h["lr"] == pytest.approx(min_lr + (lr - min_lr) * (1 + math.cos(math.pi * t / restart)) / 2, rel=1e-6)
    aurocs = [h["val_macro_auroc"] for h in results["history"]]
    assert results["best_epoch"] == int(np.argmax(aurocs)) + 1  # the first epoch with the best validation AUROC
    assert len(results["history"]) == 4 and not results["stopped_early"]

    # test metrics: scikit-learn's on predictions.csv
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == results["samples"]["test"] == results["test"]["n"]
    labels = np.array([[float(r[f"label {c}"]) for c in CHEXPERT_FOUR] for r in rows])
    probs = np.array([[float(r[f"prob {c}"]) for c in CHEXPERT_FOUR] for r in rows])
    scored = [c for c in range(4) if 0 < labels[:, c].sum() < len(labels)]
    assert scored and [CHEXPERT_FOUR[c] for c in scored] == list(results["test"]["classes"])
    aurocs = [roc_auc_score(labels[:, c], probs[:, c]) for c in scored]
    # the probabilities were written with 6 decimals: ties can appear, so AUROC agrees to a pair's weight
    assert results["test"]["macro_auroc"] == pytest.approx(np.mean(aurocs), abs=1e-3)
    assert results["test"]["map"] == pytest.approx(np.mean([average_precision_score(labels[:, c], probs[:, c])
                                                            for c in scored]), abs=1e-3)
    assert (out / "finetune.png").stat().st_size > 10_000


def test_early_stop_waits_patience_epochs_without_a_lower_loss():
    stop = EarlyStop(patience=3)
    assert [stop(x) for x in (1.0, 0.9, 0.95, 0.91, 0.8, 0.85, 0.85, 0.9)] == \
        [False, False, False, False, False, False, False, True]


def test_finetune_settings_are_checked_naming_the_key(two_step_run, shards, tmp_path, capsys):
    from launch_helpers import finetune_main

    with pytest.raises(ConfigError, match="label_fraction must be in"):
        load_finetune_config(["label_fraction=0"])
    with pytest.raises(ConfigError, match="unknown key epoch "):
        load_finetune_config(["epoch=3"])
    with pytest.raises(ConfigError, match="block_params must be one of"):
        load_finetune_config(["block_params=mlp"])
    common = ["--checkpoint", str(two_step_run), "--shards", str(shards), "--out", str(tmp_path / "x"), "workers=0"]
    assert finetune_main([*common, "targets=[Cardiomegaly,Atrial fibrillation]"]) == 2
    assert "mix modalities ['cxr', 'ecg']" in capsys.readouterr().err
    assert finetune_main([*common, "targets=[Cardiomegally]"]) == 2
    assert "targets ['Cardiomegally'] are not tasks" in capsys.readouterr().err
    assert finetune_main([*common, "blocks=9"]) == 2
    assert "blocks=9, but the trained cxr tower has 2 blocks" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before anything was written
