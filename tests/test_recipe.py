"""The MoRE reference recipe's switches (configs/reference.yaml): weight decay on every parameter, LoRA with
bias="all", crop and jitter applied with p 0.8, and the shipped file carrying the reference's values."""

import random

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
