"""A queue larger than one process: the history sharded across the ranks of a process group
(docs/DESIGN.md §3.7). ``FeatureQueue(..., statistics=True, shard=True)`` builds on this module.

The global queue is exactly the replicated queue's ring of ``size`` slots, fed the all-gathered
stream (rank order within a step; non-finite rows never enter). Slot s is stored on rank s mod W
at local index s div W (a batch's consecutive slots spread over all ranks, so the enqueue's work
does too); every rank keeps the global write pointer and fill count. For each stored row a rank
keeps its float64 sums over ALL other rows of the global queue. A step moves O(N_global·d) rows
(the live rows, the rows the enqueue evicts) and O(N_global) statistics, never a q×d tensor:

* the loss all-gathers the live rows (every rank then holds the global batch), gathers the rows
  the enqueue would evict from the ranks that store them, takes [live; evicted] against its own
  stored rows in one ``cross_sums`` call, and sums the live rows' partial sums over the ranks
  (4×N_global float64). The stored rows' sums over the live rows are local. The value's queue part
  is summed over the ranks (one float64 per rank); the gradient of the live rows is each rank's
  product against its stored rows, all-reduced (N_global×d per side), of which a rank keeps its
  own rows.
* the enqueue then needs nothing more: every rank holds the entering rows, the evicted rows and
  their sums (the same on every rank), and its stored rows' change.

Collectives used: all_gather and all_reduce in a step, broadcast in the (rare) refresh — gloo
and NCCL have all three — the same sequence on every rank (an empty batch joins every one). A
rank whose inputs are invalid still joins the first gather and every rank raises there: no rank
is left waiting in a collective the others never reach.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from .. import distributed as dist_helpers
from .. import fused_op
from . import statistics
from ..reference import compute_dtype, output_dtype


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def capacity(size: int, world: int, rank: int) -> int:
    """Of slots 0 … size − 1, how many ``rank`` of ``world`` stores (those s with s mod W = rank);
    with ``size`` the fill count: how many filled rows it stores."""
    return max(0, -(-(size - rank) // world))


class ShardLayout(statistics.SlotLayout):
    """Rank ``rank`` of ``world`` stores slot s = i·W + rank at local index i."""

    def __init__(self, world: int, rank: int, group=None):
        self.world, self.rank, self.group = world, rank, group

    def positions(self, n: int, device) -> torch.Tensor:
        return torch.arange(n, device=device) * self.world + self.rank

    def _local(self, slots: torch.Tensor):
        return slots % self.world == self.rank, torch.div(slots, self.world, rounding_mode="floor")

    def held(self, slots, x_buffer, y_buffer, inv_norms, evicts: bool = True):
        """One all-reduce of (K, 2d + 2) in the compute dtype: each candidate slot's row from the rank
        that stores it, zeros from the others (a sum with zeros is exact). When no row can be
        evicted (``evicts=False``) only this rank's slots are written and the rows stored
        elsewhere are not needed: zeros, no collective."""
        own, local = self._local(slots)
        local = torch.clamp(local, max=max(x_buffer.shape[0] - 1, 0))
        cdt = inv_norms.dtype
        d = x_buffer.shape[1]
        packed = torch.cat([x_buffer[local].to(cdt), y_buffer[local].to(cdt), inv_norms[:, local].T], dim=1)
        packed = torch.where(own[:, None], packed, 0.0)
        if evicts:
            dist.all_reduce(packed, group=self.group)
        dtype = x_buffer.dtype
        return packed[:, :d].to(dtype), packed[:, d:2 * d].to(dtype), packed[:, 2 * d], packed[:, 2 * d + 1]

    def targets(self, plan):
        own, local = self._local(plan.slots)
        k = plan.slots.shape[0]
        ref = torch.argmax(own.to(torch.int8))  # the first candidate stored here (0 when none is)
        write = own.any()
        t = torch.where(own, local, torch.where(write, local[ref], 0))
        s = torch.where(own, torch.arange(k, device=own.device), ref)
        return t, s, write

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks in rank order (all_gather, then a fixed-order sum): bitwise the same
        result on every rank, and from run to run."""
        flat = t.reshape(-1).contiguous()  # (1-d: gloo gathers no 0-d tensors under torch.compile)
        parts = [torch.empty_like(flat) for _ in range(self.world)]
        dist.all_gather(parts, flat, group=self.group)
        return sum(parts[1:], parts[0]).reshape(t.shape)


# ---------------------------------------------------------------------------------------------
# The loss over (every rank's live rows, the sharded queue)
# ---------------------------------------------------------------------------------------------
def check_divergence(divergence: str, reduction: str) -> None:
    if divergence not in statistics.DECOMPOSABLE:
        raise ValueError(f"a sharded queue computes the loss from its kept statistics, which exist for "
                         f"{statistics.DECOMPOSABLE}; divergence {divergence!r} does not decompose into them "
                         f"(use one of those, or an unsharded FeatureQueue for js)")
    if reduction == "none":
        raise ValueError("reduction='none' is not available with a sharded queue: the queue rows' values live on "
                         "different ranks; use 'mean' or 'sum'")


