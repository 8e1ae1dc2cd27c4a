"""Text tower: a Hugging Face encoder LM, frozen, with peft LoRA adapters; mean-pooled output."""

from __future__ import annotations

import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model
from transformers import AutoModel, RobertaConfig, RobertaModel

from more_scale.config import TextConfig


class TextEncoder(nn.Module):
    def __init__(self, lm: nn.Module, width: int):
        super().__init__()
        self.lm, self.width = lm, width

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.lm(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, W)
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # mean over real tokens


def build_text_encoder(cfg: TextConfig, vocab_size: int, pad_token_id: int) -> TextEncoder:
    """Local pretrained LM (cfg.pretrained) or a random RoBERTa of cfg's sizes; LoRA on top, base frozen."""
    if cfg.pretrained:
        lm = AutoModel.from_pretrained(cfg.pretrained, local_files_only=True, add_pooling_layer=False)
    else:
        lm = RobertaModel(RobertaConfig(
            vocab_size=vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads, intermediate_size=cfg.intermediate,
            max_position_embeddings=cfg.max_positions, pad_token_id=pad_token_id,
            hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
            attn_implementation="sdpa"), add_pooling_layer=False)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_targets), bias=cfg.lora_bias)
    return TextEncoder(get_peft_model(lm, lora), lm.config.hidden_size)
