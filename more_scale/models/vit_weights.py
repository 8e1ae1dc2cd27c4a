"""Pretrained ViT weights in: a local Hugging Face ViT directory (google/vit-base-patch16-224 layout,
safetensors) or a timm-style state dict file. Shapes are adapted where it is meaningful (RGB stem
summed to one gray channel, positional grid interpolated); everything else is reported, not hidden."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import load_file

from more_scale.models.vit import VisionTransformer, interpolate_pos


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)  # channel-summed stem, interpolated positions
    skipped: list[str] = field(default_factory=list)  # present in the file, shape does not fit this model
    missing: list[str] = field(default_factory=list)  # model parameters the file lacks (left as initialised)
    unexpected: list[str] = field(default_factory=list)  # file tensors this model has no place for

    def summary(self) -> str:
        parts = [f"{len(self.loaded)} loaded"]
        for name in ("adapted", "skipped", "missing", "unexpected"):
            values = getattr(self, name)
            if values:
                parts.append(f"{len(values)} {name} ({', '.join(values[:4])}{', ...' if len(values) > 4 else ''})")
        return "; ".join(parts)


def read_vit_file(path: str | Path) -> tuple[dict[str, torch.Tensor], tuple[int, ...] | None]:
    """timm-named state dict and the source's patch grid (None: infer from the position table)."""
    path = Path(path)
    if path.is_dir():
        config_file, weights = path / "config.json", path / "model.safetensors"
        if not config_file.is_file() or not weights.is_file():
            raise FileNotFoundError(f"{path}: expected a Hugging Face ViT directory (config.json + model.safetensors)")
        config = json.loads(config_file.read_text())
        side = config["image_size"] // config["patch_size"]
        return hf_to_timm(load_file(weights), config["num_hidden_layers"]), (side, side)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ViT weights file or directory")
    state = load_file(path) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    return dict(state), None


def hf_to_timm(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """transformers ViTModel names -> timm names; q, k, v fused into one qkv projection."""
    state = {k.removeprefix("vit."): v for k, v in state.items()}
    out = {"cls_token": state.pop("embeddings.cls_token"), "pos_embed": state.pop("embeddings.position_embeddings"),
           "patch_embed.proj.weight": state.pop("embeddings.patch_embeddings.projection.weight"),
           "patch_embed.proj.bias": state.pop("embeddings.patch_embeddings.projection.bias"),
           "norm.weight": state.pop("layernorm.weight"), "norm.bias": state.pop("layernorm.bias")}
    for i in range(depth):
        hf, timm = f"encoder.layer.{i}.", f"blocks.{i}."
        for suffix in ("weight", "bias"):
            out[f"{timm}attn.qkv.{suffix}"] = torch.cat(
                [state.pop(f"{hf}attention.attention.{n}.{suffix}") for n in ("query", "key", "value")])
            for src, dst in (("attention.output.dense", "attn.proj"), ("intermediate.dense", "mlp.fc1"),
                             ("output.dense", "mlp.fc2"), ("layernorm_before", "norm1"), ("layernorm_after", "norm2")):
                out[f"{timm}{dst}.{suffix}"] = state.pop(f"{hf}{src}.{suffix}")
    out.update(state)  # leftovers (pooler, classifier) are reported as unexpected
    return out


_TIMM_TO_OURS = {"cls_token": "cls", "pos_embed": "pos", "patch_embed.proj.weight": "stem.proj.weight",
                 "patch_embed.proj.bias": "stem.proj.bias"}


def load_vit_weights(vit: VisionTransformer, path: str | Path, console: Console | None = None) -> LoadReport:
    """Copy matching tensors into `vit`; returns (and prints) what was loaded, adapted, skipped, missing."""
    state, source_grid = read_vit_file(path)
    own = vit.state_dict()
    report, incoming = LoadReport(), {}
    for name, tensor in state.items():
        ours = _TIMM_TO_OURS.get(name, name)
        if ours not in own:
            report.unexpected.append(name)
            continue
        target = own[ours]
        if ours == "pos" and tensor.shape != target.shape:
            grid = source_grid or (int(math.isqrt(tensor.shape[1] - 1)),) * 2
            tensor = interpolate_pos(tensor, grid, vit.stem.grid)
            report.adapted.append(f"{name} {tuple(grid)}->{tuple(vit.stem.grid)}")
        elif ours == "stem.proj.weight" and tensor.dim() == 4 and target.dim() == 4 and tensor.shape[1] != target.shape[1] \
                and target.shape[1] == 1:
            tensor = tensor.sum(dim=1, keepdim=True)  # an RGB stem seeing a gray image repeated 3 times
            report.adapted.append(f"{name} RGB->gray")
        if tensor.shape != target.shape:
            report.skipped.append(f"{name} {tuple(tensor.shape)} vs {tuple(target.shape)}")
            continue
        incoming[ours] = tensor.to(target.dtype)
        report.loaded.append(ours)
    report.missing = sorted(set(own) - set(incoming))
    vit.load_state_dict(incoming, strict=False)
    (console or Console(stderr=True)).print(f"ViT weights from {path}: {report.summary()}")
    return report
