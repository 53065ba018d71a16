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

from typing import Optional

import torch

from . import auto_rules
from .fused_op import use_tf32
from .queue.step import check_queue_call, queue_divergence, takes_the_step
from .reference import promote, safe_rows
from .registry import resolve_backend
from .validation import validate_inputs


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
            backends and "dense" need eps >= 1.18e-38 (a normal float32): "auto" takes the
            reference for a smaller eps, and naming one of them then raises.
        backend: "auto" (the fastest backend that can run the tensors' device, dtype and shape:
            on a GPU a fused backend only where it was measured faster than the dense path, see
            d2sm_ext/auto_rules.py), "reference", "dense", or any name from
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
    if queue is not None:
        if takes_the_step(queue, divergence):  # the kept statistics (docs/DESIGN.md §3.6, §3.7)
            return queue_divergence(x, y, queue, divergence, exclude_self, reduction, eps, backend, precision,
                                    x_memory)
        check_queue_call(queue, x, x_memory, eps, divergence, reduction)
        x_memory, y_memory = queue.memory()
    validate_inputs(x, y, divergence, exclude_self, reduction, eps, x_memory, y_memory, precision)
    x, y, x_memory, y_memory = promote(x, y, x_memory, y_memory)
    # Huge or tiny rows are brought into range by exact powers of two (the value is per-row
    # scale-invariant): no Gram product can overflow on any path (docs/DESIGN.md §2.1).
    # A queue stores its rows so already (FeatureQueue.enqueue).
    x, y = safe_rows(x), safe_rows(y)
    if queue is None:
        x_memory, y_memory = safe_rows(x_memory), safe_rows(y_memory)
    tf32 = use_tf32(precision)
    problem = auto_rules.Problem(x.device, x.dtype, tf32, x.shape[0] if x.ndim == 3 else 1,
                                 x.shape[-2] + (0 if x_memory is None else x_memory.shape[-2]), x.shape[-1])
    impl = resolve_backend(backend, x.device.type, x.dtype, float(eps), problem)
    return impl.fn(
        x, y, divergence=divergence, exclude_self=exclude_self, reduction=reduction, eps=float(eps),
        x_memory=x_memory, y_memory=y_memory, precision=precision,
    )
