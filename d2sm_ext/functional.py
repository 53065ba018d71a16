"""Public functional API: ``d2sm_divergence`` validates its inputs once and dispatches to a backend.

The math (docs/DESIGN.md §2): with x̂ = x/‖x‖ (zero rows stay zero), K'_ij = max((1 + x̂_i·x̂_j)/2, 0) + eps,
K likewise from y, neighbour distributions P'_ij = K'_ij / Σ_{j∈S_i} K'_ij and P_ij from K, where
S_i = all j ≠ i (``exclude_self=True``, the paper) or all j. Per row i:

* ``kl``           Σ_j P' log(P'/P)                       (paper Eq. 2, default)
* ``reverse_kl``   Σ_j P log(P/P')                        (paper Table 4 "iKLD")
* ``symmetric_kl`` ½ kl + ½ reverse_kl                    (paper Eq. 10)
* ``js``           ½ Σ P' log(P'/m) + ½ Σ P log(P/m), m = (P' + P)/2

Relation to the public code's scale: it averages Σ P log(P/P') over all M² entries with the
diagonal included, i.e. ``d2sm_divergence(x, y, "reverse_kl", exclude_self=False) / M``. Our
``mean`` is per row, so values are M times larger than the public code's for the same set.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import auto_rules
from .queue import shard as queue_shard
from .queue import statistics as queue_stats
from .fused_op import use_tf32
from .registry import resolve_backend
from .reference import DIVERGENCES, REDUCTIONS, promote, safe_rows

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


def _check_queue(queue, x, x_memory, eps, divergence, reduction) -> None:
    from .queue import FeatureQueue

    if not isinstance(queue, FeatureQueue):
        raise TypeError(f"queue must be a d2sm_ext.FeatureQueue, got {type(queue).__name__}")
    if x_memory is not None:
        raise ValueError("give either queue or x_memory/y_memory, not both")
    if isinstance(x, torch.Tensor) and x.ndim != 2:
        raise ValueError(f"with a queue, x must be (N, d) (one sample set), got shape {tuple(x.shape)}")
    if queue.sharded:
        queue_shard.check_divergence(divergence, reduction)
    if queue.statistics_enabled and divergence in queue_stats.DECOMPOSABLE and float(eps) != queue.eps:
        raise ValueError(f"the queue keeps statistics for eps={queue.eps}, but eps={eps} was given: use the same "
                         f"eps, or FeatureQueue(..., eps={eps})")


def d2sm_divergence(
    x: torch.Tensor,
    y: torch.Tensor,
    divergence: str = "kl",
    exclude_self: bool = True,
    reduction: str = "mean",
    eps: float = 1e-8,
    backend: str = "auto",
    x_memory: Optional[torch.Tensor] = None,
    y_memory: Optional[torch.Tensor] = None,
    precision: str = "auto",
    queue=None,
) -> torch.Tensor:
    """D2SM divergence between restored features ``x`` and clean features ``y``.

    Args:
        x, y: (M, d) or (B, M, d) features; row i of x and row i of y describe the same sample.
            A 3-d input is a batch of B independent problems. x, y and the memory rows may have
            different floating dtypes: they are promoted to the widest (as PyTorch's binary ops
            do; float16 with bfloat16 gives float32), and each gradient comes back in its
            input's dtype.
        divergence: "kl" (default, paper Eq. 2), "reverse_kl", "symmetric_kl" or "js".
        exclude_self: leave j = i out of row i's neighbour distribution (paper; default).
        reduction: "mean" over rows (and problems), "sum", or "none" (shape (M,) or (B, M)).
        eps: kernel floor added to every kernel value (default 1e-8; keeps logs finite when two
            rows are antipodal). eps = 0 is allowed; a divergence can then be +inf. The fused
            backends need eps >= 1.18e-38 (a normal float32): "auto" takes the reference for a
            smaller eps, and naming a fused backend then raises.
        backend: "auto" (the fastest backend that can run the tensors' device, dtype and shape:
            on a GPU a fused backend only where it was measured faster than the reference, see
            d2sm_ext/auto_rules.py), "reference", or any name from
            ``d2sm_ext.available_backends()``.
        x_memory, y_memory: optional history rows (Q, d) or (B, Q, d). The sample set is the rows
            of x followed by the memory rows; every row's divergence counts (M = N + Q rows), and
            gradients reach only x and y, never the memory.
        precision: matmul precision of fused backends for float32 inputs: "ieee" (full fp32),
            "tf32", or "auto" (tf32 exactly when PyTorch's own CUDA float32 matmuls may use it:
            ``torch.backends.cuda.matmul.fp32_precision`` when set, else
            ``torch.get_float32_matmul_precision()`` != "highest"). The reference ignores it.
        queue: a ``FeatureQueue`` whose filled rows are the memory rows (instead of x_memory /
            y_memory). The result equals ``x_memory, y_memory = queue.memory()`` passed as memory
            rows, values and gradients. With ``FeatureQueue(statistics=True, eps=eps)`` and kl,
            reverse_kl or symmetric_kl, it is computed from the queue's kept statistics in
            O(N·q·d) (docs/DESIGN.md §3.6), an empty queue included, and leaves the batch pending
            for ``queue.enqueue_last_batch()``; otherwise (js, a queue without statistics) by the
            full pass over the memory rows. x must be (N, d).
            With a sharded queue (``FeatureQueue(shard=True)`` under W ranks; kl, reverse_kl,
            symmetric_kl; "mean"/"sum") every rank calls it: the sample set is every rank's x (rank
            order) followed by the whole queue, the value is the same on every rank, and x's gradient
            is that value's gradient with respect to this rank's rows (docs/DESIGN.md §3.7).

    Returns:
        A scalar for "mean"/"sum", per-row values for "none"; in the (promoted) input dtype, or
        under ``torch.autocast`` in float32 (float64 for float64 inputs), as PyTorch's losses.
        Per-row values are >= 0 (a rounding of an exactly-zero divergence below 0 is returned
        as 0); a non-finite value in any row of a problem makes all its rows NaN.
    """
    view = None
    if queue is not None:
        if getattr(queue, "sharded", False) is True:
            return _sharded(x, y, queue, divergence, exclude_self, reduction, eps, backend, precision, x_memory)
        _check_queue(queue, x, x_memory, eps, divergence, reduction)
        kept_statistics = queue.statistics_enabled and divergence in queue_stats.DECOMPOSABLE
        view = queue.statistics_view() if kept_statistics else None
        x_memory, y_memory = (view.x, view.y) if view is not None else queue.memory()
    validate_inputs(x, y, divergence, exclude_self, reduction, eps, x_memory, y_memory, precision)
    x, y, x_memory, y_memory = promote(x, y, x_memory, y_memory)
    # Huge or tiny rows are brought into range by exact powers of two (the value is per-row
    # scale-invariant): no Gram product can overflow on any path (docs/DESIGN.md §2.1).
    # A queue stores its rows so already (FeatureQueue.enqueue).
    x, y = safe_rows(x), safe_rows(y)
    if queue is None:
        x_memory, y_memory = safe_rows(x_memory), safe_rows(y_memory)
    tf32 = use_tf32(precision)
    # The measured GPU rule compares full passes; the kept-statistics path does O(N·q·d) instead of
    # O((N+q)²·d) work and is not ruled by it: backend= resolves among the backends with queue
    # kernels exactly as for the full pass.
    problem = None if view is not None else auto_rules.Problem(
        x.device, x.dtype, tf32, x.shape[0] if x.ndim == 3 else 1,
        x.shape[-2] + (0 if x_memory is None else x_memory.shape[-2]), x.shape[-1])
    impl = resolve_backend(backend, x.device.type, x.dtype, float(eps), problem, need_queue=view is not None)
    if view is not None:  # an empty queue too: its loss, like every later one, leaves the batch pending
        view.x, view.y = x_memory, y_memory  # promoted with x
        return queue_stats.queue_divergence(x, y, view, divergence, exclude_self, reduction, eps, impl.queue, tf32)
    return impl.fn(
        x, y, divergence=divergence, exclude_self=exclude_self, reduction=reduction, eps=float(eps),
        x_memory=x_memory, y_memory=y_memory, precision=precision,
    )


@torch.compiler.disable  # collectives with host-read sizes: run eagerly, the model around it still compiles
def _sharded(x, y, queue, divergence, exclude_self, reduction, eps, backend, precision, x_memory) -> torch.Tensor:
    """``d2sm_divergence`` with a sharded queue: a collective (docs/DESIGN.md §3.7). A rank's
    invalid input is raised on every rank, after the first gather (no rank is left waiting)."""
    view = queue.statistics_view()
    error, need = None, (False, False)
    try:
        _check_queue(queue, x, x_memory, eps, divergence, reduction)
        validate_inputs(x, y, divergence, exclude_self, reduction, eps, view.x, view.y, precision, check_size=False)
        x, y, view.x, view.y = promote(x, y, view.x, view.y)
        x, y = safe_rows(x), safe_rows(y)  # the queue's rows are stored so already
        grad = torch.is_grad_enabled()
        need = (grad and x.requires_grad, grad and y.requires_grad)
    except (TypeError, ValueError) as e:
        error = e
    x_all, y_all, offset, need = queue_shard.gather_batch(x, y, need, error, view.x.device, queue.layout.group)
    q = len(queue)
    check_sample_size(x_all.shape[0], q, exclude_self)  # the same sizes, hence the same outcome, on every rank
    impl = resolve_backend(backend, x.device.type, x.dtype, float(eps), None, need_queue=True)
    return queue_shard.sharded_divergence(x, y, x_all, y_all, offset, need, view, queue.layout, q, divergence,
                                          exclude_self, reduction, eps, impl.queue, use_tf32(precision))
