"""The MoRE reference recipe's switches (configs/reference.yaml): weight decay on every parameter, LoRA with
bias="all", crop and jitter applied with p 0.8, and the shipped file carrying the reference's values."""

import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from more_scale.config import TextConfig, load_config
from more_scale.models.text import build_text_encoder
from more_scale.train.engine import parameter_groups


def _tiny_text(**lora) -> torch.nn.Module:
    cfg = TextConfig(random_init=True, hidden=32, layers=2, heads=2, intermediate=64, max_positions=40, lora_r=4, **lora)
    return build_text_encoder(cfg, 50, 0)


def test_decay_all_puts_weight_decay_on_norms_biases_and_the_rest():
    """Ours: matrices decay, vectors do not. The reference's AdamW(model.parameters(), weight_decay=0.1):
    every parameter decays; the two groups stay (one optimizer layout for both recipes)."""
    model = _tiny_text(lora_bias="all")
    ours, theirs = parameter_groups(model, 0.1), parameter_groups(model, 0.1, decay_all=True)
    assert [g["weight_decay"] for g in ours] == [0.1, 0.0] and [g["weight_decay"] for g in theirs] == [0.1, 0.1]
    assert all(p.ndim < 2 for p in ours[1]["params"]) and ours[1]["params"]  # biases and norms are the exempt group
    assert sum(p.numel() for g in theirs for p in g["params"]) == sum(p.numel() for p in model.parameters()
                                                                     if p.requires_grad)


def test_lora_bias_all_trains_every_bias_of_the_lm():
    """peft's bias="all" (utils/build_model.py of the reference) makes every bias of the frozen LM trainable
    beside the LoRA matrices: a larger trainable share than bias="none", by exactly the LM's bias count."""
    def trainable(model):
        return {n for n, p in model.named_parameters() if p.requires_grad}

    none, every = _tiny_text(lora_bias="none"), _tiny_text(lora_bias="all")
    biases = {n for n, _ in every.named_parameters() if n.endswith(".bias") and "lora_" not in n}
    assert biases and not biases & trainable(none) and biases <= trainable(every)
    assert trainable(every) - trainable(none) == biases


def test_the_reference_config_carries_the_reference_values():
    """pretrain_multimodel.py lines 83-92 and 107-109, utils/build_model.py 229-235."""
    cfg = load_config("reference", ["model.text.random_init=true"])
    t = cfg.train
    assert (t.lr, t.weight_decay, t.decay_all, tuple(t.betas), t.grad_accum, t.warmup_steps, t.grad_clip) == \
        (3e-5, 0.1, True, (0.9, 0.999), 4, 0, 0)
    assert t.schedule == "cosine_restarts" and t.min_lr_ratio * t.lr == 3e-6
    assert cfg.data.batch_size == 100 and cfg.model.temperature == 0.02
    assert (cfg.model.text.lora_r, cfg.model.text.lora_alpha, cfg.model.text.lora_dropout, cfg.model.text.lora_bias) == \
        (16, 8, 0.1, "all")
    assert (cfg.data.cxr_crop_p, cfg.data.cxr_jitter_p) == (0.8, 0.8)  # utils/create_dataset.py 384-385


@pytest.mark.parametrize("step", ["crop", "jitter"])
def test_crop_and_jitter_apply_with_their_probability(step):
    """Counted over 400 seeds with the other steps off: an untouched draw equals evaluation's centre crop
    exactly, any applied crop or jitter moves it. At p 0.8 the applied share's binomial standard error is
    sqrt(0.16 / 400) = 0.02; the bound is 3.5 of it. The same seed gives the same draw (the nested OneOf
    draws from the generators it is handed)."""
    from more_scale.data import cxr

    image = cv2.GaussianBlur((np.random.default_rng(0).random((80, 96)) * 255).astype(np.uint8), (5, 5), 2)
    crop_p, jitter_p, jitter = (0.8, 1.0, 0.0) if step == "crop" else (0.0, 0.8, 0.4)
    aug = cxr.train_augmentation(64, (0.2, 1.0), jitter, 0.0, 0.0, crop_p=crop_p, jitter_p=jitter_p)
    centre = cxr.to_model_input(image, 64)

    def draw(seed: int) -> np.ndarray:
        return cxr.augmented_input(image, aug, np.random.default_rng(seed), random.Random(seed))

    applied = np.mean([not np.allclose(draw(seed), centre, atol=1e-6) for seed in range(400)])
    assert abs(applied - 0.8) < 0.07
    assert all(np.array_equal(draw(seed), draw(seed)) for seed in range(5))


