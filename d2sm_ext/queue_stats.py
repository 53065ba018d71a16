"""Queue statistics kept across steps (docs/DESIGN.md §3.6): a training step with a queue of q rows
costs O(N·q·d), not O((N+q)²·d).

For kl, reverse_kl and symmetric_kl every per-row quantity is a sum over the row's neighbours of
four pair terms (§3.6):

    A_i = Σ_j K'_ij,   B_i = Σ_j K_ij,   C_i = Σ_j K'_ij log(K'_ij/K_ij),   D_i = Σ_j K_ij log(K_ij/K'_ij)

    kl_i = C_i/A_i − log A_i + log B_i        reverse_kl_i = D_i/B_i − log B_i + log A_i

For a queue row the sum splits into a part over the other queue rows, which changes only when
rows enter or leave (kept in float64 by the queue, updated on enqueue), and a part over the
live rows (from the N×q cross block of this step). A live row's sums come from the same cross
block and the N×N live block. The gradient into the live rows needs, besides those blocks, only
the per-row totals: it is the fused backends' backward op with the totals as its saved
statistics (O(N·(N+q)·d)). js does not split this way (A and B sit inside the log of the
mixture): with a queue it takes the full pass over queue.memory() (O((N+q)²·d)), exactly.

``cross_sums`` is the one pairwise primitive: column chunks bounded by a memory budget (never an
N×q matrix at once), float64 sums, a fixed summation order (deterministic).
"""
from __future__ import annotations

import math

import torch

from . import env
from .reference import compute_dtype, output_dtype
from .reference import inverse_norms as reference_inverse_norms

# Divergences whose per-row values decompose into the sums A, B, C, D.
DECOMPOSABLE = ("kl", "reverse_kl", "symmetric_kl")
N_STATS = 4  # A, B, C, D
_DEFAULT_CHUNK_MB = 64.0


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


