"""Text tower: a Hugging Face LM, frozen, with peft LoRA adapters; mean- or last-token-pooled."""

from __future__ import annotations

import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModel, RobertaConfig, RobertaModel

from more_scale.config import TextConfig

# LoRA on the attention query/value projections, as the MoRE reference (r 16) and LoRA's paper
DEFAULT_LORA_TARGETS = {
    "bert": ("query", "value"), "roberta": ("query", "value"), "xlm-roberta": ("query", "value"),
    "llama": ("q_proj", "v_proj"), "mistral": ("q_proj", "v_proj"), "qwen2": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"), "phi3": ("qkv_proj",),
}
_ENCODERS = ("bert", "roberta", "xlm-roberta")  # have a pooler we do not use


class TextEncoder(nn.Module):
    def __init__(self, lm: nn.Module, width: int, pooling: str):
        super().__init__()
        self.lm, self.width, self.pooling = lm, width, pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.lm(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, W)
        if self.pooling == "last":  # decoder LLMs: the last real token has read the whole report (right padding)
            last = attention_mask.sum(1).clamp(min=1) - 1
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # mean over real tokens


def lora_targets(cfg: TextConfig, model_type: str) -> list[str]:
    if cfg.lora_targets:
        return list(cfg.lora_targets)
    if model_type not in DEFAULT_LORA_TARGETS:
        raise ValueError(f"model.text.lora_targets: no default for model type {model_type!r}; "
                         f"name the modules (known defaults: {sorted(DEFAULT_LORA_TARGETS)})")
    return list(DEFAULT_LORA_TARGETS[model_type])


def load_language_model(cfg: TextConfig, vocab_size: int, pad_token_id: int) -> nn.Module:
    """Local pretrained LM (cfg.pretrained) or a random RoBERTa of cfg's sizes (tests, demo)."""
    if cfg.pretrained:
        model_type = AutoConfig.from_pretrained(cfg.pretrained, local_files_only=True).model_type
        extra = {"add_pooling_layer": False} if model_type in _ENCODERS else {}
        return AutoModel.from_pretrained(cfg.pretrained, local_files_only=True, attn_implementation="sdpa", **extra)
    return RobertaModel(RobertaConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, intermediate_size=cfg.intermediate,
        max_position_embeddings=cfg.max_positions, pad_token_id=pad_token_id,
        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
        attn_implementation="sdpa"), add_pooling_layer=False)


def build_text_encoder(cfg: TextConfig, vocab_size: int, pad_token_id: int) -> TextEncoder:
    """The LM with its base frozen and LoRA adapters (and optionally biases) trainable."""
    lm = load_language_model(cfg, vocab_size, pad_token_id)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=lora_targets(cfg, lm.config.model_type), bias=cfg.lora_bias)
    return TextEncoder(get_peft_model(lm, lora), lm.config.hidden_size, cfg.pooling)
