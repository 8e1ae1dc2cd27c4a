"""Typed experiment config: dataclass defaults < YAML file < dotted `key=value` overrides.

`load_config` merges the three once, checks every key and value, and returns a frozen `Config`.
Each builder receives only its slice (`cfg.data`, `cfg.model`, ...). Errors name the key.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from more_scale.data.storage import UnsupportedLocation, check_location

TEXT_PAIRINGS = ("joined", "pair")  # data.text_pairing: see tokenize_reports in data/reports.py

ECG_STEM_KERNEL = 5  # the paper's ECG stem: Conv1d(kernel 5, stride 5), then Conv1d(kernel 5, stride 1)


def ecg_stem_lengths(samples: int) -> tuple[int, int]:
    """Lengths after the paper's two stem convolutions of a `samples`-long lead; the second is the
    token count (1000 -> 200 -> 196)."""
    first = (samples - ECG_STEM_KERNEL) // ECG_STEM_KERNEL + 1
    return first, first - (ECG_STEM_KERNEL - 1)


class ConfigError(ValueError):
    """A config key or value is unknown, mistyped or impossible; the message names it."""


@dataclass(frozen=True)
class DataConfig:
    train: str = ""  # shard directory (holds shards.json) for training; several joined by "::" (mimic::ptbxl)
    train_weights: tuple[float, ...] = ()  # per train source, resampled mode; () = in proportion to their sizes
    mode: str = "resampled"  # resampled: with replacement, infinite | epoch: every sample once per pass (data/order.py)
    tokenizer: str = ""  # local tokenizer dir; "" = the one stored beside the shards (<train>/../tokenizer)
    batch_size: int = 8  # micro-batch per rank
    workers: int = 2  # loader processes per rank
    shuffle_block: int = 4096  # epoch mode: samples shuffled within blocks this long (after shuffling the shards)
    max_text_tokens: int = 256  # reports are padded per batch to the longest, truncated here
    # joined: one string "The report from Xray is: ... The report from ECG is: ...", right-truncated | pair: the two
    # reports as a tokenizer pair truncated longest-first (the reference), so a long X-ray report cannot push the ECG out
    text_pairing: str = "joined"
    seed: int = 0  # stream seed; rank and worker are mixed in
    max_skip_rate: float = 0.05  # stop training when more than this share of read samples is corrupt
    verify_shards: bool = False  # check every training shard's sha256 against shards.json before training
    validate: str = ""  # validation shard dir for train.eval_every; "" = the `validate` split beside data.train's first
    augment: bool = False  # the paper's training augmentations below (never in evaluation)
    cxr_crop_scale: tuple[float, ...] = (0.2, 1.0)  # RandomResizedCrop area range
    cxr_crop_p: float = 1.0  # RandomResizedCrop probability; otherwise evaluation's centre crop (reference: 0.8)
    cxr_jitter: float = 0.4  # ColorJitter brightness and contrast
    cxr_jitter_p: float = 1.0  # ColorJitter probability (reference: 0.8)
    cxr_blur_p: float = 0.5  # GaussianBlur probability (sigma 0.1-2)
    cxr_flip_p: float = 0.0  # the paper flips (0.5); off here: a mirrored film contradicts "left"/"right" in its report
    ecg_warp: float = 0.2  # time-warp: local speed 1 +- this (0 = off)
    ecg_segments: int = 5  # segment permutation: pieces shuffled (< 2 = off); one of the two per record
    ecg_none: bool = False  # a third, equally likely branch: the record as it is (the reference's no_aug)


@dataclass(frozen=True)
class VitConfig:
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    drop_token_keep: float = 1.0  # fraction of patch tokens kept in training (FLIP); 1.0 = off
    drop_key: float = 0.0  # DropKey rate on attention logits, training only (MoRE reference: 0.3)
    drop_key_schedule: str = "constant"  # constant | linear: p falls from drop_key (first block) to 0 (last), as DropKey
    attention: str = "auto"  # auto | flash_attn | xformers | sdpa | math (models/attention.py)
    grad_checkpoint: bool = False  # recompute each block in backward: activation memory for ~1/3 more compute
    norm_eps: float = 1e-6  # LayerNorm eps (timm 1e-6; Hugging Face ViT checkpoints use 1e-12)
    pretrained: str = ""  # local HF ViT directory or timm-style state dict (.pth/.safetensors); "" = random init


@dataclass(frozen=True)
class CxrConfig(VitConfig):
    image_size: int = 224
    patch_size: int = 16
    channels: int = 1  # grayscale stem; 3 repeats the gray channel like the reference


@dataclass(frozen=True)
class EcgConfig(VitConfig):
    leads: int = 12
    samples: int = 1000  # 10 s at 100 Hz -> 196 tokens through the paper's Conv1d stem
    stem_channels: int = 256  # first Conv1d width of the paper's stem
    stem_norm: str = "batch"  # batch (paper) | group: batch-independent, so N ranks equal 1 rank exactly
    stem: str = "conv"  # conv: the paper's Conv1d stem | patch: each lead cut into patch_samples-long tokens
    patch_samples: int = 50  # lead-by-time patch length (stem=patch): 12 leads x 1000/50 = 240 tokens


@dataclass(frozen=True)
class TextConfig:
    pretrained: str = ""  # local HF model dir (the frozen base); "" needs random_init: true
    random_init: bool = False  # no pretrained LM: random weights of the sizes below (tests, demo, sizing runs only)
    init_seed: int = 0  # the random LM's weights are a function of this and each parameter's name
    arch: str = "roberta"  # random init: roberta (encoder) | llama (decoder); a pretrained LM brings its own
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    kv_heads: int = 0  # llama: key/value heads (grouped-query attention); 0 = heads
    intermediate: int = 3072
    max_positions: int = 514  # RoBERTa counts padding_idx + 1 extra positions
    dropout: float = 0.1  # hidden and attention dropout of a randomly initialised LM
    lora_r: int = 16  # MoRE reference: r=16, alpha=8, dropout 0.1
    lora_alpha: int = 8
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] = ()  # () = per architecture: BERT/RoBERTa query,value; Llama/Mistral q_proj,v_proj
    pooling: str = "mean"  # mean over real tokens (encoders) | last: the last real token (decoder LLMs)
    lora_bias: str = "none"  # peft bias: none | all | lora_only (the reference trains all)
    grad_checkpoint: bool = False  # recompute each LM layer in backward (a 7B tower's activations otherwise dominate)


@dataclass(frozen=True)
class ModelConfig:
    cxr: CxrConfig = field(default_factory=CxrConfig)
    ecg: EcgConfig = field(default_factory=EcgConfig)
    text: TextConfig = field(default_factory=TextConfig)
    head_hidden: int = 768  # projection MLP hidden width (reference 768 -> 768 -> 128)
    embed_dim: int = 128  # shared space
    temperature: float = 0.02  # reference tau; learned through logit_scale when learn_temperature
    learn_temperature: bool = True
    max_logit_scale: float = 100.0  # clamp, as CLIP
    head: str = "layernorm"  # layernorm: batch-independent MLP | batchnorm | reference: no biases, ends in BatchNorm


@dataclass(frozen=True)
class LossConfig:
    text_cxr: float = 1.0  # weight of the symmetric text<->X-ray InfoNCE
    text_ecg: float = 1.0  # weight of the symmetric text<->ECG InfoNCE
    cxr_ecg: float = 0.0  # optional direct X-ray<->ECG term (absent in the reference)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # optimizer steps
    lr: float = 1e-4
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    schedule: str = "cosine"  # cosine: one decay over train.steps | cosine_restarts: restart every restart_steps (SGDR)
    restart_steps: int = 0  # cosine_restarts: the period of the restarts, in steps after warmup
    warmup_steps: int = 100
    weight_decay: float = 0.05
    decay_all: bool = False  # true: decay norms, biases, positions and the logit scale too (the reference's AdamW)
    betas: tuple[float, ...] = (0.9, 0.98)
    grad_accum: int = 1  # micro-batches per optimizer step
    # negatives under accumulation. micro: each micro-batch is scored against its own rows from every rank
    # (micro x world negatives). cached: open_clip's accum_freq: a no-grad forward of every micro-batch first,
    # then each is scored against all of them (micro x accum x world negatives: the large-batch loss), at the
    # cost of one extra forward per micro-batch
    accum_negatives: str = "micro"
    grad_clip: float = 1.0  # global norm; 0 = off
    deepspeed_config: str = "zero2"  # a file, or a shipped one by name: zero1 zero2 zero3 zero3_offload
    precision: str = "bf16"  # bf16 | fp32 (fp16 has no fast path on CPU and is not offered)
    save_every: int = 500  # checkpoint every N steps (and always at the end)
    keep_checkpoints: int = 2  # newest N kept on disk
    log_every: int = 10
    eval_every: int = 0  # validation loss + retrieval/zero-shot probe on data.validate every N steps; 0 = off
    stop_at_step: int = 0  # end this run early, with a checkpoint, at this step (schedule still spans `steps`); 0 = off
    resume: str = "none"  # none | auto (latest checkpoint in output_dir) | path to a checkpoint dir
    overwrite: bool = False  # resume=none into an output_dir holding checkpoints: delete them (else refused)
    seed: int = 0  # model init and dropout
    compile: bool = False  # torch.compile each tower in place (checkpoints unchanged); compiling takes minutes first
    collective_timeout_s: float = 600.0  # a collective waiting longer (dead or wedged rank) ends the job with an error
    # count host-device syncs (ops that block the host on CUDA) over this many steps from the third, by caller;
    # printed and written to metrics.jsonl (host_syncs_per_step); the audited steps run slower; 0 = off
    sync_audit_steps: int = 0
    max_bad_steps: int = 5  # this many steps in a row with a non-finite loss or skipped (non-finite) gradients: diverged


@dataclass(frozen=True)
class InputShape:
    """The inputs the model takes, which the loaders produce. Said once, in the model's config; the loaders
    get this small value beside their own slice (`input_shape(cfg.model)`)."""
    image_size: int  # X-ray side (random crop or centre crop from the stored image)
    ecg_samples: int  # ECG length (10 s at 100 Hz = 1000)


def input_shape(model: ModelConfig) -> InputShape:
    return InputShape(model.cxr.image_size, model.ecg.samples)


@dataclass(frozen=True)
class Config:
    output_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults < YAML at `path` < `overrides` ("train.steps=20"); validated and frozen. `path` is a file,
    or the name of a config shipped with the package (`tiny-cpu`, `base`, `configs/base.yaml`)."""
    tree: dict = {}
    if path is not None:
        resolved = resolve_path(str(path), "configs", ".yaml")
        if not resolved.is_file():
            raise FileNotFoundError(f"config {path}: no such file, nor a shipped config "
                                    f"(shipped: {', '.join(shipped('configs', '.yaml'))})")
        try:
            tree = yaml.safe_load(resolved.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as error:
            raise ConfigError(f"{resolved}: not UTF-8 text (byte {error.start}: {error.reason})") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{resolved}: not valid YAML ({' '.join(str(error).split())})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(tree).__name__}")
    apply_overrides(tree, overrides)
    cfg = build_section(Config, tree, "")
    validate(cfg)
    return cfg


