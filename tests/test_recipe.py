"""The MoRE reference recipe's switches (configs/reference.yaml): weight decay on every parameter, LoRA with
bias="all", and the shipped file carrying the reference's values."""

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
