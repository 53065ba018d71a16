"""Queue statistics kept across steps (docs/DESIGN.md §3.6): a training step with a queue of q rows
costs O(N·q·d), not O((N+q)²·d). This module is the math and the kept state; the kernels come
from the backend (``registry.QueueKernels``), the rows from the ring buffer (``ring.FeatureQueue``),
and the step that uses them is step.py.

For kl, reverse_kl and symmetric_kl every per-row quantity is a sum over the row's neighbours of
four pair terms (§3.6):

    A_i = Σ_j K'_ij,   B_i = Σ_j K_ij,   C_i = Σ_j K'_ij log(K'_ij/K_ij),   D_i = Σ_j K_ij log(K_ij/K'_ij)

    kl_i = C_i/A_i − log A_i + log B_i        reverse_kl_i = D_i/B_i − log B_i + log A_i

For a queue row the sum splits into a part over the other queue rows, which changes only when
rows enter or leave (kept in float64 by ``QueueStatistics``, updated on enqueue), and a part over
the live rows (from the N×q cross block of this step). A live row's sums come from the same cross
block and the N×N live block. The gradient into the live rows needs, besides those blocks, only
the per-row totals: it is the backend's queue backward with the totals as saved statistics. js
does not split this way (A and B sit inside the log of the mixture): with a queue it takes the
full pass over the queue's rows, exactly.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from .. import sizing
from ..distributed import RankLocalState
from ..reference import compute_dtype
from ..reference import inverse_norms as reference_inverse_norms
from .layout import SlotLayout

# Divergences whose per-row values decompose into the sums A, B, C, D.
DECOMPOSABLE = ("kl", "reverse_kl", "symmetric_kl")
N_STATS = 4  # A, B, C, D


def inverse_norms(t: torch.Tensor) -> torch.Tensor:
    """1/‖row‖ in the compute dtype, 0 for a zero row (the reference's rule, docs/DESIGN.md §2.1)."""
    return reference_inverse_norms(t.to(compute_dtype(t.dtype)))


def _terms(cos_x: torch.Tensor, cos_y: torch.Tensor, eps: float) -> torch.Tensor:
    """(4, …) pair terms K', K, K'·log(K'/K), K·log(K/K') from the cosines of both sides."""
    ka = torch.clamp(0.5 + 0.5 * cos_x, min=0.0) + eps
    kb = torch.clamp(0.5 + 0.5 * cos_y, min=0.0) + eps
    lab = torch.log(ka / kb)
    return torch.stack([ka, kb, ka * lab, -kb * lab])


def pair_terms(gram_x, gram_y, rx_rows, ry_rows, rx_cols, ry_cols, eps: float) -> torch.Tensor:
    """(4, R, C) pair terms from raw Gram blocks and the rows' and columns' inverse norms."""
    return _terms(gram_x * rx_rows[:, None] * rx_cols[None, :], gram_y * ry_rows[:, None] * ry_cols[None, :], eps)


def self_terms(rx: torch.Tensor, ry: torch.Tensor, eps: float) -> torch.Tensor:
    """(4, n) float64 terms of the pair (i, i): cos = 1 for a row, 0 for a zero row."""
    return _terms((rx > 0).double(), (ry > 0).double(), eps)


def finite_rows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N,) flags: row pair i has only finite values. One reduction per side (the row's largest
    |entry| is finite exactly when every entry is: amax propagates NaN)."""
    return torch.isfinite(x.detach().abs().amax(dim=1)) & torch.isfinite(y.detach().abs().amax(dim=1))


def _weighted(terms: torch.Tensor, weight) -> torch.Tensor:
    """terms × weight, where a zero weight leaves its row or column out even if its terms are NaN."""
    if weight is None:
        return terms
    return torch.where(weight != 0, terms * weight, 0.0)


def cross_sums_torch(xr, yr, rxr, ryr, xc, yc, rxc, ryc, eps: float, row_weight=None, col_weight=None,
                     row_split: Optional[int] = None, keep_gram: bool = False):
    """The definition of ``QueueKernels.cross_sums`` in PyTorch (the reference backend's kernel):
    weighted sums of the pair terms between row set R and column set C.

    xr, yr: (R, d) rows and rxr, ryr their inverse norms; xc, yc, rxc, ryc the same for C.
    Returns (row_sums (4, R), col_sums (2, 4, C), gram_x, gram_y), float64:
    row_sums[:, i] = Σ_j wc_j T_ij; col_sums[g, :, j] = Σ_{i in group g} wr_i T_ij, group 0 the rows
    before ``row_split`` (default R), group 1 the rest; T = (K', K, K'·log(K'/K), K·log(K/K'));
    weights default to 1, and a zero weight leaves its row or column out even where its terms are
    NaN. Column chunks bounded by D2SM_PANEL_MB (never an R×C matrix at once) unless
    ``keep_gram``, which returns the raw Gram blocks (R, C) (else None). Differentiable (autograd
    through the sums: the reference's gradient). Autocast never lowers its precision.
    """
    cdt = compute_dtype(torch.promote_types(xr.dtype, xc.dtype))
    n_rows, n_cols = xr.shape[0], xc.shape[0]
    split = n_rows if row_split is None else row_split
    with torch.autocast(xr.device.type, enabled=False):
        xr, yr, xc, yc = (t.to(cdt) for t in (xr, yr, xc, yc))
        row_parts, col_parts, grams = [], [], ([], [])
        if n_rows and n_cols:
            wr = None if row_weight is None else row_weight.to(cdt)
            step = n_cols if keep_gram else sizing.queue_chunk_columns(n_rows, xr.element_size())
            for c0 in range(0, n_cols, step):
                c1 = min(n_cols, c0 + step)
                gx, gy = xr @ xc[c0:c1].T, yr @ yc[c0:c1].T
                terms = pair_terms(gx, gy, rxr, ryr, rxc[c0:c1], ryc[c0:c1], eps)
                wc = None if col_weight is None else col_weight[c0:c1].to(cdt)
                row_parts.append(_weighted(terms, wc).sum(dim=2, dtype=torch.float64))
                by_row = _weighted(terms, None if wr is None else wr[:, None])
                col_parts.append(torch.stack([by_row[:, :split].sum(dim=1, dtype=torch.float64),
                                              by_row[:, split:].sum(dim=1, dtype=torch.float64)]))
                if keep_gram:
                    grams[0].append(gx)
                    grams[1].append(gy)
        zeros = xr.new_zeros
        row_sums = sum(row_parts[1:], row_parts[0]) if row_parts else zeros(N_STATS, n_rows, dtype=torch.float64)
        col_sums = torch.cat(col_parts, dim=2) if col_parts else zeros(2, N_STATS, n_cols, dtype=torch.float64)
        gram_x = gram_y = None
        if keep_gram:
            gram_x = grams[0][0] if grams[0] else zeros(n_rows, n_cols)
            gram_y = grams[1][0] if grams[1] else zeros(n_rows, n_cols)
        return row_sums, col_sums, gram_x, gram_y


def block_sums(x, y, rx, ry, eps: float, exclude_self: bool, col_weight=None,
               budget_mb: Optional[float] = None) -> torch.Tensor:
    """(4, n) float64 sums of rows over the other rows of the same set (or all of them with
    exclude_self=False), columns weighted by col_weight. Row chunks bound the memory (D2SM_PANEL_MB,
    default ``budget_mb`` or 64 MiB); the diagonal is masked, never subtracted, so nothing is left
    of it by rounding. Differentiable."""
    cdt = compute_dtype(x.dtype)
    xs, ys = x.to(cdt), y.to(cdt)
    n = xs.shape[0]
    wc = None if col_weight is None else col_weight.to(cdt)
    step = sizing.queue_chunk_columns(n, xs.element_size(), budget_mb)  # rows per chunk, against all n columns
    parts = []
    with torch.autocast(x.device.type, enabled=False):
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            terms = pair_terms(xs[r0:r1] @ xs.T, ys[r0:r1] @ ys.T, rx[r0:r1], ry[r0:r1], rx, ry, eps)
            if exclude_self:
                diagonal = torch.arange(r0, r1, device=xs.device)[:, None] == torch.arange(n, device=xs.device)
                terms = torch.where(diagonal, 0.0, terms)
            parts.append(_weighted(terms, wc).sum(dim=2, dtype=torch.float64))
    if not parts:
        return torch.zeros(N_STATS, n, dtype=torch.float64, device=x.device)
    return torch.cat(parts, dim=1)


def divergence_rows(sums: torch.Tensor, divergence: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row divergence f, ū and v̄ (docs/DESIGN.md §3.2) from float64 sums (4, n) = A, B, C, D;
    ū and v̄ of the centred u, v (§3.3): Σ p = Σ q = 1 make the shifts' means exactly 0."""
    a, b, c, d = sums
    log_ba = torch.log(b / a)
    kl = c / a + log_ba
    rkl = d / b - log_ba
    if divergence == "kl":
        return kl, kl, torch.zeros_like(kl)
    if divergence == "reverse_kl":
        return rkl, torch.zeros_like(rkl), rkl
    if divergence == "symmetric_kl":
        return 0.5 * (kl + rkl), 0.5 * kl, 0.5 * rkl
    raise ValueError(f"divergence {divergence!r} does not decompose into queue statistics; use one of {DECOMPOSABLE}")


# ---------------------------------------------------------------------------------------------
# The kept state
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class EnqueuePlan:
    """Where an enqueue of a batch writes (docs/DESIGN.md §3.6), computed on the device from the
    batch's finite flags and the ring's pointer and fill (no host sync): the K = min(N, size)
    candidate slots, which of them take a row (``takes``) and from which batch row (``source``),
    which of those held a row that leaves (``evicted``), and the rows they hold now."""
    slots: torch.Tensor
    takes: torch.Tensor
    source: torch.Tensor
    evicted: torch.Tensor
    old_x: torch.Tensor
    old_y: torch.Tensor
    old_rx: Optional[torch.Tensor]  # the held rows' kept inverse norms (compute dtype; None without statistics)
    old_ry: Optional[torch.Tensor]
    n_valid: torch.Tensor  # finite rows of the batch (0-d, on the device)


@dataclasses.dataclass
class PendingBatch:
    """What a loss over (batch, queue) leaves for ``FeatureQueue.enqueue_last_batch``: its own
    copy of the batch's rows (in the queue's dtype), the enqueue plan it was computed for, the
    batch rows' sums over the filled rows (4, N) and the change of every filled row's sums that
    the enqueue brings (4, filled): + the finite batch rows' terms − the evicted rows' terms."""
    x: torch.Tensor
    y: torch.Tensor
    plan: Optional[EnqueuePlan]  # None: the loss knew no row could be evicted (the queue far from full)
    row_sums: torch.Tensor
    col_delta: torch.Tensor


class QueueStatistics(RankLocalState):
    """The kept statistics of a ``FeatureQueue`` (docs/DESIGN.md §3.6): for each of its ``size``
    slots the float64 sums A, B, C, D of the row's pair terms over the other filled rows, for one
    kernel floor ``eps``, and the rows' inverse norms; their update on enqueue; and the pending
    batch of the last loss.

    Invariants: ``row_sums`` stays float64 through every module cast (``.float()``, ``.half()``,
    ``.to(dtype)``): a cast that changes the rows' dtype recomputes the sums for the new rows
    (``FeatureQueue._apply``). The pending batch is discarded by every change of the queue.
    """

    def __init__(self, size: int, dtype: torch.dtype, device, eps: float):
        super().__init__()
        self._init_rank_local()
        self.eps = float(eps)
        self.register_buffer("row_sums", torch.zeros(N_STATS, size, dtype=torch.float64, device=device))
        self.register_buffer("row_inv_norms", torch.zeros(2, size, dtype=compute_dtype(dtype), device=device))
        self._pending: Optional[PendingBatch] = None

    def extra_repr(self) -> str:
        return f"eps={self.eps}"

    # -- pending batch ---------------------------------------------------------------------------
    def record_pending(self, pending: Optional[PendingBatch]) -> None:
        self._pending = pending

    def discard_pending(self) -> None:
        self._pending = None

    def has_pending(self) -> bool:
        return self._pending is not None

    def take_pending(self) -> Optional[PendingBatch]:
        pending, self._pending = self._pending, None
        return pending

    def __getstate__(self):  # pickling and deepcopy: a pending batch belongs to the live object
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_pending"] = None
        return state

    # -- the sums --------------------------------------------------------------------------------
    def sums(self, filled: int) -> torch.Tensor:
        return self.row_sums[:, :filled]

    def inverse_norms(self, filled: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.row_inv_norms[0, :filled], self.row_inv_norms[1, :filled]

    @torch.no_grad()
    def reset(self) -> None:
        self.row_sums.zero_()
        self.row_inv_norms.zero_()
        self.discard_pending()

    @torch.no_grad()
    def refresh(self, xm: torch.Tensor, ym: torch.Tensor, others=()) -> None:
        """Recompute the sums of the filled rows (xm, ym) exactly: O(q²·d), in row chunks.
        ``others``: the queue's rows stored elsewhere, as (x, y) blocks (a sharded queue)."""
        n = xm.shape[0]
        rx, ry = inverse_norms(xm), inverse_norms(ym)
        self.row_inv_norms.zero_()
        self.row_sums.zero_()
        self.row_inv_norms[0, :n], self.row_inv_norms[1, :n] = rx.to(self.row_inv_norms.dtype), \
            ry.to(self.row_inv_norms.dtype)
        budget = sizing.refresh_chunk_mb(xm.device)
        sums = block_sums(xm, ym, rx, ry, self.eps, exclude_self=True, budget_mb=budget)
        for xo, yo in others:
            sums = sums + cross_sums_torch(xm, ym, rx, ry, xo, yo, inverse_norms(xo), inverse_norms(yo), self.eps)[0]
        self.row_sums[:, :n] = sums
        self.discard_pending()

    @torch.no_grad()
    def update(self, plan: EnqueuePlan, new_x, new_y, filled, x_buffer, y_buffer, kernels, layout: SlotLayout,
               pending: Optional[PendingBatch] = None) -> None:
        """Before the slots are written: the entering rows' terms are added to every kept row's
        sums, the evicted rows' terms subtracted, and the entering rows' own sums formed over the
        kept rows and the other entering rows. O(K·q·d) for K candidate slots in one
        ``cross_sums`` call; no host sync. With ``pending`` (the loss's sums for this very batch
        and plan) only O(K²·d): the queue is not read again. ``layout`` says which slots this
        process stores (all of them, or a rank's shard: then the entering rows' sums over the
        stored rows are summed over the ranks)."""
        eps = self.eps
        slots, takes, evicted = plan.slots, plan.takes, plan.evicted
        cdt = self.row_inv_norms.dtype
        t, s, write = layout.targets(plan)
        lands = write & takes[s]
        kept = layout.positions(self.row_sums.shape[1], slots.device) < filled  # slots fill in order
        kept[t] = kept[t] & ~lands
        rx_new, ry_new = inverse_norms(new_x), inverse_norms(new_y)
        rx_old, ry_old = plan.old_rx, plan.old_ry
        new_new = block_sums(new_x, new_y, rx_new, ry_new, eps, exclude_self=True, col_weight=takes.to(cdt))
        if pending is None:
            # entering rows (weight +1 where they take) and evicted rows (−1) against every slot
            rows_x, rows_y = torch.cat([new_x, plan.old_x]), torch.cat([new_y, plan.old_y])
            weight = torch.cat([takes.to(cdt), -evicted.to(cdt)])
            row_sums, col_sums, _, _ = kernels.cross_sums(
                rows_x, rows_y, torch.cat([rx_new, rx_old]), torch.cat([ry_new, ry_old]),
                x_buffer, y_buffer, self.row_inv_norms[0], self.row_inv_norms[1], eps, weight, kept.to(cdt),
                slots.shape[0], False)
            entering = layout.reduce(row_sums[:, :slots.shape[0]]) + new_new
            col_delta = col_sums[0] + col_sums[1]
        else:
            on_evicted, _, _, _ = kernels.cross_sums(new_x, new_y, rx_new, ry_new, plan.old_x, plan.old_y, rx_old,
                                                     ry_old, eps, None, evicted.to(cdt), slots.shape[0], False)
            entering = pending.row_sums[:, plan.source] - on_evicted + new_new
            col_delta = torch.zeros_like(self.row_sums)
            col_delta[:, :pending.col_delta.shape[1]] = pending.col_delta
        self.row_sums.add_(torch.where(kept, col_delta, 0.0))
        self.row_sums[:, t] = torch.where(lands, entering[:, s], self.row_sums[:, t])
        self.row_inv_norms[0, t] = torch.where(lands, rx_new[s].to(cdt), self.row_inv_norms[0, t])
        self.row_inv_norms[1, t] = torch.where(lands, ry_new[s].to(cdt), self.row_inv_norms[1, t])
        self.discard_pending()


@dataclasses.dataclass
class QueueView:
    """What the step over a queue (step.py) needs of it: the filled rows this process stores
    (views), their kept statistics, the plan an enqueue of the batch would follow (None when no
    row can be evicted by it), the queue's storage dtype and its fill (every rank's rows)."""
    x: torch.Tensor
    y: torch.Tensor
    stats: QueueStatistics
    plan: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Optional[EnqueuePlan]]
    dtype: torch.dtype
    filled: int