def apply_overrides(tree: dict, overrides: typing.Sequence[str]) -> dict:
    """Set each "dotted.key=value" (the value read as YAML) in `tree`; returns it."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as error:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({' '.join(str(error).split())})") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def config_to_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_from_dict(tree: dict) -> Config:
    cfg = build_section(Config, tree, "")
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


PACKAGE_DIR = Path(__file__).resolve().parent  # configs/ and ds_configs/ ship inside the package


def resolve_path(path: str, folder: str = "ds_configs", suffix: str = ".json") -> Path:
    """A file as given when it exists; else one shipped with the package, found by its path under the
    package (`ds_configs/zero2.json`) or its name in `folder` (`zero2`, `zero2.json`). Works the same
    from a checkout and after a plain `pip install .`."""
    given = Path(path)
    if given.is_absolute() or given.exists():
        return given
    for candidate in (PACKAGE_DIR / path, PACKAGE_DIR / folder / path, PACKAGE_DIR / folder / f"{path}{suffix}"):
        if candidate.is_file():
            return candidate
    return given


def shipped(folder: str, suffix: str) -> list[str]:
    """Names of the files shipped in a package folder (configs, ds_configs)."""
    return sorted(p.stem for p in (PACKAGE_DIR / folder).glob(f"*{suffix}"))


def _set_dotted(tree: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is a value, not a section")
    node[leaf] = value


def build_section(cls, tree, prefix: str = ""):
    """One config dataclass (and its nested sections) from a mapping; errors name `prefix`+key."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a section (mapping), got {tree!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(tree) - names)
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (known in this section: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in tree.items():
        kwargs[name] = _coerce(hints[name], value, prefix + name)
    return cls(**kwargs)


def _coerce(hint, value, key: str):
    if dataclasses.is_dataclass(hint):
        return build_section(hint, value, key + ".")
    if typing.get_origin(hint) is tuple:
        (item_type, _) = typing.get_args(hint)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(item_type, v, key) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected float, got {value!r}") from None
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def validate(cfg: Config) -> None:
    """Every impossible combination, checked once, with the numbers that disagree."""
    d, m, t = cfg.data, cfg.model, cfg.train
    # ranges first: the checks below divide by some of these
    ranges = [(f"model.{name}.{field}", getattr(vit, field))
              for name, vit in (("cxr", m.cxr), ("ecg", m.ecg)) for field in ("width", "depth", "heads")]
    ranges += [("model.cxr.image_size", m.cxr.image_size), ("model.cxr.patch_size", m.cxr.patch_size),
               ("model.ecg.samples", m.ecg.samples), ("model.ecg.patch_samples", m.ecg.patch_samples),
               ("model.text.heads", m.text.heads), ("data.max_text_tokens", d.max_text_tokens),
               ("data.batch_size", d.batch_size)]
    for key, value in ranges:
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    early = [
        (m.ecg.leads == 12, f"model.ecg.leads must be 12 (the shards store the 12 standard leads), got {m.ecg.leads}"),
        (all(0 <= b < 1 for b in t.betas), f"train.betas must be two numbers in [0, 1), got {list(t.betas)}"),
        (t.collective_timeout_s >= 1, f"train.collective_timeout_s must be >= 1 second, got {t.collective_timeout_s}"),
    ] + [(0 <= getattr(d, p) <= 1, f"data.{p} must be in [0, 1], got {getattr(d, p)}")
         for p in ("cxr_flip_p", "cxr_blur_p", "cxr_jitter", "cxr_crop_p", "cxr_jitter_p")]
    for ok, message in early:
        if not ok:
            raise ConfigError(message)
    checks = [
        (d.batch_size >= 1, f"data.batch_size must be >= 1, got {d.batch_size}"),
        (d.workers >= 0, f"data.workers must be >= 0, got {d.workers}"),
        (0 <= d.max_skip_rate <= 1, f"data.max_skip_rate must be in [0, 1], got {d.max_skip_rate}"),
        (d.mode in ("resampled", "epoch"), f"data.mode must be resampled or epoch, got {d.mode!r}"),
        (d.shuffle_block >= 1, f"data.shuffle_block must be >= 1, got {d.shuffle_block}"),
        (not d.train_weights or len(d.train_weights) == len(d.train.split("::")),
         f"data.train_weights has {len(d.train_weights)} weights for {len(d.train.split('::'))} sources in data.train"),
        (not d.train_weights or d.mode == "resampled", "data.train_weights needs data.mode=resampled"),
        (len(d.cxr_crop_scale) == 2 and 0 < d.cxr_crop_scale[0] <= d.cxr_crop_scale[1] <= 1,
         f"data.cxr_crop_scale must be two numbers 0 < lo <= hi <= 1, got {d.cxr_crop_scale}"),
        (0 <= d.ecg_warp < 1, f"data.ecg_warp must be in [0, 1), got {d.ecg_warp}"),
        (d.max_text_tokens + 2 <= m.text.max_positions or bool(m.text.pretrained),
         f"data.max_text_tokens ({d.max_text_tokens}) + 2 exceeds model.text.max_positions ({m.text.max_positions})"),
        (m.cxr.image_size % m.cxr.patch_size == 0,
         f"model.cxr.image_size ({m.cxr.image_size}) is not a multiple of model.cxr.patch_size ({m.cxr.patch_size})"),
        (m.cxr.channels in (1, 3), f"model.cxr.channels must be 1 or 3, got {m.cxr.channels}"),
        (m.ecg.stem != "conv" or ecg_stem_lengths(m.ecg.samples)[1] >= 1,
         f"model.ecg.samples ({m.ecg.samples}) too short for the Conv1d stem (kernel {ECG_STEM_KERNEL}, twice)"),
        (m.text.hidden % m.text.heads == 0,
         f"model.text.hidden ({m.text.hidden}) is not divisible by model.text.heads ({m.text.heads})"),
        (m.ecg.stem_norm in ("batch", "group"), f"model.ecg.stem_norm must be batch or group, got {m.ecg.stem_norm!r}"),
        (m.ecg.stem in ("conv", "patch"), f"model.ecg.stem must be conv or patch, got {m.ecg.stem!r}"),
        (m.ecg.stem != "patch" or m.ecg.samples % m.ecg.patch_samples == 0,
         f"model.ecg.samples ({m.ecg.samples}) is not a multiple of model.ecg.patch_samples ({m.ecg.patch_samples})"),
        (m.head in ("layernorm", "batchnorm", "reference"),
         f"model.head must be layernorm, batchnorm or reference, got {m.head!r}"),
        (d.text_pairing in TEXT_PAIRINGS, f"data.text_pairing must be joined or pair, got {d.text_pairing!r}"),
        (t.schedule in ("cosine", "cosine_restarts"), f"train.schedule must be cosine or cosine_restarts, got {t.schedule!r}"),
        (t.schedule != "cosine_restarts" or t.restart_steps >= 1,
         f"train.schedule=cosine_restarts needs train.restart_steps >= 1, got {t.restart_steps}"),
        (m.text.pooling in ("mean", "last"), f"model.text.pooling must be mean or last, got {m.text.pooling!r}"),
        (m.text.arch in ("roberta", "llama"), f"model.text.arch must be roberta or llama, got {m.text.arch!r}"),
        (bool(m.text.pretrained) != m.text.random_init,
         "model.text.pretrained is empty: name a local LM directory (its frozen weights are the text tower), or set "
         "model.text.random_init=true for a random, frozen LM (tests and sizing runs: it learns nothing about language)"
         if not m.text.pretrained else "model.text.random_init=true and model.text.pretrained are both set: pick one"),
        (m.text.lora_bias in ("none", "all", "lora_only"),
         f"model.text.lora_bias must be none|all|lora_only, got {m.text.lora_bias!r}"),
        (m.temperature > 0, f"model.temperature must be > 0, got {m.temperature}"),
        (1.0 / m.temperature <= m.max_logit_scale,
         f"1/model.temperature ({1 / m.temperature:g}) exceeds model.max_logit_scale ({m.max_logit_scale})"),
        (cfg.loss.text_cxr + cfg.loss.text_ecg + cfg.loss.cxr_ecg > 0, "loss: every pair weight is 0"),
        (min(cfg.loss.text_cxr, cfg.loss.text_ecg, cfg.loss.cxr_ecg) >= 0, "loss: pair weights must be >= 0"),
        (t.steps >= 1, f"train.steps must be >= 1, got {t.steps}"),
        (0 <= t.warmup_steps <= t.steps, f"train.warmup_steps ({t.warmup_steps}) must be in [0, train.steps={t.steps}]"),
        (t.lr > 0, f"train.lr must be > 0, got {t.lr}"),
        (0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}"),
        (len(t.betas) == 2, f"train.betas needs two values, got {list(t.betas)}"),
        (t.grad_accum >= 1, f"train.grad_accum must be >= 1, got {t.grad_accum}"),
        (t.accum_negatives in ("micro", "cached"), f"train.accum_negatives must be micro or cached, got {t.accum_negatives!r}"),
        (t.grad_clip >= 0, f"train.grad_clip must be >= 0, got {t.grad_clip}"),
        (t.precision in ("bf16", "fp32"), f"train.precision must be bf16 or fp32, got {t.precision!r}"),
        (0 <= t.stop_at_step <= t.steps, f"train.stop_at_step ({t.stop_at_step}) must be in [0, train.steps={t.steps}]"),
        (t.save_every >= 1, f"train.save_every must be >= 1, got {t.save_every}"),
        (t.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}"),
        (t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every}"),
        (t.collective_timeout_s > 0, f"train.collective_timeout_s must be > 0, got {t.collective_timeout_s}"),
        (t.max_bad_steps >= 1, f"train.max_bad_steps must be >= 1, got {t.max_bad_steps}"),
        (t.eval_every >= 0, f"train.eval_every must be >= 0, got {t.eval_every}"),
        (t.sync_audit_steps >= 0, f"train.sync_audit_steps must be >= 0, got {t.sync_audit_steps}"),
    ]
    for vit_name, vit in (("cxr", m.cxr), ("ecg", m.ecg)):
        checks += [
            (vit.width % vit.heads == 0,
             f"model.{vit_name}.width ({vit.width}) is not divisible by model.{vit_name}.heads ({vit.heads})"),
            (0 < vit.drop_token_keep <= 1,
             f"model.{vit_name}.drop_token_keep must be in (0, 1], got {vit.drop_token_keep}"),
            (0 <= vit.drop_key < 1, f"model.{vit_name}.drop_key must be in [0, 1), got {vit.drop_key}"),
            (vit.drop_key_schedule in ("constant", "linear"),
             f"model.{vit_name}.drop_key_schedule must be constant or linear, got {vit.drop_key_schedule!r}"),
            (vit.attention in ("auto", "flash_attn", "xformers", "sdpa", "math"),
             f"model.{vit_name}.attention must be auto|flash_attn|xformers|sdpa|math, got {vit.attention!r}"),
            (not (vit.attention == "flash_attn" and vit.drop_key > 0),
             f"model.{vit_name}.attention=flash_attn cannot apply DropKey (drop_key={vit.drop_key}): use auto or xformers"),
        ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    for key, locations in (("data.train", d.train.split("::")), ("data.validate", [d.validate]),
                           ("data.tokenizer", [d.tokenizer])):
        try:
            for location in locations:
                check_location(location)
        except UnsupportedLocation as error:
            raise ConfigError(f"{key}: {error}") from None
    ds_path = resolve_path(t.deepspeed_config)
    if not ds_path.is_file():
        raise ConfigError(f"train.deepspeed_config: no such file {t.deepspeed_config} "
                          f"(shipped: {', '.join(shipped('ds_configs', '.json'))})")
    try:
        ds = json.loads(ds_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"train.deepspeed_config {ds_path}: not JSON ({error})") from None
    if not isinstance(ds, dict) or not isinstance(ds.get("zero_optimization"), dict):
        raise ConfigError(f"train.deepspeed_config {ds_path}: expected a JSON object with a "
                          f"\"zero_optimization\" object, got {type(ds).__name__}"
                          + (f" whose zero_optimization is {ds.get('zero_optimization')!r}" if isinstance(ds, dict) else ""))
    stage = ds["zero_optimization"].get("stage")
    if stage not in (1, 2, 3):
        raise ConfigError(f"train.deepspeed_config {t.deepspeed_config}: zero_optimization.stage must be 1, 2 or 3, "
                          f"got {stage!r}")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping", "fp16", "optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"train.deepspeed_config {t.deepspeed_config}: {key!r} belongs to the typed config "
                              "(data.batch_size, train.grad_accum, train.grad_clip, train.precision, train.lr)")
