"""Memory per rank of a training config before running it: parameters, gradients, optimizer states and
activations under its ZeRO stage, precision and world size; whether it fits, and the largest micro-batch
that does.

The model is built on the `meta` device (no memory, seconds even for a 7B tower), so the parameter counts
are the real ones, split into trained and frozen. Model states follow DeepSpeed's own accounting
(deepspeed.runtime.zero.stage_1_and_2 / stage3 estimators: 16-bit weights and gradients, fp32 master
weights, the fp32 gradient the step reads and two Adam moments for what trains), but frozen parameters hold
only their 16-bit weights. What DeepSpeed allocates beside them is read from the run's ZeRO config with
DeepSpeed's defaults: gradient buckets of reduce_bucket_size elements allocated whole (double-buffered under
overlap_comm), and ZeRO-3's persistent parameters (up to stage3_param_persistence_threshold elements, whole
on every rank). Activations are counted per layer from what autograd keeps for the backward (Korthikanti
et al. 2022, "Reducing activation recomputation": about 17 tensors of N x width per transformer layer, plus
the attention scores the chosen kernel keeps), per tower, with DropToken's shorter sequences and activation
checkpointing. benchmarks/memory_plan.py compares the total with a real run's measured peak.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from more_scale.config import Config, ModelConfig, VitConfig
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


def sized_text(model_cfg: ModelConfig) -> tuple[ModelConfig, int | None]:
    """The config with a pretrained text LM's sizes read from its config.json (no weights; Mistral and Qwen2
    count like Llama) and its path dropped, and that LM's vocabulary (None without a pretrained LM)."""
    text = model_cfg.text
    if not text.pretrained:
        return model_cfg, None
    from transformers import AutoConfig

    lm = AutoConfig.from_pretrained(text.pretrained, local_files_only=True)
    text = dataclasses.replace(text, pretrained="", random_init=True,
                               arch="roberta" if lm.model_type in ("bert", "roberta", "xlm-roberta") else "llama",
                               hidden=lm.hidden_size, layers=lm.num_hidden_layers, heads=lm.num_attention_heads,
                               kv_heads=getattr(lm, "num_key_value_heads", 0) or 0, intermediate=lm.intermediate_size,
                               max_positions=lm.max_position_embeddings)
    return dataclasses.replace(model_cfg, text=text), lm.vocab_size


def count_parameters(model_cfg: ModelConfig, vocab: int, persistence_threshold: int = 0) -> dict[str, int]:
    """Trained and frozen parameter counts, the largest single parameter (ZeRO-3 gathers one layer's worth at
    a time) and the elements of parameters no larger than `persistence_threshold` (ZeRO-3 keeps those whole
    on every rank), from the model built on the meta device."""
    from more_scale.models.more import build_model

    model_cfg, lm_vocab = sized_text(model_cfg)
    text = dataclasses.replace(model_cfg.text, random_init=True)
    vits = {name: dataclasses.replace(getattr(model_cfg, name), pretrained="") for name in ("cxr", "ecg")}
    with torch.device("meta"):
        model = build_model(dataclasses.replace(model_cfg, text=text, **vits), lm_vocab or vocab, 1)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    largest = max(p.numel() for p in model.parameters())
    persistent = sum(p.numel() for p in model.parameters() if p.numel() <= persistence_threshold)
    return {"trained": trained, "frozen": frozen, "largest": largest, "persistent": persistent}


def attention_score_bytes(backend: str, drop_key: bool, weight_bytes: int, device_type: str) -> float:
    """Bytes autograd keeps per attention score (per head, query and key) for the backward. Fused kernels keep
    none (only per-row softmax statistics); SDPA and xformers keep a DropKey mask (bool / bias); the written-out
    path keeps its fp32 softmax, that softmax cast to the compute dtype, and the mask. `auto` is planned as what
    it picks on the device: fused kernels on a GPU (triton_dropkey with DropKey), and on a CPU the written-out
    path, the largest of its candidates (it wins the bf16 step on AVX-512 BF16 CPUs)."""
    if backend == "auto":
        backend = "fused" if device_type == "cuda" else "math"
    if backend == "math":
        return 4 + (weight_bytes if weight_bytes != 4 else 0) + (1 if drop_key else 0)
    if drop_key and backend in ("sdpa", "xformers"):
        return 1 if backend == "sdpa" else weight_bytes
    return 0.0


