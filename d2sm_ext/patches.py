"""Patch sampling (paper §3.3, "patch-wise internal probability"): K×K sliding windows.

Order: image-major, then row-major over window positions (top-left first, then to the right,
then down). Border policy: window origins are 0, s, 2s, … while the window fits; when that
leaves pixels at the bottom/right uncovered, one more window is aligned to the border (origin
H - K, resp. W - K). Every pixel is covered; the last row/column of windows may overlap its
neighbour by more than K - s. Example: a 512×512 image with K=224, s=56 has origins
0, 56, …, 280 (6) plus 288, i.e. 7×7 = 49 windows. Images smaller than K raise ValueError.
"""
from __future__ import annotations

import torch


def window_origins(length: int, patch_size: int, stride: int) -> list[int]:
    """Origins of the windows along one axis under the border policy above."""
    if length < patch_size:
        raise ValueError(
            f"image side {length} is smaller than patch_size {patch_size}; use a smaller patch_size "
            f"or larger images"
        )
    origins = list(range(0, length - patch_size + 1, stride))
    if origins[-1] + patch_size < length:
        origins.append(length - patch_size)
    return origins


def _check_sizes(patch_size: int, stride: int) -> None:
    for name, value in (("patch_size", patch_size), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def patch_grid(height: int, width: int, patch_size: int = 224, stride: int = 56) -> tuple[int, int]:
    """(rows, cols) of windows for an H×W image."""
    _check_sizes(patch_size, stride)
    return len(window_origins(height, patch_size, stride)), len(window_origins(width, patch_size, stride))


def extract_patches(images: torch.Tensor, patch_size: int = 224, stride: int = 56) -> torch.Tensor:
    """Cut B×C×H×W images into windows: returns (B, P, C, K, K) with P = rows·cols.

    A single gather (no Python loop over pixels or windows); differentiable with respect to the
    images; works on any device and dtype.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a B×C×H×W tensor, got {shape}")
    _check_sizes(patch_size, stride)
    b, c, h, w = images.shape
    device = images.device
    rows = torch.tensor(window_origins(h, patch_size, stride), device=device)
    cols = torch.tensor(window_origins(w, patch_size, stride), device=device)
    offset = torch.arange(patch_size, device=device)
    row_idx = (rows[:, None] + offset[None, :])  # (R, K)
    col_idx = (cols[:, None] + offset[None, :])  # (Cw, K)
    # images[b, c, row_idx[r, :, None], col_idx[q, None, :]] for every window (r, q).
    patches = images[:, :, row_idx[:, None, :, None], col_idx[None, :, None, :]]  # B,C,R,Cw,K,K
    patches = patches.permute(0, 2, 3, 1, 4, 5)  # B, R, Cw, C, K, K: row-major windows
    return patches.reshape(b, rows.numel() * cols.numel(), c, patch_size, patch_size)
