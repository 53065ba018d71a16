"""An independent, literal implementation of docs/DESIGN.md §2: Python floats and explicit loops.

Deliberately shares no code with d2sm_ext: it is what the reference is checked against.
"""
import math


def _unit(v):
    s = max((abs(a) for a in v), default=0.0)  # scaled first: the squares of huge rows would overflow
    if s == 0:
        return [0.0 for _ in v]
    n = math.sqrt(sum((a / s) * (a / s) for a in v))
    return [(a / s) / n for a in v]


def _kernel(u, v, eps):
    cos = sum(a * b for a, b in zip(u, v))
    return max((1.0 + cos) / 2.0, 0.0) + eps


def _kl_term(p, q):
    return 0.0 if p == 0 else p * math.log(p / q)


def literal_rows(x, y, divergence, exclude_self, eps):
    """Per-row divergences for one problem; x, y are lists of rows (lists of floats)."""
    m = len(x)
    xh = [_unit(r) for r in x]
    yh = [_unit(r) for r in y]
    out = []
    for i in range(m):
        s = [j for j in range(m) if not (exclude_self and j == i)]
        kx = {j: _kernel(xh[i], xh[j], eps) for j in s}
        ky = {j: _kernel(yh[i], yh[j], eps) for j in s}
        a = sum(kx.values())
        b = sum(ky.values())
        p = {j: kx[j] / a for j in s}  # P'  (restored)
        q = {j: ky[j] / b for j in s}  # P   (clean)
        kl = sum(_kl_term(p[j], q[j]) for j in s)
        rkl = sum(_kl_term(q[j], p[j]) for j in s)
        if divergence == "kl":
            out.append(kl)
        elif divergence == "reverse_kl":
            out.append(rkl)
        elif divergence == "symmetric_kl":
            out.append(0.5 * kl + 0.5 * rkl)
        elif divergence == "js":
            mid = {j: 0.5 * (p[j] + q[j]) for j in s}
            out.append(0.5 * sum(_kl_term(p[j], mid[j]) for j in s) + 0.5 * sum(_kl_term(q[j], mid[j]) for j in s))
        else:
            raise ValueError(divergence)
    return out


def literal_d2sm(x, y, divergence="kl", exclude_self=True, reduction="mean", eps=1e-8, x_memory=None, y_memory=None):
    """Same contract as d2sm_divergence, on torch tensors converted to Python lists."""
    xs, ys = x.double().tolist(), y.double().tolist()
    batched = x.ndim == 3
    if not batched:
        xs, ys = [xs], [ys]
    if x_memory is not None:
        xm, ym = x_memory.double().tolist(), y_memory.double().tolist()
        if not batched:
            xm, ym = [xm], [ym]
        xs = [a + b for a, b in zip(xs, xm)]
        ys = [a + b for a, b in zip(ys, ym)]
    rows = [literal_rows(a, b, divergence, exclude_self, eps) for a, b in zip(xs, ys)]
    if reduction == "none":
        return rows if batched else rows[0]
    flat = [v for r in rows for v in r]
    return sum(flat) / len(flat) if reduction == "mean" else sum(flat)