class _Precomputed(torch.autograd.Function):
    """The value and this rank's gradients, formed in the forward (with its collectives); the
    backward scales them by the upstream gradient (``fused_op.backward_from_saved``): no
    collective in the backward pass."""

    @staticmethod
    def forward(ctx, x, y, value, gx, gy, need, reduction):
        fused_op.save_for_backward(ctx, reduction, (x.dtype, y.dtype), need, (gx, gy), None, ())
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        gx, gy = fused_op.backward_from_saved(ctx, grad)
        return gx, gy, None, None, None, None, None


def _gradients(kernels, x_all, y_all, view, totals, finite, norms, grams, weights, options, need, rank):
    """This rank's part of ∂value/∂(every live row): the pairs of the live rows with its stored
    rows (and, on rank 0 alone, the live rows' own block). Summed over the ranks by the caller."""
    divergence, exclude_self, eps, tf32 = options
    n = x_all.shape[0]
    cdt = compute_dtype(x_all.dtype)
    nan = torch.where(finite.all(), 0.0, math.nan)
    if kernels.backward is not None:
        _, ubar, vbar = statistics.divergence_rows(totals, divergence)
        saved = torch.stack([norms[0], norms[1], totals[0].to(cdt), totals[1].to(cdt), ubar.to(cdt),
                             vbar.to(cdt)])[:, None, :]
        inputs = (x_all, y_all, view.x, view.y, saved, nan)
        gx, gy = statistics._backward(kernels, inputs, weights, options, need[0], need[1], grams)
        if rank != 0:  # the live rows' own block counts once, on rank 0
            empty = x_all[:0]
            live = (x_all, y_all, empty, empty, saved[:, :, :n], nan)
            lx, ly = statistics._backward(kernels, live, weights[:, :n], options, need[0], need[1], None)
            gx, gy = (gx - lx if need[0] else gx), (gy - ly if need[1] else gy)
        return gx, gy
    # Differentiable sums (the reference): ∂value/∂x = Σ ∂value/∂S · ∂S/∂x over this rank's sums S.
    with torch.enable_grad():
        sums = totals.detach().requires_grad_()
        rows = statistics._reduce(statistics.divergence_rows(sums, divergence)[0], finite, "none")
        (g,) = torch.autograd.grad((weights[0] * rows).sum(), [sums])
        xa, ya = x_all.detach().requires_grad_(need[0]), y_all.detach().requires_grad_(need[1])
        rx, ry = statistics.inverse_norms(xa), statistics.inverse_norms(ya)
        live, cols, _, _ = kernels.cross_sums(xa, ya, rx, ry, view.x, view.y, norms[0][n:], norms[1][n:], eps,
                                              finite.to(cdt), None, n, False)
        if rank == 0:
            live = live + statistics.block_sums(xa, ya, rx, ry, eps, exclude_self)
        surrogate = (g[:, :n] * live).sum() + (g[:, n:] * cols[0]).sum()
        wrt = [t for t, needed in ((xa, need[0]), (ya, need[1])) if needed]
        if surrogate.requires_grad:  # (not when this rank holds no pair: no queue rows, not rank 0)
            grads = [g if g is not None else torch.zeros_like(t)
                     for g, t in zip(torch.autograd.grad(surrogate, wrt, allow_unused=True), wrt)]
        else:
            grads = [torch.zeros_like(t) for t in wrt]
        grads = iter(grads)
        empty = x_all.new_empty(0, dtype=cdt)
        gx = next(grads) + nan if need[0] else empty
        gy = next(grads) + nan if need[1] else empty
        return gx, gy


def gather_batch(x, y, need: tuple, error: Optional[Exception], device, group=None):
    """Every rank's live rows in rank order, and whether any rank needs each gradient (every rank
    must join the gradient's all-reduce if one does). Two all_gathers: (rows, needs, dtype, valid)
    per rank, read on the host, then the rows padded to the largest count. ``error``: this rank's
    validation error (its rows are not gathered); when any rank has one, or the ranks' dtypes
    differ, every rank raises after the first gather. Returns (x_all, y_all, offset of this
    rank's rows, need_any)."""
    rank = dist.get_rank(group)
    ok = error is None
    mine = [x.shape[0], int(need[0]), int(need[1]), FLOAT_DTYPES.index(x.dtype), 1] if ok else [0, 0, 0, -1, 0]
    table = dist_helpers.all_gather_ints(mine, device, group)
    bad = [r for r, row in enumerate(table) if not row[4]]
    if bad:
        if error is not None:
            raise error
        raise ValueError(f"rank(s) {bad} called the sharded queue with invalid rows (their error says which); "
                         f"every rank stops here")
    if len({row[3] for row in table}) > 1:
        raise TypeError(f"the ranks' rows have different dtypes {[FLOAT_DTYPES[row[3]] for row in table]}: a "
                        f"sharded queue gathers them, give every rank the same dtype")
    sizes = [row[0] for row in table]
    d = x.shape[1]
    both, _ = dist_helpers.all_gather_rows(torch.cat([x, y], dim=1), group, sizes)
    need_any = (any(row[1] for row in table), any(row[2] for row in table))
    return both[:, :d], both[:, d:], sum(sizes[:rank]), need_any


