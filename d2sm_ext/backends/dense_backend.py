"""Backend "dense": the dense M×M formula in plain PyTorch, written for speed — "auto"'s fallback on
a GPU where no fused backend was measured faster (d2sm_ext/auto_rules.py), so that the fallback is
never slower than the formula a user would write (issue 26: the reference, written to be obviously
the formula, was 1.16× (fp32) to 1.6× (TF32) slower than that on an H200).

The same numbers as the reference (docs/DESIGN.md §2, tested against it by the backend matrix),
with fewer passes over the M×M matrices: the divergences are formed from row sums of the kernel
matrices (§3.1–3.2), not from the p and q matrices:

    kl_i = Σ_j K'_ij L_ij / A_i,   reverse_kl_i = −Σ_j K_ij L_ij / B_i,
    L_ij = log(p_ij / q_ij) = log(K'_ij / K_ij) + log(B_i / A_i)   (per pair, as the fused backends)

(js needs p and q: m = (p + q)/2 is not a row sum). The excluded diagonal is zeroed in place
(O(M), instead of masking two M×M matrices), and the products Σ_j K'_ij L_ij are
``torch.linalg.vecdot`` (no M×M temporary). Gradients by autograd. Matmuls follow PyTorch's float32
setting (TF32 when the caller allows it), as the reference does.

Needs eps >= 1.18e-38 (``positive_eps``, as the fused backends): then every kernel value is > 0,
every log finite and no 0·log 0 select is needed; with eps = 0 "auto" takes the reference.
"""
from __future__ import annotations

import torch

from ..reference import clamp_rounding, inverse_norms, reduce_rows, run_in_compute_dtype


class _NormalizeRows(torch.autograd.Function):
    """v̂ = v·r with r = 1/‖v‖ (``reference.inverse_norms``: overflow-safe, 0 for a zero row, NaN
    for a non-finite one); backward r·(g − v̂ (v̂·g)), the projection the fused backends use
    (§3.3): two O(M·d) passes instead of autograd through inverse_norms' selects, and at rounding
    level where the direction cannot move (d = 1: float32 within 1e-7 of 0 where autograd's two
    paths through inverse_norms left 3.8e-6)."""

    @staticmethod
    def forward(ctx, v):
        r = inverse_norms(v)[..., None]
        out = v * r
        ctx.save_for_backward(out, r)
        return out

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():  # create_graph=True: out and r are saved as constants
            raise RuntimeError("backend='dense' is differentiable once (its row normalisation has a hand-written "
                               "backward): use backend='reference' for a double backward (create_graph=True)")
        out, r = ctx.saved_tensors
        return r * (g - out * torch.linalg.vecdot(out, g)[..., None])


def _kernel(v: torch.Tensor, eps: float) -> torch.Tensor:
    """max((1 + v̂_i·v̂_j)/2, 0) + eps; eps added last, so an antipodal pair keeps it in float32."""
    vn = _NormalizeRows.apply(v)
    # clamp out of place (its backward reads the Gram), the affine map in place (no saved inputs)
    return torch.clamp(vn @ vn.mT, min=-1.0).mul_(0.5).add_(0.5).add_(eps)


def _diagonal(t: torch.Tensor) -> torch.Tensor:
    return t.diagonal(dim1=-2, dim2=-1)


def _log_ratio(num: torch.Tensor, den: torch.Tensor, exclude_self: bool) -> torch.Tensor:
    """log(num/den) elementwise; with exclude_self the (0/0) diagonal reads log 1 = 0, set in place
    on the quotient (O(M), no mask pass; the quotient is not saved for backward, and the gradient
    of the overwritten entries is 0)."""
    ratio = num / den
    if exclude_self:
        _diagonal(ratio).fill_(1.0)
    return torch.log(ratio)


def _dense(x, y, divergence, exclude_self, reduction, eps, x_memory=None, y_memory=None):
    xs, ys = x, y
    if x_memory is not None:
        xs = torch.cat([xs, x_memory], dim=-2)
        ys = torch.cat([ys, y_memory], dim=-2)
    ka, kb = _kernel(xs, eps), _kernel(ys, eps)
    if exclude_self:
        # Zeroed in place (O(M)): subtracting the diagonal from the row sums instead would cancel
        # catastrophically when the neighbours' kernels are tiny beside the diagonal's 1 + eps.
        _diagonal(ka).zero_()
        _diagonal(kb).zero_()
    a, b = ka.sum(dim=-1), kb.sum(dim=-1)
    if divergence == "js":
        p, q = ka / a[..., None], kb / b[..., None]
        half_sum = 0.5 * (p + q)
        if exclude_self:  # (p and q are 0 there: the quotients p/m, q/m read 0/1, not 0/0)
            _diagonal(half_sum).fill_(1.0)
        rows = 0.5 * (torch.linalg.vecdot(p, _log_ratio(p, half_sum, exclude_self))
                      + torch.linalg.vecdot(q, _log_ratio(q, half_sum, exclude_self)))
    else:
        # log(p/q) = log(K'/K) + log(B/A), per pair, as the fused backends form it (§3.2): adding the
        # row's part after the row sums instead would cancel two ~log(eps) terms when a pair is
        # antipodal. log(B/A) in float64, rounded once: log(K'/K) and it then cancel exactly.
        log_ba = torch.log(b.double() / a.double()).to(ka.dtype)
        log_pq = _log_ratio(ka, kb, exclude_self).add_(log_ba[..., None])
        kl = rkl = None
        if divergence in ("kl", "symmetric_kl"):
            kl = torch.linalg.vecdot(ka, log_pq) / a
        if divergence in ("reverse_kl", "symmetric_kl"):
            rkl = -torch.linalg.vecdot(kb, log_pq) / b
        rows = kl if rkl is None else rkl if kl is None else 0.5 * (kl + rkl)
    return reduce_rows(clamp_rounding(rows), reduction)


def d2sm_dense(x, y, divergence="kl", exclude_self=True, reduction="mean", eps=1e-8, x_memory=None,
               y_memory=None, precision="auto"):
    """The backend entry point: the reference's signature and dtype rules (half inputs in float32,
    autocast off inside, the output dtype as the reference's). ``precision`` is accepted and
    ignored: matmuls follow PyTorch's float32 setting."""
    return run_in_compute_dtype(_dense, x, y, divergence, exclude_self, reduction, eps, x_memory, y_memory)


def supports(device_type: str, dtype: torch.dtype):
    """Any device with float64 (log(B/A) is formed in float64), any floating dtype (half types
    computed in float32)."""
    if device_type == "mps":
        return "it forms log(B/A) in float64, which MPS does not have (use backend='reference')"
    return None
