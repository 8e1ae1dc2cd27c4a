"""Text tower: a Hugging Face LM, frozen, with peft LoRA adapters; mean- or last-token-pooled."""

from __future__ import annotations

import contextlib
import zlib

import numpy as np
import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModel, LlamaConfig, RobertaConfig

from more_scale.config import TextConfig

# LoRA on the attention query/value projections, as the MoRE reference (r 16) and LoRA's paper
DEFAULT_LORA_TARGETS = {
    "bert": ("query", "value"), "roberta": ("query", "value"), "xlm-roberta": ("query", "value"),
    "llama": ("q_proj", "v_proj"), "mistral": ("q_proj", "v_proj"), "qwen2": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"), "phi3": ("qkv_proj",),
}
_ENCODERS = ("bert", "roberta", "xlm-roberta")  # have a pooler we do not use


class TextEncoder(nn.Module):
    def __init__(self, lm: nn.Module, width: int, pooling: str, causal: bool):
        super().__init__()
        self.lm, self.width, self.pooling, self.causal = lm, width, pooling, causal

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.lm(input_ids=input_ids, attention_mask=self._sdpa_mask(attention_mask)).last_hidden_state  # (B, L, W)
        if self.pooling == "last":  # decoder LLMs: the last real token has read the whole report (right padding)
            last = attention_mask.sum(1).clamp(min=1) - 1
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # mean over real tokens

    def _sdpa_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """The boolean 4D mask SDPA takes (True = attend), built here: handed the 2D padding mask, transformers
        first asks `padding_mask.all()` (a host-device sync every forward) to skip the mask when nothing is
        padded, which a batch of reports of different lengths almost never is. transformers uses a 4D mask
        as it is. Decoders also mask the future (right padding: every query row keeps key 0)."""
        keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L)
        if self.causal:
            length = attention_mask.shape[1]
            keep = keep & torch.ones(length, length, dtype=torch.bool, device=keep.device).tril()  # (B, 1, L, L)
        return keep


def lora_targets(cfg: TextConfig, model_type: str) -> list[str]:
    if cfg.lora_targets:
        return list(cfg.lora_targets)
    if model_type not in DEFAULT_LORA_TARGETS:
        raise ValueError(f"model.text.lora_targets: no default for model type {model_type!r}; "
                         f"name the modules (known defaults: {sorted(DEFAULT_LORA_TARGETS)})")
    return list(DEFAULT_LORA_TARGETS[model_type])


def load_language_model(cfg: TextConfig, vocab_size: int, pad_token_id: int) -> nn.Module:
    """Local pretrained LM (cfg.pretrained), or a random one of cfg's sizes and `arch` (tests, demo, sizing).
    Under ZeRO-3 the caller holds deepspeed.zero.Init (and transformers' HfDeepSpeedConfig), so the
    weights are partitioned as they are made or loaded: no rank holds the whole LM."""
    if cfg.pretrained:
        model_type = AutoConfig.from_pretrained(cfg.pretrained, local_files_only=True).model_type
        extra = {"add_pooling_layer": False} if model_type in _ENCODERS else {}
        return AutoModel.from_pretrained(cfg.pretrained, local_files_only=True, attn_implementation="sdpa", **extra)
    if not cfg.random_init:
        raise ValueError("model.text: no pretrained LM and random_init is false (a random frozen LM knows no language)")
    if cfg.arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads or cfg.heads,
            intermediate_size=cfg.intermediate, max_position_embeddings=cfg.max_positions,
            pad_token_id=pad_token_id, attention_dropout=cfg.dropout)
        extra = {}
    else:
        config = RobertaConfig(
            vocab_size=vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads, intermediate_size=cfg.intermediate,
            max_position_embeddings=cfg.max_positions, pad_token_id=pad_token_id,
            hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout)
        extra = {"add_pooling_layer": False}
    # from_config, not the class: under ZeRO-3 transformers builds it partitioned itself (its own weight
    # initialisation cannot run on partitioned tensors); the values are then set by seeded_init
    lm = AutoModel.from_config(config, attn_implementation="sdpa", **extra)
    seeded_init(lm, cfg.init_seed)
    return lm


def _writable(params: list[nn.Parameter]):
    """Whole, writable parameters: ZeRO-3-partitioned ones are gathered and re-partitioned from rank 0's
    values on exit; others need nothing."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)


@torch.no_grad()
def seeded_init(lm: nn.Module, seed: int) -> None:
    """A random LM's weights from (seed, parameter name) alone: N(0, 0.02) matrices and embeddings (the
    padding row 0), norm weights 1, biases 0. The same values whether the LM is built whole or partitioned
    (ZeRO-3), on any device, whatever else drew from torch's RNG before, so evaluation rebuilds the
    training run's frozen base exactly."""
    norms = {name for name, m in lm.named_modules() if "norm" in type(m).__name__.lower()}
    pad = lm.config.pad_token_id
    for name, param in lm.named_parameters():
        if param.is_meta:  # sizing on the meta device (launch/plan.py): no values to set
            continue
        owner, _, leaf = name.rpartition(".")
        with _writable([param]):
            if leaf == "bias":
                param.zero_()
            elif owner in norms:
                param.fill_(1.0)
            else:
                # numpy, not torch: inside deepspeed.zero.Init torch's constructors make bf16 tensors, and a
                # value rounded twice would differ from the one an fp32 rebuild rounds once
                rng = np.random.default_rng(seed * 1_000_003 + zlib.crc32(name.encode()))
                param.copy_(torch.from_numpy(rng.standard_normal(tuple(param.shape), dtype=np.float32) * np.float32(0.02)))
                if "embed" in name and "position" not in name and pad is not None and pad < param.shape[0]:
                    param[pad] = 0.0


def build_text_encoder(cfg: TextConfig, vocab_size: int, pad_token_id: int,
                       base_context=contextlib.nullcontext) -> TextEncoder:
    """The LM with its base frozen and LoRA adapters (and optionally biases) trainable. `base_context`: where
    the base LM is built (training passes ZeRO-3's partitioned construction); the small LoRA adapters are
    added outside it, as ordinary tensors that the engine partitions later (peft re-casts adapters to the
    base's dtype, which a partitioned parameter does not survive)."""
    with base_context():
        lm = load_language_model(cfg, vocab_size, pad_token_id)
    if cfg.grad_checkpoint:  # recompute each layer in backward; non-reentrant: works with frozen inputs and LoRA
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=lora_targets(cfg, lm.config.model_type), bias=cfg.lora_bias)
    return TextEncoder(get_peft_model(lm, lora), lm.config.hidden_size, cfg.pooling,
                       causal=lm.config.model_type not in _ENCODERS)
