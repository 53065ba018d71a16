"""The step over a queue (docs/DESIGN.md §3.6, §3.7): ``d2sm_divergence(x, y, queue=queue)`` for a
queue that keeps statistics for the divergence — the live rows against the queue in O(N·q·d) —
written once, for a queue held by this process and for one sharded across ranks alike:

1. validate  the call and the rows; the layout gathers the live rows of every process (a sharded
             queue: every rank's; a rank's invalid input then raises on every rank)
2. plan      where an enqueue of these rows would write and which rows it would evict (the ring)
3. sums      one ``cross_sums`` call of [live rows; rows the plan evicts] against the stored rows,
             the live block and the kept sums: every row's totals (the layout sums the live rows'
             part over the processes)
4. value     from the totals (the layout sums the stored rows' part)
5. gradient  the backend's queue backward against the stored rows (the layout sums the parts and
             hands back this call's rows), or autograd through the sums (the reference)
6. pending   the batch, its plan and its sums, left with the statistics for
             ``FeatureQueue.enqueue_last_batch()``

Whether the queue is sharded is decided once, here where the step starts, by the layout the
queue was built with (``layout.SlotLayout`` or ``shard.ShardLayout``): the stages ask it the same
questions either way.

A step reads the queue three times (the floor, §3.6): stage 3 takes the live rows AND the rows
the next enqueue of this batch would evict against the queue in one product per side, hands the
live rows' Gram blocks to the gradient (one product), and stage 6 leaves the sums, so that
``enqueue_last_batch()`` enqueues that batch (its own copy, taken here) without reading the queue.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .. import fused_op, sizing
from ..reference import compute_dtype, output_dtype, promote, safe_rows
from ..registry import resolve_backend
from ..validation import check_sample_size, validate_inputs
from .ring import FeatureQueue
from .statistics import (DECOMPOSABLE, PendingBatch, QueueView, block_sums, divergence_rows, finite_rows,
                         inverse_norms, self_terms)


def takes_the_step(queue, divergence: str) -> bool:
    """Whether ``d2sm_divergence(..., queue=queue)`` is this step: the queue keeps statistics for
    the divergence, or is sharded (its step raises for the others, on every rank). Otherwise it is
    the full pass over ``queue.memory()``."""
    return isinstance(queue, FeatureQueue) and (
        queue.sharded or (queue.statistics_enabled and divergence in DECOMPOSABLE))


def check_queue_call(queue, x, x_memory, eps, divergence: str, reduction: str) -> None:
    """What a call with ``queue=`` must satisfy besides ``validate_inputs``."""
    if not isinstance(queue, FeatureQueue):
        raise TypeError(f"queue must be a d2sm_ext.FeatureQueue, got {type(queue).__name__}")
    if x_memory is not None:
        raise ValueError("give either queue or x_memory/y_memory, not both")
    if isinstance(x, torch.Tensor) and x.ndim != 2:
        raise ValueError(f"with a queue, x must be (N, d) (one sample set), got shape {tuple(x.shape)}")
    queue.layout.check_call(divergence, reduction, DECOMPOSABLE)
    if queue.statistics_enabled and divergence in DECOMPOSABLE and float(eps) != queue.eps:
        raise ValueError(f"the queue keeps statistics for eps={queue.eps}, but eps={eps} was given: use the same "
                         f"eps, or FeatureQueue(..., eps={eps})")


def queue_divergence(x, y, queue: FeatureQueue, divergence, exclude_self, reduction, eps, backend, precision,
                     x_memory) -> torch.Tensor:
    """The D2SM divergence over (x, y) — every rank's, for a sharded queue — followed by the queue's
    rows, from its kept statistics; leaves the batch pending for ``enqueue_last_batch``."""
    step = _eagerly if queue.layout.collective else _step
    return step(x, y, queue, divergence, exclude_self, reduction, eps, backend, precision, x_memory)


def _step(x, y, queue, divergence, exclude_self, reduction, eps, backend, precision, x_memory) -> torch.Tensor:
    layout = queue.layout
    view = queue.statistics_view()
    # 1. validate
    x, y, x_all, y_all, offset, need = _validate(x, y, queue, view, divergence, exclude_self, reduction, eps,
                                                 precision, x_memory)
    # The measured GPU rule of "auto" compares full passes; this step does O(N·q·d) instead of
    # O((N+q)²·d) work and is not ruled by it: backend= resolves among the backends with queue
    # kernels exactly as for the full pass.
    kernels = resolve_backend(backend, x.device.type, x.dtype, float(eps), None, need_queue=True).queue
    # Differentiable sums (the reference's kernels) give the gradient by autograd, where the layout
    # lets it wait for the backward pass; otherwise stage 5 forms it in the forward.
    through_sums = kernels.backward is None and not layout.collective
    if through_sums:
        # autograd keeps the rows it multiplied by: a copy, so that an enqueue before the backward
        # (D2SMLoss enqueues in its forward) does not change what the gradient reads
        view = dataclasses.replace(view, x=view.x.clone(), y=view.y.clone())
    else:
        x_all, y_all = x_all.detach(), y_all.detach()
    keep_gram = any(need) and reduction != "none" and kernels.keeps_gram
    with torch.set_grad_enabled(through_sums and torch.is_grad_enabled()):
        # Column sums over the finite live rows only: exactly what an enqueue of these rows adds
        # to the queue rows (a row with a NaN makes the loss NaN anyway).
        finite = finite_rows(x_all, y_all)
        # 2. plan: only when the enqueue can store the rows exactly as the loss sees them
        pending = x_all.dtype == view.dtype
        plan = view.plan(x_all, y_all, finite) if pending else None
        # 3. sums
        totals, norms, grams, pending_sums = _totals(x_all, y_all, view, layout, finite, plan, pending,
                                                     exclude_self, eps, kernels, keep_gram)
    m = x_all.shape[0] + view.filled  # the sample set: every live row and the whole queue
    if through_sums:
        # 4. value; 5. gradient: autograd, through the sums
        value = _value(divergence_rows(totals, divergence)[0], finite, x_all.shape[0], m, reduction, layout)
        value = value.to(compute_dtype(x.dtype))
    else:
        # 4. value and 5. gradient, in one autograd Function
        value = QueueDivergence.apply(x, y, x_all, y_all, view.x, view.y, totals, finite, norms, grams, offset, m,
                                      need, (divergence, exclude_self, reduction, float(eps)), kernels, layout,
                                      fused_op.use_tf32(precision))
    # 6. pending
    if pending:
        view.stats.record_pending(PendingBatch(x_all.detach().clone(), y_all.detach().clone(), plan, *pending_sums))
    return value.to(output_dtype(x))


_eagerly = torch.compiler.disable(_step)  # collectives with host-read sizes: the model around it still compiles


def _validate(x, y, queue, view: QueueView, divergence, exclude_self, reduction, eps, precision, x_memory):
    """Stage 1: the call and the rows are checked, promoted with the queue's rows (``view.x``,
    ``view.y`` too) and brought into range; then the layout gathers the live rows. A validation
    error is raised by the layout's ``gather``: for a sharded queue after its first collective, on
    every rank (no rank is left waiting in a collective the others never reach). Returns this
    call's rows, every process's, this call's offset in them and whether each gradient is needed."""
    error, need = None, (False, False)
    try:
        check_queue_call(queue, x, x_memory, eps, divergence, reduction)
        validate_inputs(x, y, divergence, exclude_self, reduction, eps, view.x, view.y, precision, check_size=False)
        x, y, view.x, view.y = promote(x, y, view.x, view.y)
        # Huge or tiny rows are brought into range by exact powers of two (the value is per-row
        # scale-invariant): no Gram product can overflow (docs/DESIGN.md §2.1). The queue stores
        # its rows so already (FeatureQueue.enqueue).
        x, y = safe_rows(x), safe_rows(y)
        grad = torch.is_grad_enabled()
        need = (grad and x.requires_grad, grad and y.requires_grad)
    except (TypeError, ValueError) as e:
        error = e
    x_all, y_all, offset, need = queue.layout.gather(x, y, need, error, view.x.device)
    check_sample_size(x_all.shape[0], view.filled, exclude_self)  # the same sizes, hence outcome, on every rank
    return x, y, x_all, y_all, offset, need


