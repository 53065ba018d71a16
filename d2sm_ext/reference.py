"""Pure-PyTorch reference of the D2SM divergence (docs/DESIGN.md §2): the ground truth every backend is
tested against.

It materialises the M×M kernel matrices on purpose: it is written to be obviously the formula,
not to be fast. Autograd provides the gradients.

Conventions (shared by every backend, see ``d2sm_ext.functional`` for the public contract):

* ``x̂ = x / ‖x‖``; a row whose norm is exactly zero stays zero (its cosines are 0) and receives
  a zero gradient (a zero vector has no direction; we do not return the 1/tiny blow-up that
  ``x / max(‖x‖, tiny)`` would give).
* ``K'_ij = max((1 + x̂_i·x̂_j) / 2, 0) + eps``. The clamp only removes rounding below zero for
  antipodal rows, so the kernel is never negative and ``log K'`` is finite whenever eps > 0.
* Terms with a zero probability contribute zero (``0·log 0 = 0``), so eps = 0 is allowed; a
  divergence can then be +inf, which is the true value.
* float16/bfloat16 inputs are computed in float32 and the result is returned in the input dtype
  (in float32 under autocast, see ``output_dtype``); float32 and float64 are computed natively.
  Autocast never lowers the precision of the formula itself.
"""
from __future__ import annotations

from typing import Optional

import torch

DIVERGENCES = ("kl", "reverse_kl", "symmetric_kl", "js")
REDUCTIONS = ("mean", "sum", "none")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a backend computes in for inputs of ``dtype`` (half types are upcast)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def output_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of a loss computed from ``x``: x's own dtype, or under autocast for x's device
    the compute dtype (float32 for half and float32 inputs), as PyTorch's losses return."""
    if torch.is_autocast_enabled(x.device.type):
        return compute_dtype(x.dtype)
    return x.dtype


def promote(*tensors: Optional[torch.Tensor]) -> tuple:
    """The tensors cast to their widest dtype, as torch.promote_types (float16 with bfloat16
    gives float32); differentiable casts; None stays None."""
    present = [t.dtype for t in tensors if t is not None]
    dtype = present[0]
    for other in present[1:]:
        dtype = torch.promote_types(dtype, other)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def _peak_exponent(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the largest |entry| (one reduction, no |v| temporary: the inf-norm, NaN-propagating
    like abs().amax) and its binary exponent (peak = m·2^e, m in [0.5, 1))."""
    peak = torch.linalg.vector_norm(v.detach(), ord=float("inf"), dim=-1)
    return peak, torch.frexp(peak)[1]


def _scale_from_peak(peak: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    scale = torch.ldexp(torch.ones_like(peak), exponent)
    finite_nonzero = torch.isfinite(peak) & (peak > 0)
    return torch.where(finite_nonzero, scale, torch.where(peak == 0, torch.ones_like(peak), peak))


def row_scales(v: torch.Tensor) -> torch.Tensor:
    """A power of two per row (last dimension reduced): 2^e with max|v| = m·2^e, m in [0.5, 1);
    1 for a zero row; the peak itself (inf or NaN) for a non-finite row. Dividing a row by it is
    exact and brings its entries into [-1, 1], so squares and dot products of the scaled rows
    neither overflow nor underflow (docs/DESIGN.md §2.1). Not differentiated: what it scales is
    homogeneous in the row."""
    return _scale_from_peak(*_peak_exponent(v))


def inverse_norms(v: torch.Tensor) -> torch.Tensor:
    """``1/‖v‖`` per row (last dimension reduced), 0 for a zero row (a zero vector has no
    direction: its cosines are 0 and its gradient 0, never the 1/tiny blow-up).

    Overflow-safe: ``1/‖v‖ = (1/‖v/s‖)/s`` with s the row's power of two from ``row_scales``, so
    a row whose squared norm overflows (float32 entries ≳ 2e19) or underflows still gets its true
    inverse norm; for every other row the result is bitwise the unscaled formula's (scaling by a
    power of two is exact). A non-finite row gives NaN (never a plausible 0). A nonzero row whose
    inverse norm exceeds the dtype's range (‖v‖ below 1/max, subnormal entries only) is read as
    a zero row. The gradient is 1/‖v‖'s: s is a constant of the expression, which is homogeneous
    of degree -1 in v."""
    scale = row_scales(v)
    norm = torch.linalg.vector_norm(v / scale[..., None], dim=-1)
    zero = norm == 0
    # Two wheres keep the untaken 1/0 branch out of autograd (no 0·inf = NaN in the gradient).
    safe = torch.where(zero, torch.ones_like(norm), norm)
    inv = (1.0 / safe) / scale
    return torch.where(zero | (torch.isinf(inv) & torch.isfinite(scale)), torch.zeros_like(inv), inv)


# Rows whose largest |entry| lies in [2^-40, 2^40] are used as they are: squares, dot products
# and Gram entries of such rows stay far inside float32's range for any d below 2^40.
_SAFE_PEAK_EXP = 40


def safe_rows(v: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``v`` with every row whose largest |entry| lies outside [2^-40, 2^40] divided by its
    power of two from ``row_scales`` (docs/DESIGN.md §2.1). The divergence depends on each row
    only through its direction, and dividing by a power of two is exact, so values are
    unchanged while no backend's Gram products (x_i·x_j of raw rows) can overflow or underflow;
    autograd carries the factor into the gradient. Other rows are divided by 1 (bitwise
    unchanged) and non-finite rows stay non-finite. O(M·d), never a host sync (the division is
    done whether or not a row needs it). None stays None."""
    if v is None or v.numel() == 0:
        return v
    peak, exponent = _peak_exponent(v)  # one O(M·d) reduction, shared with the scale
    outside = (exponent.abs() > _SAFE_PEAK_EXP) & (peak > 0) | ~torch.isfinite(peak)
    scale = torch.where(outside, _scale_from_peak(peak, exponent), torch.ones_like(peak))
    return v / scale[..., None].to(v.dtype)


