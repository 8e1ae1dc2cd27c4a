"""Vision Transformer with DropToken and DropKey; image (Conv2d) and ECG (paper's Conv1d, or
lead-by-time patches) stems. Module names follow timm's ViT (blocks.i.attn.qkv, mlp.fc1, ...) so
timm-style state dicts load with few renames (models/vit_weights.py)."""

from __future__ import annotations

import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from more_scale.config import ECG_STEM_KERNEL, CxrConfig, EcgConfig, VitConfig, ecg_stem_lengths
from more_scale.models.attention import attention


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, drop_key: float, backend: str):
        super().__init__()
        self.heads, self.drop_key, self.backend = heads, drop_key, backend
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.recorder: list | None = None  # eval/explain.py: keep each call's attention probabilities and their gradient

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, W)
        b, n, w = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, N, D) each
        if self.recorder is not None:  # relevance maps need the probabilities themselves: the written-out path
            probs = torch.softmax((q @ k.transpose(-2, -1)).float() * q.shape[-1] ** -0.5, dim=-1)
            probs.retain_grad()
            self.recorder.append(probs)
            out = probs.to(v.dtype) @ v
        else:
            out = attention(q, k, v, drop_key=self.drop_key, training=self.training, backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(b, n, w))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; DropKey lives in the attention call."""

    def __init__(self, cfg: VitConfig, drop_key: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.attn = Attention(cfg.width, cfg.heads, drop_key, cfg.attention)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg.width, int(cfg.width * cfg.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def drop_key_rates(cfg: VitConfig) -> list[float]:
    """Per-block DropKey rate: constant, or linear from cfg.drop_key in the first block to 0 in the last."""
    if cfg.drop_key_schedule == "constant" or cfg.depth == 1:
        return [cfg.drop_key] * cfg.depth
    return [cfg.drop_key * (1 - i / (cfg.depth - 1)) for i in range(cfg.depth)]


class PatchStem2d(nn.Module):
    """Non-overlapping square patches -> tokens (B, N, width)."""

    def __init__(self, channels: int, width: int, patch: int, image_size: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, width, patch, stride=patch)
        self.grid = (image_size // patch, image_size // patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class _Fp32Statistics:
    """A BatchNorm whose running statistics stay fp32 when the weights are cast to bf16, computed in fp32."""

    def _apply(self, fn, recurse=True):
        mean, var = self.running_mean, self.running_var
        super()._apply(fn, recurse)
        # fn's device, never its dtype: a round trip through bf16 would round the statistics
        self.running_mean = mean.to(self.running_mean.device, torch.float32)
        self.running_var = var.to(self.running_var.device, torch.float32)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            weight = self.weight.float() if self.weight is not None else None
            bias = self.bias.float() if self.bias is not None else None
            momentum = 0.0 if self.momentum is None else self.momentum
            out = self._normalize(x.float(), weight, bias, momentum)
        return out.to(x.dtype)

    def _normalize(self, x, weight, bias, momentum):
        return F.batch_norm(x, self.running_mean, self.running_var, weight, bias, self.training, momentum, self.eps)


class Fp32BatchNorm1d(_Fp32Statistics, nn.BatchNorm1d):
    """BatchNorm computed in fp32: its running statistics stay fp32 when the weights are bf16."""


class Fp32SyncBatchNorm(_Fp32Statistics, nn.SyncBatchNorm):
    """SyncBatchNorm computed in fp32: in training on several ranks, statistics over the global batch (torch's
    SyncBatchNorm function, NCCL); otherwise the plain fp32 path. torch's convert_sync_batchnorm would swap
    Fp32BatchNorm1d for a SyncBatchNorm running in the weights' dtype (bf16)."""

    def _normalize(self, x, weight, bias, momentum):
        world = tdist.get_world_size(self.process_group) if tdist.is_initialized() else 1
        if not (self.training and world > 1):
            return super()._normalize(x, weight, bias, momentum)
        from torch.nn.modules._functions import SyncBatchNorm

        self.num_batches_tracked.add_(1)
        return SyncBatchNorm.apply(x, weight, bias, self.running_mean, self.running_var, self.eps, momentum,
                                   self.process_group or tdist.group.WORLD, world)


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """Every Fp32BatchNorm1d of `model` replaced in place by an Fp32SyncBatchNorm holding the same state."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Fp32BatchNorm1d):
                synced = Fp32SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                           child.track_running_stats).to(child.weight.device)
                synced.load_state_dict(child.state_dict())
                synced.train(child.training)
                setattr(parent, name, synced)
    return model


class EcgConvStem(nn.Module):
    """MoRE's ECG stem: Conv1d(12->256, k5, s5)+ReLU+BN, Conv1d(256->width, k5, s1)+ReLU+BN.
    12 x 1000 -> 196 tokens. `norm="group"` swaps BN for a batch-independent GroupNorm(1)."""

    def __init__(self, cfg: EcgConfig):
        super().__init__()

        def norm(c: int) -> nn.Module:
            return Fp32BatchNorm1d(c) if cfg.stem_norm == "batch" else nn.GroupNorm(1, c)

        k = ECG_STEM_KERNEL
        self.net = nn.Sequential(nn.Conv1d(cfg.leads, cfg.stem_channels, k, stride=k), nn.ReLU(), norm(cfg.stem_channels),
                                 nn.Conv1d(cfg.stem_channels, cfg.width, k, stride=1), nn.ReLU(), norm(cfg.width))
        self.grid = (self.tokens(cfg.samples),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 12, T) -> (B, N, width)
        return self.net(x).transpose(1, 2)

    @staticmethod
    def tokens(samples: int) -> int:
        return ecg_stem_lengths(samples)[1]


class EcgLeadPatchStem(nn.Module):
    """Lead-by-time patching: each lead cut into patch_samples-long pieces, one token each, plus a
    learned lead embedding. 12 x 1000 with 50-sample patches -> 240 tokens (lead-major order)."""

    def __init__(self, cfg: EcgConfig):
        super().__init__()
        self.patch = cfg.patch_samples
        self.proj = nn.Linear(cfg.patch_samples, cfg.width)
        self.lead = nn.Parameter(torch.zeros(1, cfg.leads, 1, cfg.width))
        self.grid = (cfg.leads, cfg.samples // cfg.patch_samples)

    def reset_parameters(self) -> None:  # the lead embedding only; `proj` has its own
        nn.init.zeros_(self.lead)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, T) -> (B, L * T/patch, width)
        b, leads, t = x.shape
        tokens = self.proj(x.view(b, leads, t // self.patch, self.patch)) + self.lead  # (B, L, P, W)
        return tokens.flatten(1, 2)


class VisionTransformer(nn.Module):
    """stem -> + pos -> DropToken (train) -> [CLS] + blocks -> LayerNorm -> CLS feature (B, width)."""

    def __init__(self, cfg: VitConfig, stem: nn.Module):
        super().__init__()
        self.stem, self.keep, self.checkpointing = stem, cfg.drop_token_keep, cfg.grad_checkpoint
        patches = 1
        for n in stem.grid:
            patches *= n
        self.cls = nn.Parameter(torch.empty(1, 1, cfg.width))
        self.pos = nn.Parameter(torch.empty(1, patches + 1, cfg.width))
        self.reset_parameters()
        self.blocks = nn.ModuleList(Block(cfg, p) for p in drop_key_rates(cfg))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.width = cfg.width

    def reset_parameters(self) -> None:  # CLS and position table only; the stem and blocks have their own
        nn.init.zeros_(self.cls)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.stem(x)  # (B, N, W)
        if self.training and self.keep < 1.0:
            # DropToken: gather the kept rows of the patches and of the position table and add those, so the
            # full-length (B, N, W) sum is never written; every later op runs on K tokens
            idx = kept_indices(patches.shape[0], patches.shape[1], self.keep, patches.device)  # (B, K)
            tokens = gather_tokens(patches, idx) + self.pos[0, 1:][idx]
        else:
            tokens = patches + self.pos[:, 1:]
        cls = (self.cls + self.pos[:, :1]).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointing and self.training else block(x)
        return self.norm(x[:, 0])


def kept_indices(batch: int, n: int, keep: float, device) -> torch.Tensor:
    """(B, K) indices of round(N * keep) tokens per sample, a random subset in the original order."""
    k = max(1, round(n * keep))
    return torch.rand(batch, n, device=device).topk(k, dim=1).indices.sort(dim=1).values


def gather_tokens(tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, N, W), (B, K) -> (B, K, W): one gather of the kept rows."""
    return tokens.gather(1, idx.unsqueeze(-1).expand(*idx.shape, tokens.shape[-1]))