def _totals(x, y, view: QueueView, layout, finite, plan, pending: bool, exclude_self, eps, kernels, keep_gram):
    """Stage 3: every row's sums (4, N + q), live rows then the stored rows. Returns (totals, the
    rows' inverse norms (rx, ry, rxm, rym), the live rows' Gram blocks or None, the pending
    batch's sums: the live rows' over the queue and the enqueue's change of the stored rows')."""
    stored = view.x.shape[0]
    cdt = compute_dtype(x.dtype)
    rx, ry = inverse_norms(x), inverse_norms(y)
    rxm, rym = (t.clone() for t in view.stats.inverse_norms(stored))  # O(q); the next enqueue rewrites them
    if rxm.dtype != cdt:  # x promoted past the queue's dtype: norms in the wider dtype, as the full pass
        rxm, rym = inverse_norms(view.x.to(cdt)), inverse_norms(view.y.to(cdt))
    live_q, queue_l, delta, grams = _cross_block(x, y, rx, ry, view, rxm, rym, finite, plan, pending, eps, kernels,
                                                 keep_gram)
    live_q = layout.reduce(live_q)
    live_totals = live_q + block_sums(x, y, rx, ry, eps, exclude_self)
    queue_totals = view.stats.sums(stored) + queue_l
    if not exclude_self:
        queue_totals = queue_totals + self_terms(rxm, rym, eps)
    totals = torch.cat([live_totals, queue_totals], dim=1)
    return totals, (rx, ry, rxm, rym), grams, (live_q.detach(), delta)