def normalize_rows(v: torch.Tensor) -> torch.Tensor:
    """``v / ‖v‖`` per row; zero rows stay zero with a zero gradient (no NaN, no 1/tiny)."""
    return v * inverse_norms(v)[..., None]


def _kernel_matrix(v: torch.Tensor, eps: float) -> torch.Tensor:
    vn = normalize_rows(v)
    gram = vn @ vn.transpose(-1, -2)
    return torch.clamp(0.5 + 0.5 * gram, min=0.0) + eps


def _safe_log(t: torch.Tensor) -> torch.Tensor:
    """``log t`` for ``t >= 0`` with ``log 0`` read as 0 and no -inf reaching autograd; a NaN
    stays NaN (a non-finite input must show in the loss, never be hidden)."""
    return torch.log(torch.where(t == 0, torch.ones_like(t), t))


def clamp_rounding(rows: torch.Tensor) -> torch.Tensor:
    """Per-row divergences are >= 0; a value below 0 is rounding of an exactly-zero divergence
    and is returned as 0. The gradient is left as the formula's (straight through), so a fused
    backend that clamps only its values still has the reference's gradients. NaN and +inf pass."""
    return torch.where(rows < 0, rows - rows.detach(), rows)


def _plogp_ratio(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Elementwise ``p·log(p/q)`` with ``0·log(0/q) = 0`` and ``p·log(p/0) = +inf`` for p > 0.

    Excluded (diagonal) entries have p = q = 0 and contribute 0 with a zero gradient;
    ``torch.xlogy`` would give 0/0 = NaN in its backward there.
    """
    value = p * (_safe_log(p) - _safe_log(q))
    infinite = (p > 0) & (q == 0)
    return torch.where(infinite, torch.full_like(value, float("inf")), value)


def _row_divergence(p: torch.Tensor, q: torch.Tensor, divergence: str) -> torch.Tensor:
    """Per-row divergence between the neighbour distributions ``p`` (restored) and ``q`` (clean);
    excluded entries are zero in both and contribute nothing."""
    if divergence == "kl":
        terms = _plogp_ratio(p, q)
    elif divergence == "reverse_kl":
        terms = _plogp_ratio(q, p)
    elif divergence == "symmetric_kl":
        terms = 0.5 * _plogp_ratio(p, q) + 0.5 * _plogp_ratio(q, p)
    elif divergence == "js":
        m = 0.5 * (p + q)
        terms = 0.5 * _plogp_ratio(p, m) + 0.5 * _plogp_ratio(q, m)
    else:  # validated by the caller; kept so a new name cannot fall through silently
        raise ValueError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")
    return terms.sum(dim=-1)


def d2sm_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    divergence: str = "kl",
    exclude_self: bool = True,
    reduction: str = "mean",
    eps: float = 1e-8,
    x_memory: torch.Tensor | None = None,
    y_memory: torch.Tensor | None = None,
    precision: str = "auto",
) -> torch.Tensor:
    """D2SM divergence of restored features ``x`` against clean features ``y``.

    Shapes: ``x, y`` are (M, d) or (B, M, d); ``x_memory, y_memory`` (Q, d) or (B, Q, d) with the
    same leading shape. The sample set is the live rows followed by the memory rows; every row's
    divergence counts, gradients reach only ``x`` and ``y`` (memory rows are detached).
    Inputs are assumed validated (``d2sm_ext.functional`` does that). ``precision`` is accepted
    for a uniform backend signature and ignored: matmuls follow PyTorch's global float32 setting.
    """
    return run_in_compute_dtype(dense_divergence, x, y, divergence, exclude_self, reduction, eps, x_memory, y_memory)


def run_in_compute_dtype(fn, x, y, divergence, exclude_self, reduction, eps, x_memory, y_memory):
    """``fn`` (``dense_divergence``'s signature) on the inputs cast to the compute dtype, memory rows
    detached, autocast off, the result in ``output_dtype(x)``: the dtype rules of the pure-PyTorch
    backends (the reference and backends/dense_backend.py)."""
    cdt = compute_dtype(x.dtype)
    if x_memory is not None:
        x_memory, y_memory = x_memory.detach().to(cdt), y_memory.detach().to(cdt)
    # Autocast would run the matmuls in half precision (and everything after them): the formula is
    # evaluated in the compute dtype whatever the autocast state.
    with torch.autocast(x.device.type, enabled=False):
        out = fn(x.to(cdt), y.to(cdt), divergence, exclude_self, reduction, eps, x_memory, y_memory)
    return out.to(output_dtype(x))


def dense_divergence(x, y, divergence, exclude_self, reduction, eps, x_memory=None, y_memory=None):
    """The dense computation in the inputs' own dtype, no upcast. ``d2sm_reference`` calls it in
    the compute dtype; tests call it on float16/bfloat16 inputs as the "plain PyTorch in low
    precision" yardstick that fused kernels' low-precision errors are judged against."""
    xs, ys = x, y
    if x_memory is not None:
        xs = torch.cat([xs, x_memory.detach()], dim=-2)
        ys = torch.cat([ys, y_memory.detach()], dim=-2)

    kx = _kernel_matrix(xs, eps)
    ky = _kernel_matrix(ys, eps)
    if exclude_self:
        m = xs.shape[-2]
        off_diag = ~torch.eye(m, dtype=torch.bool, device=xs.device)
        kx = kx * off_diag
        ky = ky * off_diag
    p = kx / kx.sum(dim=-1, keepdim=True)
    q = ky / ky.sum(dim=-1, keepdim=True)
    return reduce_rows(clamp_rounding(_row_divergence(p, q, divergence)), reduction)


def reduce_rows(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    """The per-row divergences reduced as ``reduction`` says (docs/DESIGN.md §2.4)."""
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows
