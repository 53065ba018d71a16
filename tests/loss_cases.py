"""Shared pieces for D2SMLoss tests: a tiny frozen extractor, a tiny denoiser, and one
configuration per sampling mode (with and without a queue), on 12×12 images (8×8 patches at
stride 4: 4 patches per image)."""
import torch
from torch import nn


def tiny_extractor(channels: int = 8) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(2))


def tiny_denoiser() -> nn.Module:
    torch.manual_seed(2)  # no BatchNorm: per-rank batch statistics would break DDP equivalences
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1))


SAMPLING_CONFIGS = {
    "internal": dict(sampling="internal", patch_size=8, stride=4),
    "pooled": dict(sampling="pooled", patch_size=8, stride=4),
    "pooled+queue": dict(sampling="pooled", patch_size=8, stride=4, queue_size=16),
    "batch": dict(sampling="batch"),
    "batch+queue": dict(sampling="batch", queue_size=5),
}