def test_the_references_report_cleanups_on_known_strings():
    """preprocessing/preprocess_notes.py: sentences with a clock time dropped ("a.m." does not end a sentence),
    the CheXpert-label sentence in its label order and wording."""
    from more_scale.data.reports import chexpert_sentence, drop_clock_time_sentences

    text = ("Portable AP chest at 10:45 a.m. was compared. Heart size is normal. Findings were discussed with "
            "the team at 3 pm. No effusion.")
    assert drop_clock_time_sentences(text) == "Heart size is normal. No effusion."
    assert drop_clock_time_sentences("No change since 2019. Lines unchanged.") == "No change since 2019. Lines unchanged."
    labels = {"Edema": -1.0, "Cardiomegaly": 1.0, "Atelectasis": 1.0, "Pneumonia": 0.0, "Support Devices": 1.0}
    assert chexpert_sentence(labels) == "Atelectasis, Cardiomegaly is present. uncertain finding of Edema"
    assert chexpert_sentence({"Pneumonia": 0.0}) == ""


def test_build_with_the_references_reports(raw_root, tmp_path):
    """--reports reference on the synthetic MIMIC layout: each X-ray report is the full build's with its clock-time
    sentences dropped (or the CheXpert sentence when nothing is left, also for an emptied report file), ECG text
    joins report_0..6 only, and a paired ECG without statements reads "ECG note not available."."""
    import shutil

    import pandas as pd

    from more_scale.data import reports
    from more_scale.data.build import BuildOptions, build_sample
    from more_scale.data.mimic import mimic_samples

    raw = tmp_path / "raw"
    shutil.copytree(raw_root, raw)
    roots = (raw / "mimic-cxr-jpg", raw / "mimic-cxr-reports", raw / "mimic-iv-ecg")
    full, reference = BuildOptions(short_side=64), BuildOptions(short_side=64, reports="reference")
    first = mimic_samples(*roots, full)[0]
    silent, verbose = first[0].meta["ecg_id"], first[1].meta["ecg_id"]  # no statement at all; ten statements
    measurements = raw / "mimic-iv-ecg" / "machine_measurements.csv"
    table = pd.read_csv(measurements, low_memory=False)
    columns = [f"report_{i}" for i in range(18)]
    table[columns] = table[columns].astype(object)
    table.loc[table["study_id"] == silent, columns] = None
    table.loc[table["study_id"] == verbose, columns] = [f"Statement {i}" for i in range(10)] + [None] * 8
    table.to_csv(measurements, index=False)
    specs_full, _ = mimic_samples(*roots, full)
    specs_ref, _ = mimic_samples(*roots, reference)
    assert [s.key for s in specs_full] == [s.key for s in specs_ref]
    Path(specs_ref[1].report_file).write_text("FINAL REPORT\n IMPRESSION: Called to the ward at 10:45.\n")
    Path(specs_ref[2].report_file).write_text("FINAL REPORT\n FINDINGS: Heart size is normal. Paged at 3 pm.\n")
    for n, (a, b) in enumerate(zip(specs_full[:8], specs_ref[:8])):
        ours, theirs = build_sample(a, full), build_sample(b, reference)
        rad = ours["rad.txt"].decode()
        expected = reports.drop_clock_time_sentences(rad) or reports.chexpert_sentence(b.meta["chexpert"])
        if n == 1:
            expected = reports.chexpert_sentence(b.meta["chexpert"])  # the emptied report
        assert theirs.get("rad.txt", b"").decode() == expected
    for a, b in zip(specs_full, specs_ref):
        row = table[table["study_id"] == b.meta["ecg_id"]].iloc[0]
        first_seven = [row[f"report_{i}"] for i in range(reports.REFERENCE_ECG_STATEMENTS) if f"report_{i}" in row]
        assert b.ecg_text == (reports.ecg_text(first_seven) or reports.MISSING_ECG_NOTE)
    assert specs_ref[0].ecg_text == "ECG note not available." and specs_full[0].ecg_text == ""
    assert specs_ref[1].ecg_text == ". ".join(f"Statement {i}" for i in range(7)) + "."
    assert specs_full[1].ecg_text.endswith("Statement 9.")
    assert build_sample(specs_ref[2], reference)["rad.txt"] == b"Heart size is normal."
    assert b"3 pm" in build_sample(specs_full[2], full)["rad.txt"]