def _cross_block(x, y, rx, ry, view: QueueView, rxm, rym, finite, plan, pending: bool, eps, kernels,
                 keep_gram: bool):
    """One ``cross_sums`` call: the live rows (and the rows the ``plan`` evicts) against the stored
    rows. Returns (live rows' sums (4, N), stored rows' sums over the finite live rows (4, q), the
    enqueue's change of the stored rows' sums when ``pending`` (else None), the live rows' Gram
    blocks or None)."""
    n = x.shape[0]
    cdt = rx.dtype
    rows_x, rows_y, r_x, r_y, weight = x, y, rx, ry, finite.to(cdt)
    if plan is not None:
        rows_x, rows_y = torch.cat([x, plan.old_x.to(x.dtype)]), torch.cat([y, plan.old_y.to(y.dtype)])
        r_x = torch.cat([rx, plan.old_rx.to(cdt)])
        r_y = torch.cat([ry, plan.old_ry.to(cdt)])
        weight = torch.cat([weight, -plan.evicted.to(cdt)])
    keep = keep_gram and sizing.keep_gram(rows_x.shape[0], view.x.shape[0], cdt)
    row_sums, col_sums, gram_x, gram_y = kernels.cross_sums(rows_x, rows_y, r_x, r_y, view.x, view.y, rxm, rym,
                                                            eps, weight, None, n, keep)
    delta = None
    if pending:
        delta = (col_sums[0] + col_sums[1]).detach() if plan is not None else col_sums[0].detach()
    grams = (gram_x[:n], gram_y[:n]) if keep else None
    return row_sums[:, :n], col_sums[0], delta, grams