def sharded_divergence(x, y, x_all, y_all, offset, need, view, layout: ShardLayout, q_global: int, divergence,
                       exclude_self, reduction, eps, kernels, tf32) -> torch.Tensor:
    """The D2SM divergence over (every rank's live rows ``x_all``, the whole sharded queue), the
    same value on every rank; gradients reach this rank's rows ``x`` (rows offset … offset + n of
    ``x_all``). ``need``: whether any rank needs ∂/∂x, ∂/∂y. Leaves the pending batch (every
    rank's rows) for ``enqueue_last_batch``."""
    n_all, n = x_all.shape[0], x.shape[0]
    cdt = compute_dtype(x.dtype)
    want_x = torch.is_grad_enabled() and x.requires_grad
    want_y = torch.is_grad_enabled() and y.requires_grad
    with torch.no_grad():
        keep = any(need) and kernels.backward is not None and kernels.keeps_gram
        totals, finite, (rx, ry, rxm, rym), grams = statistics._totals(
            x_all, y_all, view, divergence, exclude_self, eps, kernels, keep, reduce=layout.reduce)
        rows = statistics._reduce(statistics.divergence_rows(totals, divergence)[0], finite, "none")
        total = rows[:n_all].sum() + layout.reduce(rows[n_all:].sum())
        m = n_all + q_global
        value = total / m if reduction == "mean" else total
        empty = x.new_empty(0, dtype=cdt)
        gx = gy = empty
        if any(need):
            weights = torch.full((1, rows.shape[0]), 1.0 / m if reduction == "mean" else 1.0, dtype=cdt,
                                 device=x.device)
            norms = (torch.cat([rx, rxm]), torch.cat([ry, rym]))
            parts = _gradients(kernels, x_all, y_all, view, totals, finite, norms, grams, weights,
                               (divergence, exclude_self, float(eps), tf32), need, layout.rank)
            own = []
            for part, needed in zip(parts, need):
                if needed:
                    part = part.contiguous()  # one layout on every rank (autograd may return a transposed one)
                    dist.all_reduce(part, group=layout.group)
                    part = part[offset:offset + n].clone()  # (not a view keeping N_g × d alive)
                own.append(part)
            gx, gy = own
        gx, gy = (gx if want_x else empty), (gy if want_y else empty)
    if want_x or want_y:
        value = _Precomputed.apply(x, y, value.to(cdt), gx, gy, (want_x, want_y), reduction)
    return value.to(cdt).to(output_dtype(x))


# ---------------------------------------------------------------------------------------------
# Checkpoints and refresh
# ---------------------------------------------------------------------------------------------
def other_shards(layout: ShardLayout, xm: torch.Tensor, ym: torch.Tensor, filled: int):
    """The filled rows every other rank stores, one rank at a time (a broadcast from each rank in
    turn; every rank must consume the whole generator)."""
    d = xm.shape[1]
    for src in range(layout.world):
        rows = capacity(filled, layout.world, src)
        both = torch.cat([xm, ym], dim=1) if src == layout.rank else xm.new_empty(rows, 2 * d)
        dist.broadcast(both, group=layout.group, group_src=src)
        if src != layout.rank:
            yield both[:, :d], both[:, d:]


def _interleave(layout: ShardLayout, t: torch.Tensor, size: int) -> torch.Tensor:
    """(rows, ...) stored on each rank → (size, ...) in slot order (slot i·W + r is rank r's row i)."""
    cap = capacity(size, layout.world, 0)  # rank 0 stores the most
    padded = t.new_zeros((cap,) + tuple(t.shape[1:]))
    padded[:t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(layout.world)]
    dist.all_gather(parts, padded, group=layout.group)
    return torch.stack(parts, dim=1).reshape((cap * layout.world,) + tuple(t.shape[1:]))[:size]


@torch.no_grad()
def full_state(queue) -> dict:
    """``FeatureQueue.full_state_dict`` of a sharded queue: every rank's rows and sums, in slot order."""
    layout, size = queue.layout, queue.size
    rows = _interleave(layout, torch.cat([queue.x_buffer, queue.y_buffer], dim=1), size)
    sums = _interleave(layout, queue.stats.row_sums.T, size).T.contiguous()
    norms = _interleave(layout, queue.stats.row_inv_norms.T, size).T.contiguous()
    return {
        "x_buffer": rows[:, :queue.dim].contiguous(), "y_buffer": rows[:, queue.dim:].contiguous(),
        "write_pointer": queue.write_pointer.clone(), "filled": queue.filled.clone(),
        "_extra_state": {k: v for k, v in queue.get_extra_state().items() if k != "shard"},
        "stats.row_sums": sums, "stats.row_inv_norms": norms,
    }
