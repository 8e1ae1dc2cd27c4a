"""MoRE: X-ray ViT, ECG ViT and LoRA text tower, each with a projection head into one space."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from more_scale.batch import Batch
from more_scale.config import ModelConfig
from more_scale.models.text import build_text_encoder
from more_scale.models.vit import Fp32BatchNorm1d, build_cxr_encoder, build_ecg_encoder
from more_scale.models.vit_weights import load_vit_weights

MODALITIES = ("cxr", "ecg", "text")


def projection_head(width: int, hidden: int, out: int, kind: str = "layernorm") -> nn.Module:
    """layernorm: batch-independent MLP (default) | batchnorm: Linear-BN-ReLU-Linear | reference: the MoRE
    reference's head, without biases and ending in BatchNorm over the output (BN in fp32; converted to
    SyncBatchNorm on GPUs when distributed, see train/loop.py)."""
    if kind == "reference":
        return nn.Sequential(nn.Linear(width, hidden, bias=False), Fp32BatchNorm1d(hidden), nn.ReLU(),
                             nn.Linear(hidden, out, bias=False), Fp32BatchNorm1d(out))
    if kind == "batchnorm":
        return nn.Sequential(nn.Linear(width, hidden), Fp32BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, out))
    return nn.Sequential(nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, out))


class MoRE(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_token_id: int, base_context=contextlib.nullcontext):
        super().__init__()
        self.cxr_channels = cfg.cxr.channels
        self.encoders = nn.ModuleDict({
            "cxr": build_cxr_encoder(cfg.cxr),
            "ecg": build_ecg_encoder(cfg.ecg),
            "text": build_text_encoder(cfg.text, vocab_size, pad_token_id, base_context),
        })
        for name, vit_cfg in (("cxr", cfg.cxr), ("ecg", cfg.ecg)):
            if vit_cfg.pretrained:  # optional: the MoRE reference builds both towers from random weights
                load_vit_weights(self.encoders[name], vit_cfg.pretrained)
        self.heads = nn.ModuleDict({m: projection_head(self.encoders[m].width, cfg.head_hidden, cfg.embed_dim, cfg.head)
                                    for m in MODALITIES})
        # log(1/tau), as CLIP; exp() clamped at max_logit_scale in `scale()`. Shape (1,): DeepSpeed's
        # bf16 broadcast cannot view a 0-dim tensor as bytes.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / cfg.temperature)),
                                        requires_grad=cfg.learn_temperature)
        self.max_log_scale = math.log(cfg.max_logit_scale)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.float().clamp(max=self.max_log_scale).exp()

    def project(self, modality: str, *inputs: torch.Tensor) -> torch.Tensor:
        """One tower and its head on model inputs, before normalisation (B, D). cxr: images (B, C, H, W);
        ecg: signals (B, 12, T); text: token ids and attention mask (B, L) each."""
        if modality == "cxr":
            image = inputs[0]
            if self.cxr_channels == 3 and image.shape[1] == 1:
                image = image.expand(-1, 3, -1, -1)  # grayscale repeated, as the reference
            features = self.encoders["cxr"](image)
        else:
            features = self.encoders[modality](*inputs)
        return self.heads[modality](features)

    def encode(self, modality: str, *inputs: torch.Tensor) -> torch.Tensor:
        """`project`, as unit-norm fp32 embeddings (B, D)."""
        return F.normalize(self.project(modality, *inputs).float(), dim=-1)

    def embed(self, modality: str, batch: Batch) -> torch.Tensor:
        """`encode` on a Batch's inputs for `modality`."""
        inputs = {"cxr": (batch.cxr,), "ecg": (batch.ecg,), "text": (batch.input_ids, batch.attention_mask)}
        return self.encode(modality, *inputs[modality])

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Embeddings per modality and the logit scale; rows of a missing modality are computed on zeros
        and masked later by the loss (static shapes, no per-rank branching)."""
        out = {m: self.embed(m, batch) for m in MODALITIES}
        out["logit_scale"] = self.scale()  # returned, not read outside: under ZeRO-3 the param is partitioned
        return out


def build_model(cfg: ModelConfig, vocab_size: int, pad_token_id: int, base_context=contextlib.nullcontext) -> MoRE:
    """`base_context`: where the frozen text LM is built (training passes ZeRO-3's partitioned construction, so
    no rank holds a whole 7B base); the towers, heads and LoRA adapters are built whole and partitioned by the
    engine."""
    return MoRE(cfg, vocab_size, pad_token_id, base_context)


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (whole counts of ZeRO-3-partitioned parameters)."""
    def count(p: nn.Parameter) -> int:
        return getattr(p, "ds_numel", p.numel())
    total = sum(count(p) for p in model.parameters())
    return sum(count(p) for p in model.parameters() if p.requires_grad), total
