"""Vision Transformer with DropToken and DropKey; image (Conv2d) and ECG (paper's Conv1d) stems."""

from __future__ import annotations

import torch
import torch.nn as nn

from more_scale.config import CxrConfig, EcgConfig, VitConfig
from more_scale.models.attention import attention


class Block(nn.Module):
    """Pre-norm transformer block; DropKey lives in the attention call."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, drop_key: float):
        super().__init__()
        self.heads, self.drop_key = heads, drop_key
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, W)
        b, n, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = attention(q, k, v, drop_key=self.drop_key, training=self.training)  # (B, H, N, D)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, w))
        return x + self.mlp(self.norm2(x))


class PatchStem2d(nn.Module):
    """Non-overlapping square patches -> tokens."""

    def __init__(self, channels: int, width: int, patch: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, width, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, N, width)
        return self.conv(x).flatten(2).transpose(1, 2)


class Fp32BatchNorm1d(nn.BatchNorm1d):
    """BatchNorm computed in fp32: its running statistics stay fp32 when the weights are bf16."""

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.running_mean, self.running_var = self.running_mean.float(), self.running_var.float()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            weight = self.weight.float() if self.weight is not None else None
            bias = self.bias.float() if self.bias is not None else None
            momentum = 0.0 if self.momentum is None else self.momentum
            out = nn.functional.batch_norm(x.float(), self.running_mean, self.running_var, weight, bias,
                                           self.training, momentum, self.eps)
        return out.to(x.dtype)


class EcgStem(nn.Module):
    """MoRE's ECG stem: Conv1d(12->256, k5, s5)+ReLU+BN, Conv1d(256->width, k5, s1)+ReLU+BN.
    12 x 1000 -> 196 tokens. `norm="group"` swaps BN for a batch-independent GroupNorm(1)."""

    def __init__(self, leads: int, hidden: int, width: int, norm: str = "batch"):
        super().__init__()

        def make_norm(c: int) -> nn.Module:
            return Fp32BatchNorm1d(c) if norm == "batch" else nn.GroupNorm(1, c)

        self.net = nn.Sequential(nn.Conv1d(leads, hidden, 5, stride=5), nn.ReLU(), make_norm(hidden),
                                 nn.Conv1d(hidden, width, 5, stride=1), nn.ReLU(), make_norm(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 12, T) -> (B, N, width)
        return self.net(x).transpose(1, 2)

    @staticmethod
    def tokens(samples: int) -> int:
        return (samples - 5) // 5 + 1 - 4


class VisionTransformer(nn.Module):
    """stem -> + pos -> DropToken (train) -> [CLS] + blocks -> LayerNorm -> CLS feature (B, width)."""

    def __init__(self, cfg: VitConfig, stem: nn.Module, num_patches: int):
        super().__init__()
        self.stem, self.keep = stem, cfg.drop_token_keep
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos = nn.Parameter(torch.randn(1, num_patches + 1, cfg.width) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.drop_key) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)
        self.width = cfg.width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.stem(x) + self.pos[:, 1:]  # (B, N, W)
        if self.training and self.keep < 1.0:
            tokens = drop_tokens(tokens, self.keep)
        cls = (self.cls + self.pos[:, :1]).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 0])


def drop_tokens(tokens: torch.Tensor, keep: float) -> torch.Tensor:
    """Keep a random subset of round(N * keep) tokens per sample (order preserved): (B, N, W) -> (B, K, W)."""
    b, n, w = tokens.shape
    k = max(1, round(n * keep))
    idx = torch.rand(b, n, device=tokens.device).topk(k, dim=1).indices.sort(dim=1).values
    return tokens.gather(1, idx.unsqueeze(-1).expand(b, k, w))


def build_cxr_encoder(cfg: CxrConfig) -> VisionTransformer:
    patches = (cfg.image_size // cfg.patch_size) ** 2
    return VisionTransformer(cfg, PatchStem2d(cfg.channels, cfg.width, cfg.patch_size), patches)


def build_ecg_encoder(cfg: EcgConfig) -> VisionTransformer:
    stem = EcgStem(cfg.leads, cfg.stem_channels, cfg.width, cfg.stem_norm)
    return VisionTransformer(cfg, stem, EcgStem.tokens(cfg.samples))
