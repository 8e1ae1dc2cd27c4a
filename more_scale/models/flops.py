"""FLOPs of one MoRE training step, counted from the model's structure: the numerator of MFU.

2 FLOPs per multiply-add, matmuls and convolutions only (norms, activations and softmax are left out,
as every MFU convention does). Rules, as autograd runs them:

- A trained layer costs 3x its forward (forward, input gradient, weight gradient); the first layer
  of a tower, whose input needs no gradient, 2x.
- A frozen layer costs 2x its forward (forward, input gradient), or 1x where nothing below it trains
  (the text LM's first layer when its embeddings and biases are frozen).
- Attention's two products (QK^T and AV, 4 N^2 d per layer) cost 2x more in backward, as fused
  kernels (flash / efficient) compute dQ, dK and dV.
- DropToken: the ViT blocks run on round(N * keep) + 1 tokens in training.
- The text tower runs on the padded report length L, which changes per batch: per-step FLOPs are
  `per_sample(L) * B`, with the L-dependence kept as two coefficients (linear layers ~ L, attention ~ L^2).

Checked against torch.utils.flop_counter in tests/test_flops.py. At paper dims (ViT-B/16 x2 at keep 1,
RoBERTa-base + LoRA with every LM bias trained) this gives the 306.1 GFLOP per sample at L=256 of
DESIGN.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from more_scale.config import ECG_STEM_KERNEL, ModelConfig, VitConfig, ecg_stem_lengths


@dataclass(frozen=True)
class StepFlops:
    """Training FLOPs per sample = fixed + per_token * L + per_token2 * L^2 (L: padded text length)."""
    fixed: float  # both ViT towers, the three heads
    per_token: float  # text tower: linear layers (frozen base + LoRA)
    per_token2: float  # text tower: attention products

    def per_sample(self, text_length: int) -> float:
        return self.fixed + self.per_token * text_length + self.per_token2 * text_length**2

    def per_step(self, batch: int, text_length: int) -> float:
        """One micro-batch on one rank (the gathered-negatives loss adds < 0.1% and is left out)."""
        return batch * self.per_sample(text_length)


def _vit_blocks_forward(cfg: VitConfig, tokens: int) -> float:
    """Forward FLOPs of a ViT's blocks on `tokens` tokens (CLS included)."""
    w = cfg.width
    linear = 2 * tokens * w * (3 * w + w + 2 * int(w * cfg.mlp_ratio))  # qkv, proj, fc1 + fc2
    return cfg.depth * linear, cfg.depth * 4 * tokens**2 * w  # (linear, attention)


def vit_train_flops(cfg: VitConfig, stem_flops: tuple[float, float], patches: int, training: bool = True) -> float:
    """One sample through a ViT tower, forward and backward. `stem_flops`: forward FLOPs of the stem's
    first op (no input gradient) and of the rest of the stem."""
    kept = max(1, round(patches * cfg.drop_token_keep)) if training else patches
    linear, attention = _vit_blocks_forward(cfg, kept + 1)
    first, rest = stem_flops
    return 2 * first + 3 * rest + 3 * linear + 3 * attention


def cxr_stem_flops(cfg) -> tuple[tuple[float, float], int]:
    patches = (cfg.image_size // cfg.patch_size) ** 2
    return (2 * cfg.channels * cfg.patch_size**2 * cfg.width * patches, 0.0), patches


def ecg_stem_flops(cfg) -> tuple[tuple[float, float], int]:
    if cfg.stem == "patch":
        patches = cfg.leads * (cfg.samples // cfg.patch_samples)
        return (2 * cfg.patch_samples * cfg.width * patches, 0.0), patches
    t1, t2 = ecg_stem_lengths(cfg.samples)  # after Conv1d(12 -> S, stride k), after Conv1d(S -> W): the tokens
    k = ECG_STEM_KERNEL
    return (2 * cfg.leads * k * cfg.stem_channels * t1, 2 * cfg.stem_channels * k * cfg.width * t2), t2


# projections that read a transformer layer's input (BERT/RoBERTa, Llama/Mistral/Qwen, Phi-3, GPT-2 names)
INPUT_PROJECTIONS = ("query", "key", "value", "q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn", "Wqkv")


def _linear_flops(lm: nn.Module) -> dict[str, float]:
    """FLOPs per token (2 * in * out) of a peft-wrapped LM's Linear layers: the frozen base, the LoRA
    adapters, and the parts of both that read the first layer's input."""
    out = {"base": 0.0, "lora": 0.0, "first_base": 0.0, "first_lora_down": 0.0}
    first = None
    for name, m in lm.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        flops = 2 * m.in_features * m.out_features
        lora = "lora_" in name
        out["lora" if lora else "base"] += flops
        parts = name.split(".")
        layer = next((int(p) for p in parts if p.isdigit()), None)
        first = layer if first is None else first
        if layer is not None and layer == first and any(p in INPUT_PROJECTIONS for p in parts):
            if not lora:
                out["first_base"] += flops
            elif "lora_A" in parts:
                out["first_lora_down"] += flops
    return out


def text_flops(lm: nn.Module, trains_below_first_layer: bool) -> tuple[float, float]:
    """(per-token, per-token^2) training FLOPs of a peft-wrapped LM with a frozen base.
    `trains_below_first_layer`: some parameter under the first layer trains (e.g. peft bias="all"
    trains the embeddings' LayerNorm bias), so the first layer's inputs need gradients too."""
    linear = _linear_flops(lm)
    per_token = 2 * linear["base"] + 3 * linear["lora"]  # frozen: forward + input gradient; LoRA: + weight gradient
    if not trains_below_first_layer:  # no input gradient for what reads the first layer's input
        per_token -= linear["first_base"] + linear["first_lora_down"]
    config = lm.config
    per_token2 = 3 * 4 * config.hidden_size * config.num_hidden_layers  # QK^T + AV: forward 1x, backward 2x
    return per_token, per_token2


def step_flops(model: nn.Module, cfg: ModelConfig) -> StepFlops:
    """Training FLOPs of `model` (a MoRE built from `cfg`), DropToken- and LoRA-aware."""
    fixed = 0.0
    for vit_cfg, (stem, patches) in ((cfg.cxr, cxr_stem_flops(cfg.cxr)), (cfg.ecg, ecg_stem_flops(cfg.ecg))):
        fixed += vit_train_flops(vit_cfg, stem, patches)
    for head in model.heads.values():
        fixed += 3 * sum(2 * m.in_features * m.out_features for m in head.modules() if isinstance(m, nn.Linear))
    text = model.encoders["text"].lm
    trains_below = any(p.requires_grad for n, p in text.named_parameters() if "embeddings" in n or "embed_tokens" in n)
    per_token, per_token2 = text_flops(text, trains_below)
    return StepFlops(fixed, per_token, per_token2)
