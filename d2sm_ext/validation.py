"""Validation of the loss's inputs (docs/DESIGN.md §2.8), shared by ``d2sm_divergence`` and the
step over a queue: TypeError/ValueError naming what was expected and what was given."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .reference import DIVERGENCES, REDUCTIONS

PRECISIONS = ("auto", "ieee", "tf32")


def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(
            f"{name} must have a real floating dtype (float16, bfloat16, float32, float64), got {t.dtype}"
        )
    return t


def validate_inputs(
    x: torch.Tensor,
    y: torch.Tensor,
    divergence: str,
    exclude_self: bool,
    reduction: str,
    eps: float,
    x_memory: Optional[torch.Tensor],
    y_memory: Optional[torch.Tensor],
    precision: str = "auto",
    check_size: bool = True,
) -> None:
    """Raise TypeError/ValueError naming what was expected and what was given. ``check_size``:
    whether the sample set is x's rows and the memory rows (a sharded queue's is known after the
    gather: ``check_sample_size``)."""
    _check_tensor("x", x)
    _check_tensor("y", y)
    if x.ndim not in (2, 3):
        raise ValueError(f"x must be (M, d) or (B, M, d), got a {x.ndim}-d tensor of shape {tuple(x.shape)}")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got x {tuple(x.shape)} and y {tuple(y.shape)}")
    if x.device != y.device:
        raise ValueError(f"x and y must be on the same device, got x on {x.device} and y on {y.device}")
    if x.shape[-1] < 1:
        raise ValueError(f"feature dimension d must be >= 1, got shape {tuple(x.shape)}")
    if x.ndim == 3 and x.shape[0] < 1:
        raise ValueError(f"batch of problems B must be >= 1, got shape {tuple(x.shape)}")

    if (x_memory is None) != (y_memory is None):
        raise ValueError("x_memory and y_memory must be given together (both None or both tensors)")
    n_memory = 0
    if x_memory is not None:
        _check_tensor("x_memory", x_memory)
        _check_tensor("y_memory", y_memory)
        if x_memory.shape != y_memory.shape:
            raise ValueError(
                f"x_memory and y_memory must have the same shape, got {tuple(x_memory.shape)} and "
                f"{tuple(y_memory.shape)}"
            )
        expected = "(Q, d)" if x.ndim == 2 else "(B, Q, d)"
        if (
            x_memory.ndim != x.ndim
            or x_memory.shape[-1] != x.shape[-1]
            or (x.ndim == 3 and x_memory.shape[0] != x.shape[0])
        ):
            raise ValueError(
                f"memory rows must be {expected} matching x {tuple(x.shape)}, got {tuple(x_memory.shape)}"
            )
        for name, mem in (("x_memory", x_memory), ("y_memory", y_memory)):
            if mem.device != x.device:
                raise ValueError(f"{name} must be on x's device {x.device}, got {mem.device}")
        n_memory = x_memory.shape[-2]

    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not isinstance(exclude_self, bool):
        raise TypeError(f"exclude_self must be a bool, got {type(exclude_self).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")

    if check_size:
        check_sample_size(x.shape[-2], n_memory, exclude_self)


def check_sample_size(live: int, memory: int, exclude_self: bool) -> None:
    needed = 2 if exclude_self else 1
    if live + memory < needed:
        raise ValueError(
            f"the sample set has {live + memory} row(s) (live {live} + memory {memory}); "
            f"exclude_self={exclude_self} needs at least {needed} so that every row has a neighbour"
        )