def _layer_activations(tokens: int, width: int, heads: int, hidden: int, weight_bytes: int,
                       score_bytes: float) -> float:
    """Bytes autograd keeps for one transformer layer's backward, per sample: the layer's input, the norms'
    and projections' inputs, q/k/v, the MLP's (4 x wider) inputs: ~9 x N x width + 3 x N x hidden values,
    the attention scores the kernel keeps, and its per-row softmax statistics."""
    return (9 * width + 3 * hidden) * tokens * weight_bytes + heads * tokens * (tokens * score_bytes + 4)


def _tower(layers: int, tokens: int, width: int, heads: int, hidden: int, weight_bytes: int, checkpoint: bool,
           score_bytes: float) -> float:
    per_layer = _layer_activations(tokens, width, heads, hidden, weight_bytes, score_bytes)
    if checkpoint:  # each layer's input kept; one layer's full set alive while it is recomputed
        return layers * tokens * width * weight_bytes + per_layer
    return layers * per_layer


def activations_per_sample(cfg: ModelConfig, text_tokens: int, weight_bytes: int, device_type: str = "cuda") -> float:
    cfg, _ = sized_text(cfg)
    out = 0.0
    for vit, (_, patches) in ((cfg.cxr, cxr_stem_flops(cfg.cxr)), (cfg.ecg, ecg_stem_flops(cfg.ecg))):
        vit: VitConfig
        tokens = max(1, round(patches * vit.drop_token_keep)) + 1
        score_bytes = attention_score_bytes(vit.attention, vit.drop_key > 0, weight_bytes, device_type)
        out += _tower(vit.depth, tokens, vit.width, vit.heads, int(vit.width * vit.mlp_ratio), weight_bytes,
                      vit.grad_checkpoint, score_bytes)
        out += patches * vit.width * weight_bytes * 2  # the stem's output and the gathered tokens
    t = cfg.text
    out += _tower(t.layers, text_tokens, t.hidden, t.heads, t.intermediate, weight_bytes, t.grad_checkpoint, 0.0)  # HF SDPA
    return out


def plan(cfg: Config, world: int, device_bytes: float, vocab: int = 50265, device_type: str = "cuda") -> Plan:
    """Bytes per rank as DeepSpeed lays them out (its ZeRO config read with DeepSpeed's own defaults)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from more_scale.train.engine import deepspeed_config

    ds = deepspeed_config(cfg.train, cfg.data.batch_size, world)  # the JSON as training completes it for `world`
    zero = DeepSpeedZeroConfig(**ds.get("zero_optimization", {}))
    stage = int(zero.stage)
    offload = zero.offload_optimizer is not None and zero.offload_optimizer.device != "none"
    bf16 = cfg.train.precision == "bf16"
    w = 2 if bf16 else 4
    model_cfg, lm_vocab = sized_text(cfg.model)  # a pretrained LM's config read once, for both counts below
    counts = count_parameters(model_cfg, lm_vocab or vocab, zero.param_persistence_threshold if stage == 3 else 0)
    trained, frozen = counts["trained"], counts["frozen"]
    shard = world if stage >= 1 else 1
    rows = {
        "weights (trained)": trained * w / (world if stage == 3 else 1),
        "weights (frozen base)": frozen * w / (world if stage == 3 else 1),
        "gradients": trained * w / (world if stage >= 2 else 1),
        # Adam's two moments; fp32 master weights (ZeRO copies them even in fp32) and, in bf16, the fp32 gradient
        # the step reads; partitioned by ZeRO
        "optimizer states": 0.0 if offload else trained * (8 + (8 if bf16 else 4 if stage >= 1 else 0)) / shard,
    }
    if stage == 3:
        # parameters up to stage3_param_persistence_threshold elements stay whole on every rank (beside their part)
        rows["ZeRO-3 persistent parameters"] = counts["persistent"] * w
        rows["ZeRO-3 gathered layer"] = 4.0 * counts["largest"]  # DeepSpeed's estimator: 4 bytes per parameter
    if stage >= 1 and zero.contiguous_gradients:
        # gradients are staged in buckets of reduce_bucket_size elements, allocated whole (two when overlap_comm
        # double-buffers them under ZeRO 1/2): at small model sizes the largest single item
        buffers = 2 if stage < 3 and zero.overlap_comm else 1
        rows["gradient reduction buckets"] = float(zero.reduce_bucket_size) * w * buffers
    if device_type == "cuda":
        rows["runtime (CUDA context, NCCL)"] = RUNTIME_BYTES
    per_sample = activations_per_sample(model_cfg, cfg.data.max_text_tokens, w, device_type)
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
