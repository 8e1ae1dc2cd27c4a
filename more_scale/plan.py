"""Memory per rank of a training config before running it: parameters, gradients, optimizer states and
activations under its ZeRO stage, precision and world size; whether it fits, and the largest micro-batch
that does.

The model is built on the `meta` device (no memory, seconds even for a 7B tower), so the parameter counts
are the real ones, split into trained and frozen. Model states follow DeepSpeed's own accounting
(deepspeed.runtime.zero.stage_1_and_2 / stage3 estimators: 16-bit weights and gradients, fp32 master
weights, fp32 gradient accumulation and two Adam moments for what trains), but frozen parameters hold
only their 16-bit weights. Activations are counted per layer from what autograd keeps for the backward
(Korthikanti et al. 2022, "Reducing activation recomputation": about 17 tensors of N x width per
transformer layer, plus the attention probabilities where a kernel materialises them), per tower, with
DropToken's shorter sequences and activation checkpointing.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch

from more_scale.config import Config, ModelConfig, VitConfig, resolve_path
from more_scale.models.flops import cxr_stem_flops, ecg_stem_flops

FRAGMENTATION = 0.9  # use at most this share of a device: allocator fragmentation and the CUDA context
RUNTIME_BYTES = 0.75 * 2**30  # CUDA context, NCCL buffers, kernels: measured ~0.6-0.9 GiB per GPU process


@dataclass
class Plan:
    rows: dict[str, float]  # bytes per rank by what holds them
    activations_per_sample: float  # bytes
    fixed: float  # bytes that do not grow with the micro-batch
    budget: float  # usable bytes on one device
    micro_batch: int

    @property
    def total(self) -> float:
        return self.fixed + self.activations_per_sample * self.micro_batch

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    @property
    def largest_micro_batch(self) -> int:
        return max(0, int((self.budget - self.fixed) // max(self.activations_per_sample, 1.0)))


def parse_bytes(text: str) -> float:
    units = {"gib": 2**30, "gb": 1e9, "mib": 2**20, "mb": 1e6, "tib": 2**40}
    low = text.strip().lower()
    for unit, scale in units.items():
        if low.endswith(unit):
            return float(low[: -len(unit)]) * scale
    return float(low)


def count_parameters(model_cfg: ModelConfig, vocab: int) -> dict[str, int]:
    """Trained and frozen parameter counts, and the largest single parameter (ZeRO-3 gathers one layer's
    worth at a time), from the model built on the meta device."""
    from more_scale.models.more import build_model

    text = model_cfg.text
    if text.pretrained:  # its sizes from its config, no weights read (Mistral, Qwen2 count like Llama)
        from transformers import AutoConfig

        lm = AutoConfig.from_pretrained(text.pretrained, local_files_only=True)
        vocab = lm.vocab_size
        text = dataclasses.replace(text, arch="roberta" if lm.model_type in ("bert", "roberta", "xlm-roberta") else "llama",
                                   hidden=lm.hidden_size, layers=lm.num_hidden_layers, heads=lm.num_attention_heads,
                                   kv_heads=getattr(lm, "num_key_value_heads", 0) or 0,
                                   intermediate=lm.intermediate_size,
                                   max_positions=lm.max_position_embeddings)
    text = dataclasses.replace(text, pretrained="", random_init=True)
    vits = {name: dataclasses.replace(getattr(model_cfg, name), pretrained="") for name in ("cxr", "ecg")}
    with torch.device("meta"):
        model = build_model(dataclasses.replace(model_cfg, text=text, **vits), vocab, 1)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    largest = max(p.numel() for p in model.parameters())
    return {"trained": trained, "frozen": frozen, "largest": largest}


def _layer_activations(tokens: int, width: int, heads: int, hidden: int, weight_bytes: int,
                       materialised_attention: bool) -> float:
    """Bytes autograd keeps for one transformer layer's backward, per sample: the layer's input, the norms'
    and projections' inputs, q/k/v, the MLP's (4 x wider) inputs: ~9 x N x width + 3 x N x hidden values."""
    saved = (9 * width + 3 * hidden) * tokens * weight_bytes
    if materialised_attention:  # probabilities (and a DropKey mask) per head
        saved += heads * tokens * tokens * (weight_bytes + 1)
    else:  # fused kernels keep only the softmax statistics
        saved += heads * tokens * 4
    return saved


def _tower(layers: int, tokens: int, width: int, heads: int, hidden: int, weight_bytes: int, checkpoint: bool,
           materialised: bool) -> float:
    per_layer = _layer_activations(tokens, width, heads, hidden, weight_bytes, materialised)
    if checkpoint:  # each layer's input kept; one layer's full set alive while it is recomputed
        return layers * tokens * width * weight_bytes + per_layer
    return layers * per_layer


def activations_per_sample(cfg: ModelConfig, text_tokens: int, weight_bytes: int, materialised: bool) -> float:
    out = 0.0
    for vit, (_, patches) in ((cfg.cxr, cxr_stem_flops(cfg.cxr)), (cfg.ecg, ecg_stem_flops(cfg.ecg))):
        vit: VitConfig
        tokens = max(1, round(patches * vit.drop_token_keep)) + 1
        out += _tower(vit.depth, tokens, vit.width, vit.heads, int(vit.width * vit.mlp_ratio), weight_bytes,
                      vit.grad_checkpoint, materialised and vit.drop_key > 0)
        out += patches * vit.width * weight_bytes * 2  # the stem's output and the gathered tokens
    t = cfg.text
    hidden, width, layers, heads = t.intermediate, t.hidden, t.layers, t.heads
    if t.pretrained:
        from transformers import AutoConfig

        lm = AutoConfig.from_pretrained(t.pretrained, local_files_only=True)
        hidden, width, layers, heads = lm.intermediate_size, lm.hidden_size, lm.num_hidden_layers, lm.num_attention_heads
    out += _tower(layers, text_tokens, width, heads, hidden, weight_bytes, t.grad_checkpoint, False)
    return out


def plan(cfg: Config, world: int, device_bytes: float, vocab: int = 50265) -> Plan:
    ds = json.loads(resolve_path(cfg.train.deepspeed_config).read_text())
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    offload = zero.get("offload_optimizer", {}).get("device", "none") != "none"
    bf16 = cfg.train.precision == "bf16"
    w = 2 if bf16 else 4
    counts = count_parameters(cfg.model, vocab)
    trained, frozen = counts["trained"], counts["frozen"]
    shard = world if stage >= 1 else 1
    rows = {
        "weights (trained)": trained * w / (world if stage == 3 else 1),
        "weights (frozen base)": frozen * w / (world if stage == 3 else 1),
        "gradients": trained * w / (world if stage >= 2 else 1),
        # fp32 master weights + fp32 gradient accumulation (bf16 only) and Adam's two moments, partitioned by ZeRO
        "optimizer states": 0.0 if offload else trained * ((4 + 4 + 8) if bf16 else 8) / shard,
    }
    if stage == 3:  # a gathered layer (DeepSpeed's estimator: 4 bytes per parameter of the largest layer)
        rows["ZeRO-3 gathered layer"] = 4.0 * counts["largest"]
    elif stage in (1, 2) and zero.get("contiguous_gradients", False):
        rows["gradient reduction bucket"] = min(float(zero.get("reduce_bucket_size", 5e8)), trained) * w
    rows["runtime (CUDA context, NCCL)"] = RUNTIME_BYTES
    per_sample = activations_per_sample(cfg.model, cfg.data.max_text_tokens, w, materialised=False)
    return Plan(rows, per_sample, sum(rows.values()), device_bytes * FRAGMENTATION, cfg.data.batch_size)


def report(p: Plan, world: int, config_path: str) -> str:
    gib = 2**30
    lines = [f"{config_path} on {world} ranks: bytes per rank", "", "| what | GiB |", "|---|---|"]
    lines += [f"| {name} | {value / gib:.2f} |" for name, value in p.rows.items()]
    lines += [f"| activations ({p.micro_batch} samples x {p.activations_per_sample / gib:.3f}) | "
              f"{p.activations_per_sample * p.micro_batch / gib:.2f} |",
              f"| **total** | **{p.total / gib:.2f}** |", "",
              f"usable per device ({FRAGMENTATION:.0%}): {p.budget / gib:.1f} GiB -> "
              f"{'fits' if p.fits else 'does NOT fit'}; largest micro-batch that fits: {p.largest_micro_batch}"]
    return "\n".join(lines)