def _chunk_columns(rows: int, element_size: int) -> int:
    budget = (env.positive_number("D2SM_PANEL_MB") or _DEFAULT_CHUNK_MB) * 2 ** 20
    # the two Gram blocks and the (4, R, C) terms, with their temporaries: ~12 values per pair
    return max(1, int(budget // (12 * element_size * max(rows, 1))))


def _has_fused_cross_sums(t: torch.Tensor) -> bool:
    """The C++ extension's fused kernel serves CPU tensors (csrc/cpu/kernels.cpp)."""
    return t.device.type == "cpu" and hasattr(torch.ops.d2sm_ext, "cross_sums") and \
        torch._C._dispatch_has_kernel_for_dispatch_key("d2sm_ext::cross_sums", "CPU")


def _weighted(terms: torch.Tensor, weight) -> torch.Tensor:
    """terms × weight, where a zero weight leaves its row or column out even if its terms are NaN."""
    if weight is None:
        return terms
    return torch.where(weight != 0, terms * weight, 0.0)


def _triton_cross_sums(t: torch.Tensor):
    """Triton's kernel (d2sm_ext.triton_backend.cross_sums) for CUDA tensors, when it loads."""
    if t.device.type != "cuda":
        return None
    try:
        from .triton_backend import cross_sums as triton_cross_sums
    except Exception:  # Triton missing or broken: the PyTorch form below
        return None
    return triton_cross_sums


def cross_sums(xr, yr, rxr, ryr, xc, yc, rxc, ryc, eps: float, row_weight=None, col_weight=None):
    """Weighted sums of the pair terms between row set R and column set C (docs/DESIGN.md §3.6).

    xr, yr: (R, d) rows and rxr, ryr their inverse norms; xc, yc, rxc, ryc the same for C.
    Returns (row_sums (4, R), col_sums (4, C)), float64: row_sums[:, i] = Σ_j wc_j T_ij and
    col_sums[:, j] = Σ_i wr_i T_ij (weights default to 1), T = (K', K, K'·log(K'/K), K·log(K/K'));
    a zero weight leaves its row or column out even where its terms are NaN.
    Never an R×C matrix at once. CPU tensors take the C++ extension's fused kernel, CUDA tensors
    Triton's (float64 and a missing Triton: this chunked PyTorch form, chunks bounded by
    D2SM_PANEL_MB). Autocast never lowers its precision.
    """
    cdt = compute_dtype(xr.dtype)
    with torch.autocast(xr.device.type, enabled=False):
        if _has_fused_cross_sums(xr):
            return torch.ops.d2sm_ext.cross_sums(xr, yr, rxr, ryr, xc, yc, rxc, ryc, float(eps), row_weight,
                                                 col_weight, False)[:2]
        triton_sums = _triton_cross_sums(xr)
        if triton_sums is not None and torch.promote_types(xr.dtype, xc.dtype) != torch.float64:
            return triton_sums(xr, yr, rxr, ryr, xc, yc, rxc, ryc, eps, row_weight, col_weight)
        xr, yr, xc, yc = (t.to(cdt) for t in (xr, yr, xc, yc))
        n_rows, n_cols = xr.shape[0], xc.shape[0]
        row_sums = torch.zeros(N_STATS, n_rows, dtype=torch.float64, device=xr.device)
        col_sums = torch.zeros(N_STATS, n_cols, dtype=torch.float64, device=xr.device)
        if n_rows == 0 or n_cols == 0:
            return row_sums, col_sums
        wr = None if row_weight is None else row_weight.to(cdt)
        step = _chunk_columns(n_rows, xr.element_size())
        for c0 in range(0, n_cols, step):
            c1 = min(n_cols, c0 + step)
            terms = pair_terms(xr @ xc[c0:c1].T, yr @ yc[c0:c1].T, rxr, ryr, rxc[c0:c1], ryc[c0:c1], eps)
            wc = None if col_weight is None else col_weight[c0:c1].to(cdt)
            row_sums += _weighted(terms, wc).sum(dim=2, dtype=torch.float64)
            col_sums[:, c0:c1] = _weighted(terms, None if wr is None else wr[:, None]).sum(dim=1, dtype=torch.float64)
        return row_sums, col_sums


def divergence_rows(sums: torch.Tensor, divergence: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row divergence f, ū and v̄ (docs/DESIGN.md §3.2) from float64 sums (4, n) = A, B, C, D."""
    a, b, c, d = sums
    log_ba = torch.log(b / a)
    kl = c / a + log_ba
    rkl = d / b - log_ba
    if divergence == "kl":
        return kl, kl, -torch.ones_like(kl)
    if divergence == "reverse_kl":
        return rkl, -torch.ones_like(rkl), rkl
    if divergence == "symmetric_kl":
        return 0.5 * (kl + rkl), 0.5 * (kl - 1.0), 0.5 * (rkl - 1.0)
    raise ValueError(f"divergence {divergence!r} does not decompose into queue statistics; use one of {DECOMPOSABLE}")


def block_sums(x, y, rx, ry, eps: float, exclude_self: bool, col_weight=None) -> torch.Tensor:
    """(4, n) float64 sums of rows over the other rows of the same set (or all of them with
    exclude_self=False), columns weighted by col_weight. Row chunks bound the memory; the
    diagonal is masked, never subtracted, so nothing is left of it by rounding."""
    cdt = compute_dtype(x.dtype)
    xs, ys = x.to(cdt), y.to(cdt)
    n = xs.shape[0]
    out = torch.zeros(N_STATS, n, dtype=torch.float64, device=x.device)
    wc = None if col_weight is None else col_weight.to(cdt)
    step = _chunk_columns(n, xs.element_size())  # rows per chunk, against all n columns
    with torch.autocast(x.device.type, enabled=False):
        _block_rows(xs, ys, rx, ry, eps, exclude_self, wc, step, out)
    return out


def _block_rows(xs, ys, rx, ry, eps, exclude_self, wc, step, out) -> None:
    n = xs.shape[0]
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        terms = pair_terms(xs[r0:r1] @ xs.T, ys[r0:r1] @ ys.T, rx[r0:r1], ry[r0:r1], rx, ry, eps)
        if exclude_self:
            idx = torch.arange(r0, r1, device=xs.device)
            terms[:, idx - r0, idx] = 0.0
        if wc is not None:
            terms = _weighted(terms, wc)
        out[:, r0:r1] = terms.sum(dim=2, dtype=torch.float64)


# The C++ cross block may hand its N×q Gram blocks to the gradient (fused_backward_cross) when
# both fit in this many bytes: two N×q×d products fewer per step.
KEEP_GRAM_BYTES = 1 << 30


def _gram_handover(x, xm, reduction: str, backward_op) -> bool:
    """Whether the forward keeps the cross block's Gram blocks for the gradient: CPU tensors with
    the C++ extension's backward op, a gradient formed in the forward (mean/sum), and blocks
    within KEEP_GRAM_BYTES."""
    if reduction == "none" or backward_op is not getattr(torch.ops.d2sm_ext, "fused_backward", None):
        return False
    if not _has_fused_cross_sums(x):
        return False
    return 2 * x.shape[0] * xm.shape[0] * compute_dtype(x.dtype).itemsize <= KEEP_GRAM_BYTES


class QueueDivergence(torch.autograd.Function):
    """The loss over (live rows, queue rows) from the queue's kept statistics. Forward: values
    (and, for "mean"/"sum", the gradient through the backend's backward op, as the fused ops do);
    backward: scales it, or for "none" runs the backward op with the upstream gradient."""

    @staticmethod
    def forward(ctx, x, y, queue, divergence, exclude_self, reduction, eps, backward_op, tf32):
        n = x.shape[0]
        xm, ym = queue.memory()
        filled = xm.shape[0]
        cdt = compute_dtype(x.dtype)
        rx, ry = inverse_norms(x), inverse_norms(y)
        rxm, rym = queue.inverse_norms(filled)
        if rxm.dtype != cdt:  # x promoted past the queue's dtype: norms in the wider dtype, as the full pass
            rxm, rym = inverse_norms(xm.to(cdt)), inverse_norms(ym.to(cdt))
        # Column sums over the finite live rows only: exactly what an enqueue of these rows adds to
        # the queue rows, so the queue can reuse them (a row with a NaN makes the loss NaN anyway).
        finite_rows = torch.isfinite(x).all(dim=1) & torch.isfinite(y).all(dim=1)
        need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        handover = (need_x or need_y) and _gram_handover(x, xm, reduction, backward_op)
        if handover:
            with torch.autocast(x.device.type, enabled=False):
                live_q, queue_l, gram_x, gram_y = torch.ops.d2sm_ext.cross_sums(
                    x, y, rx, ry, xm, ym, rxm, rym, eps, finite_rows.to(cdt), None, True)
        else:
            live_q, queue_l = cross_sums(x, y, rx, ry, xm, ym, rxm, rym, eps, row_weight=finite_rows.to(cdt))
        queue.stash_live_sums(x, y, live_q, queue_l)
        live_totals = live_q + block_sums(x, y, rx, ry, eps, exclude_self)
        queue_totals = queue.statistics(filled) + queue_l
        if not exclude_self:
            queue_totals = queue_totals + self_terms(rxm, rym, eps)
        totals = torch.cat([live_totals, queue_totals], dim=1)
        rows, ubar, vbar = divergence_rows(totals, divergence)
        finite = finite_rows.all()  # queue rows are always finite
        rows = torch.where(finite, rows.clamp_min(0.0), math.nan)  # docs/DESIGN.md §2.5, §2.6
        m = n + filled
        if reduction == "mean":
            value, weights = rows.mean(), torch.full((1, m), 1.0 / m, dtype=cdt, device=x.device)
        elif reduction == "sum":
            value, weights = rows.sum(), torch.ones(1, m, dtype=cdt, device=x.device)
        else:
            value, weights = rows, None
        saved = torch.stack([torch.cat([rx, rxm]), torch.cat([ry, rym]), totals[0].to(cdt), totals[1].to(cdt),
                             ubar.to(cdt), vbar.to(cdt)])[:, None, :]
        ctx.options = (divergence, exclude_self, eps, tf32, reduction, backward_op, x.dtype, y.dtype)
        if weights is not None and (need_x or need_y):
            if handover:  # an op without an autocast kernel: autocast is switched off around it
                with torch.autocast(x.device.type, enabled=False):
                    gx, gy = torch.ops.d2sm_ext.fused_backward_cross(
                        x.detach(), y.detach(), xm, ym, saved, weights, divergence, exclude_self, eps, tf32, need_x,
                        need_y, gram_x, gram_y)
                del gram_x, gram_y
            else:
                gx, gy = backward_op(x.detach(), y.detach(), xm, ym, saved, weights, divergence, exclude_self, eps,
                                     tf32, need_x, need_y)
            nan = torch.where(finite, 0.0, math.nan)  # a non-finite input: NaN gradients too
            ctx.save_for_backward(gx + nan if need_x else gx, gy + nan if need_y else gy)
        else:
            ctx.save_for_backward(x.detach(), y.detach(), xm, ym, saved)
        return value.to(cdt)

    @staticmethod
    def backward(ctx, grad):
        divergence, exclude_self, eps, tf32, reduction, backward_op, x_dtype, y_dtype = ctx.options
        need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if reduction != "none":
            gx, gy = ctx.saved_tensors
            scale = grad.to(gx.dtype if need_x else gy.dtype)
            gx = gx * scale if need_x else None
            gy = gy * scale if need_y else None
        else:
            x, y, xm, ym, saved = ctx.saved_tensors
            gx, gy = backward_op(x, y, xm, ym, saved, grad.reshape(1, -1).to(saved.dtype), divergence, exclude_self,
                                 eps, tf32, need_x, need_y)
            finite = torch.isfinite(x).all() & torch.isfinite(y).all()
            nan = torch.where(finite, 0.0, math.nan)
            gx = gx + nan if need_x else None
            gy = gy + nan if need_y else None
        return (None if gx is None else gx.to(x_dtype), None if gy is None else gy.to(y_dtype),
                None, None, None, None, None, None, None)


def queue_divergence(x, y, queue, divergence, exclude_self, reduction, eps, backward_op, tf32) -> torch.Tensor:
    """The D2SM divergence over (x, y) followed by the queue's filled rows, from its statistics."""
    value = QueueDivergence.apply(x, y, queue, divergence, exclude_self, reduction, float(eps), backward_op, tf32)
    return value.to(output_dtype(x))