def _checked(rows: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """Per-row values as the contract gives them: ≥ 0, and all NaN when a live row is not finite
    (docs/DESIGN.md §2.5, §2.6)."""
    return torch.where(finite.all(), rows.clamp_min(0.0), math.nan)


def _value(rows, finite, n_live: int, m: int, reduction: str, layout) -> torch.Tensor:
    """Stage 4: the loss from this process's per-row values (live rows, then the stored rows) over
    a sample set of ``m`` rows."""
    rows = _checked(rows, finite)
    if reduction == "none":
        return rows
    total = layout.total(rows, n_live)
    return total / m if reduction == "mean" else total


def _backward(kernels, inputs, grad_rows, options, need_x, need_y, grams):
    """The backend's queue backward; NaN gradients for a non-finite input (docs/DESIGN.md §2.6;
    inputs[-1] is 0, or NaN when a live row is not finite)."""
    x, y, xm, ym, saved, nan = inputs
    gx, gy = kernels.backward(x, y, xm, ym, saved, grad_rows.to(saved.dtype), *options, need_x, need_y,
                              *(grams or (None, None)))
    return (gx + nan if need_x else gx), (gy + nan if need_y else gy)


def _kernel_gradient(kernels, inputs, weights, options, need, grams, layout):
    """Stage 5 on a backend with a queue backward: every live row's gradient from this process's
    pairs — the live rows against its stored rows, and the live rows' own block where the layout
    counts it (once over the processes; the backward is linear in the column set for fixed per-row
    statistics)."""
    gx, gy = _backward(kernels, inputs, weights, options, need[0], need[1], grams)
    if not layout.counts_live_block():
        x_all, y_all, _, _, saved, nan = inputs
        n, empty = x_all.shape[0], x_all[:0]
        live = (x_all, y_all, empty, empty, saved[:, :, :n], nan)
        lx, ly = _backward(kernels, live, weights[:, :n], options, need[0], need[1], None)
        gx, gy = (gx - lx if need[0] else gx), (gy - ly if need[1] else gy)
    return gx, gy


def _gradient_through_sums(kernels, inputs, totals, norms, finite, weights, options, need, layout):
    """Stage 5 on differentiable sums (the reference) where the gradient is formed in the forward:
    ∂value/∂x = Σ ∂value/∂S · ∂S/∂x over this process's sums S."""
    x_all, y_all, xm, ym, _, nan = inputs
    divergence, exclude_self, eps, _ = options
    n = x_all.shape[0]
    cdt = compute_dtype(x_all.dtype)
    with torch.enable_grad():
        sums = totals.detach().requires_grad_()
        rows = _checked(divergence_rows(sums, divergence)[0], finite)
        (g,) = torch.autograd.grad((weights[0] * rows).sum(), [sums])
        xa, ya = x_all.detach().requires_grad_(need[0]), y_all.detach().requires_grad_(need[1])
        rx, ry = inverse_norms(xa), inverse_norms(ya)
        live, cols, _, _ = kernels.cross_sums(xa, ya, rx, ry, xm, ym, norms[0][n:], norms[1][n:], eps,
                                              finite.to(cdt), None, n, False)
        if layout.counts_live_block():
            live = live + block_sums(xa, ya, rx, ry, eps, exclude_self)
        surrogate = (g[:, :n] * live).sum() + (g[:, n:] * cols[0]).sum()
        wrt = [t for t, needed in ((xa, need[0]), (ya, need[1])) if needed]
        if surrogate.requires_grad:  # (not when this process holds no pair: no queue rows, not counting the live block)
            grads = [g if g is not None else torch.zeros_like(t)
                     for g, t in zip(torch.autograd.grad(surrogate, wrt, allow_unused=True), wrt)]
        else:
            grads = [torch.zeros_like(t) for t in wrt]
    grads = iter(grads)
    empty = x_all.new_empty(0, dtype=cdt)
    gx = next(grads) + nan if need[0] else empty
    gy = next(grads) + nan if need[1] else empty
    return gx, gy


class QueueDivergence(torch.autograd.Function):
    """Stages 4 and 5 where the gradient is formed in the forward, as the fused ops do: the value
    from every row's totals and, for "mean"/"sum", the gradient of this call's rows (the backward
    only scales it, ``fused_op.backward_from_saved``; for "none" the backward forms it with the
    upstream gradient as row weights). The sums are formed before (``_totals``), so that the
    Function is pure over a local queue (torch.compile traces it); over a sharded one it runs the
    layout's collectives, eagerly."""

    @staticmethod
    def forward(ctx, x, y, x_all, y_all, xm, ym, totals, finite, norms, grams, offset, m, need, options, kernels,
                layout, tf32):
        divergence, exclude_self, reduction, eps = options
        want = (ctx.needs_input_grad[0], ctx.needs_input_grad[1])  # this call's rows (need: any process's)
        rows, ubar, vbar = divergence_rows(totals, divergence)
        value = _value(rows, finite, x_all.shape[0], m, reduction, layout)
        cdt = compute_dtype(x.dtype)
        norms = (torch.cat([norms[0], norms[2]]), torch.cat([norms[1], norms[3]]))
        saved = torch.stack([norms[0], norms[1], totals[0].to(cdt), totals[1].to(cdt), ubar.to(cdt),
                             vbar.to(cdt)])[:, None, :]
        backward_options = (divergence, exclude_self, eps, tf32)
        inputs = (x_all, y_all, xm, ym, saved, torch.where(finite.all(), 0.0, math.nan))
        empty = (x.new_empty(0, dtype=cdt), y.new_empty(0, dtype=cdt))
        grads = empty
        if reduction != "none" and any(need):
            weights = torch.full((1, saved.shape[2]), 1.0 / m if reduction == "mean" else 1.0, dtype=cdt,
                                 device=x.device)
            if kernels.backward is not None:
                parts = _kernel_gradient(kernels, inputs, weights, backward_options, need, grams, layout)
            else:
                parts = _gradient_through_sums(kernels, inputs, totals, norms, finite, weights, backward_options,
                                               need, layout)
            grads = tuple(layout.own_gradient(part, offset, x.shape[0]) if needed else part
                          for part, needed in zip(parts, need))
            grads = tuple(g if w else e for g, w, e in zip(grads, want, empty))
        fused_op.save_for_backward(
            ctx, reduction, (x.dtype, y.dtype), want, grads,
            lambda saved_inputs, grad_rows, nx, ny: _kernel_gradient(kernels, saved_inputs, grad_rows.reshape(1, -1),
                                                                     backward_options, (nx, ny), None, layout),
            inputs)
        return value.to(cdt)

    @staticmethod
    def backward(ctx, grad):
        gx, gy = fused_op.backward_from_saved(ctx, grad)
        return (gx, gy) + (None,) * 15