def drop_tokens(tokens: torch.Tensor, keep: float) -> torch.Tensor:
    """Keep a random subset of round(N * keep) tokens per sample, in their original order: (B, N, W) -> (B, K, W)."""
    return gather_tokens(tokens, kept_indices(tokens.shape[0], tokens.shape[1], keep, tokens.device))


def interpolate_pos(pos: torch.Tensor, old_grid: tuple[int, ...], new_grid: tuple[int, ...]) -> torch.Tensor:
    """(1, 1 + prod(old_grid), W) -> (1, 1 + prod(new_grid), W); CLS kept, patch grid resized
    (bicubic between 2-D image grids, else linear over the flattened sequence)."""
    if tuple(old_grid) == tuple(new_grid):
        return pos
    cls, grid = pos[:, :1], pos[:, 1:]
    w = grid.shape[-1]
    if len(old_grid) == 2 and len(new_grid) == 2:
        grid = grid.reshape(1, *old_grid, w).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=new_grid, mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, w)
    else:
        length = 1
        for n in new_grid:
            length *= n
        grid = F.interpolate(grid.transpose(1, 2).float(), size=length, mode="linear", align_corners=False)
        grid = grid.transpose(1, 2)
    return torch.cat([cls, grid.to(pos.dtype)], dim=1)


def build_cxr_encoder(cfg: CxrConfig) -> VisionTransformer:
    return VisionTransformer(cfg, PatchStem2d(cfg.channels, cfg.width, cfg.patch_size, cfg.image_size))


def build_ecg_encoder(cfg: EcgConfig) -> VisionTransformer:
    return VisionTransformer(cfg, EcgConvStem(cfg) if cfg.stem == "conv" else EcgLeadPatchStem(cfg))
