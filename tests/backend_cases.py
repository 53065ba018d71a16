"""Shared parity machinery for fused backends: shapes, tolerances, and the comparison itself.

Tolerances (explicit per dtype; see docs/DESIGN.md §2 and the flash-attention rule for low precision):
* float32: ``max|out - ref| <= RTOL_F32 · max|ref| + ATOL_F32`` against the float64 reference.
  fp32 rounding (6e-8) amplified by the cancellation in Σ p·log(p/q) and in u − ū stays below
  1e-5 relative in practice; 1e-4 leaves a decade of margin and still catches any wrong term.
* float16/bfloat16: the error against the float64 reference must be at most 2× the error of the
  same dense formula computed in plain PyTorch in that dtype (plus a floor for exact ties).
"""
import torch

import d2sm_ext
from d2sm_ext.reference import d2sm_reference, dense_divergence
from literal import literal_d2sm

RTOL_F32 = 1e-4
ATOL_F32 = 1e-7
LOW_PRECISION_FACTOR = 2.0


def make_inputs(shape, n_memory, device, dtype=torch.float32, y_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    y = x + 0.7 * torch.randn(*shape, generator=g)  # related, like restored vs clean features
    lead = shape[:-2]
    mem = None
    if n_memory:
        xm = torch.randn(*lead, n_memory, shape[-1], generator=g)
        ym = xm + 0.7 * torch.randn(*lead, n_memory, shape[-1], generator=g)
        mem = (xm.to(device, dtype), ym.to(device, dtype))
    x = x.to(device, dtype).requires_grad_(True)
    y = y.to(device, dtype).requires_grad_(y_grad)
    return x, y, mem


def edge_inputs(device, dtype=torch.float32):
    """9 live + 4 memory rows with zero rows (x0, y3, x-memory 1), duplicated rows (x1 = x2) and
    antipodal pairs (y4/y5, x6/x7, y8 / y-memory 2 = global row 11)."""
    x, y, mem = make_inputs((9, 6), 4, device, dtype=dtype)
    with torch.no_grad():
        x[0] = 0.0
        y[3] = 0.0
        x[1] = x[2]
        y[4] = -y[5]
        x[6] = -2.0 * x[7]
        mem[0][1] = 0.0
        mem[1][2] = -y[8]
    return x, y, mem


def reference64(x, y, mem, div, excl, red, upstream=None, eps=1e-8):
    """float64 reference value and gradients (into x and y)."""
    xd = x.detach().double().cpu().requires_grad_(True)
    yd = y.detach().double().cpu().requires_grad_(True)
    xm, ym = (None, None) if mem is None else (mem[0].double().cpu(), mem[1].double().cpu())
    out = d2sm_reference(xd, yd, div, excl, red, eps=eps, x_memory=xm, y_memory=ym)
    up = torch.ones_like(out) * 2.0 if upstream is None else upstream.double().cpu()
    gx, gy = torch.autograd.grad(out, (xd, yd), up)
    return out.detach(), gx, gy


def max_err(a, b):
    return (a.detach().double().cpu() - b).abs().max().item()


def assert_f32_close(got, want, what):
    err = max_err(got, want)
    bound = RTOL_F32 * want.abs().max().item() + ATOL_F32
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e}"


def run_backend(backend, x, y, mem, div, excl, red, upstream=None, **kw):
    xm, ym = (None, None) if mem is None else mem
    out = d2sm_ext.d2sm_divergence(x, y, div, excl, red, backend=backend, x_memory=xm, y_memory=ym, **kw)
    up = torch.ones_like(out) * 2.0 if upstream is None else upstream.to(out.device, out.dtype)
    inputs = [t for t in (x, y) if t.requires_grad]
    grads = torch.autograd.grad(out, inputs, up)
    gx = grads[0]
    gy = grads[1] if y.requires_grad else None
    return out, gx, gy


def check_parity(backend, shape, n_memory, div, excl, red, device, seed=0):
    """Values and gradients (grad_output = 2 for scalars, random for "none") vs float64."""
    x, y, mem = make_inputs(shape, n_memory, device, seed=seed)
    upstream = None
    if red == "none":
        m = shape[-2] + n_memory
        upstream = torch.randn(*shape[:-2], m, generator=torch.Generator().manual_seed(seed + 1))
    want, wgx, wgy = reference64(x, y, mem, div, excl, red, upstream)
    got, gx, gy = run_backend(backend, x, y, mem, div, excl, red, upstream)
    assert got.shape == want.shape and got.dtype == x.dtype
    assert_f32_close(got, want, "value")
    assert_f32_close(gx, wgx, "grad x")
    assert_f32_close(gy, wgy, "grad y")


def check_non_contiguous(backend, device, div):
    """Strided x (d-stride 2), permuted-stride y, transposed memory rows (d-stride 22): values
    and gradients vs float64, for "mean" and "none"."""
    base = torch.randn(2, 20, 33, 2, device=device)
    x = base[..., 0].requires_grad_(True)
    y = base[..., 1].transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)
    mem_base = torch.randn(2, 33, 11, 2, device=device)
    xm, ym = mem_base[..., 0].transpose(1, 2), mem_base[..., 1].transpose(1, 2)  # (2, 11, 33)
    assert not x.is_contiguous() and not y.is_contiguous() and not xm.is_contiguous()
    for red in ("mean", "none"):
        up = None if red == "mean" else torch.randn(2, 31)
        want, wgx, wgy = reference64(x, y, (xm, ym), div, True, red, up)
        got, gx, gy = run_backend(backend, x, y, (xm, ym), div, True, red, up)
        assert_f32_close(got, want, "value")
        assert_f32_close(gx, wgx, "grad x")
        assert_f32_close(gy, wgy, "grad y")


def check_low_precision(backend, shape, n_memory, div, excl, red, device, dtype):
    """flash-attention's rule: error(kernel, dtype) <= 2 × error(plain PyTorch in dtype)."""
    x, y, mem = make_inputs(shape, n_memory, device, dtype=dtype)
    upstream = None
    if red == "none":
        upstream = torch.randn(*shape[:-2], shape[-2] + n_memory).to(dtype)
    want, wgx, wgy = reference64(x, y, mem, div, excl, red, upstream)
    got, gx, gy = run_backend(backend, x, y, mem, div, excl, red, upstream)
    assert got.dtype == dtype

    xl = x.detach().clone().requires_grad_(True)
    yl = y.detach().clone().requires_grad_(True)
    xm, ym = (None, None) if mem is None else mem
    plain = dense_divergence(xl, yl, div, excl, red, 1e-8, xm, ym)
    up = torch.ones_like(plain) * 2.0 if upstream is None else upstream.to(plain.device, plain.dtype)
    pgx, pgy = torch.autograd.grad(plain, (xl, yl), up)
    for name, mine, base, truth in (("value", got, plain, want), ("grad x", gx, pgx, wgx), ("grad y", gy, pgy, wgy)):
        err = max_err(mine, truth)
        base_err = max_err(base, truth)
        floor = 1e-3 * truth.abs().max().item()  # one low-precision ulp-ish: ties at tiny errors
        assert err <= LOW_PRECISION_FACTOR * base_err + floor, (
            f"{name}: {dtype} error {err:.3e} > 2 × plain-PyTorch {dtype} error {base_err:.3e} (+{floor:.1e})")


def check_float64_literal(backend, device, div, excl, red):
    """float64 end to end: the independent literal loops and the reference agree to 1e-10."""
    x = torch.randn(2, 9, 5, dtype=torch.float64)
    y = x + torch.randn(2, 9, 5, dtype=torch.float64)
    xm, ym = torch.randn(2, 4, 5, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64)
    got = d2sm_ext.d2sm_divergence(x.to(device), y.to(device), div, excl, red, backend=backend,
                                   x_memory=xm.to(device), y_memory=ym.to(device)).cpu()
    want = torch.tensor(literal_d2sm(x, y, div, excl, red, x_memory=xm, y_memory=ym), dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, d2sm_reference(x, y, div, excl, red, x_memory=xm, y_memory=ym),
                               rtol=1e-10, atol=1e-12)


def check_gradcheck(backend, device, div, excl, red):
    """torch.autograd.gradcheck in float64 through the backend, memory rows included."""
    x = torch.randn(6, 4, dtype=torch.float64, device=device, requires_grad=True)
    y = torch.randn(6, 4, dtype=torch.float64, device=device, requires_grad=True)
    xm = torch.randn(3, 4, dtype=torch.float64, device=device)
    ym = torch.randn(3, 4, dtype=torch.float64, device=device)
    assert torch.autograd.gradcheck(
        lambda a, b: d2sm_ext.d2sm_divergence(a, b, div, excl, red, backend=backend, x_memory=xm, y_memory=ym),
        (x, y))


def check_edge_rows_float64(backend, device, div, excl):
    """Zero, duplicated and antipodal rows in float64 (values and gradients)."""
    x, y, mem = edge_inputs(device, torch.float64)
    for red in ("mean", "none"):
        up = None if red == "mean" else torch.randn(13, dtype=torch.float64)
        want, wgx, wgy = reference64(x, y, mem, div, excl, red, up)
        got, gx, gy = run_backend(backend, x, y, mem, div, excl, red, up)
        # float64 end to end: the antipodal log-kernel is conditioned like 1e-16/eps = 1e-8
        torch.testing.assert_close(got.cpu(), want, rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(gx.cpu(), wgx, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(gy.cpu(), wgy, rtol=1e-6, atol=1e-9)
        assert (gx[0] == 0).all() and (gy[3] == 0).all()


def check_opcheck(forward_op, backward_op, device):
    """torch.library.opcheck on a fused backend's two ops (inputs with and without grad)."""
    x, y, mem = make_inputs((2, 6, 5), 3, device)
    for red, need in (("mean", True), ("none", False), ("sum", True)):
        torch.library.opcheck(forward_op.default, (x, y, mem[0], mem[1], "kl", True, 1e-8, False, red, need, need))
    saved = forward_op(x, y, mem[0], mem[1], "kl", True, 1e-8, False, "none", False, False)[1]
    up = torch.randn(2, 9, device=device)
    # The backward op is first-order only (no double backward), so its autograd tests do not apply.
    torch.library.opcheck(backward_op.default,
                          (x.detach(), y.detach(), mem[0], mem[1], saved, up, "kl", True, 1e-8, False, True, True),
                          test_utils=("test_schema", "test_faketensor"))


def check_compile_fullgraph(backend, device, divergence, autocast_dtype=None):
    """torch.compile(fullgraph=True) of a small model calling the loss (under autocast when
    ``autocast_dtype`` is given): no graph break, same value and parameter gradient as eager."""
    torch.manual_seed(0)
    net = torch.nn.Linear(8, 16).to(device)
    xin, yfeat = torch.randn(12, 8, device=device), torch.randn(12, 16, device=device)

    def step(inp):
        with torch.autocast(device, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            return d2sm_ext.d2sm_divergence(net(inp), yfeat, divergence=divergence, backend=backend)

    eager = step(xin)
    eager.backward()
    g_eager = net.weight.grad.clone()
    net.zero_grad()
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(xin)
    out.backward()
    assert out.dtype == eager.dtype == torch.float32
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(net.weight.grad, g_eager)


def low_precision_bound(truth, plain):
    """flash-attention's rule: 2× the error of the same dense formula in that dtype, plus a
    floor of 1e-3 of the largest reference entry for ties at tiny errors."""
    return LOW_PRECISION_FACTOR * max_err(plain, truth) + 1e-3 * truth.abs().max().item()


def check_under_autocast(backend, device, autocast_dtype, feature_dtype, red):
    """Under autocast the op runs in its own precision (no half matmuls re-dispatched inside it)
    and returns float32; value and gradients equal the float64 reference evaluated on the same
    features (rounded to half precision when they are half), within the float32 tolerance or
    the 2× rule of plain PyTorch in that dtype."""
    x, y, mem = make_inputs((2, 30, 24), 12, device, dtype=feature_dtype)
    upstream = None if red == "mean" else torch.randn(2, 42, device=device)
    with torch.autocast(device, dtype=autocast_dtype):
        out = d2sm_ext.d2sm_divergence(x, y, reduction=red, backend=backend, x_memory=mem[0], y_memory=mem[1])
    assert out.dtype == torch.float32
    up = torch.full_like(out, 2.0) if upstream is None else upstream
    gx, gy = torch.autograd.grad(out, (x, y), up)
    assert gx.dtype == feature_dtype and gy.dtype == feature_dtype
    want, wgx, wgy = reference64(x, y, mem, "kl", True, red, upstream)
    if feature_dtype == torch.float32:
        for name, got, truth in (("value", out, want), ("grad x", gx, wgx), ("grad y", gy, wgy)):
            assert_f32_close(got, truth, name)
        return
    xl, yl = x.detach().clone().requires_grad_(True), y.detach().clone().requires_grad_(True)
    plain = dense_divergence(xl, yl, "kl", True, red, 1e-8, *mem)  # plain PyTorch in that dtype, no autocast
    pgx, pgy = torch.autograd.grad(plain, (xl, yl), up.to(plain.dtype))
    for name, got, base, truth in (("value", out, plain, want), ("grad x", gx, pgx, wgx), ("grad y", gy, pgy, wgy)):
        assert max_err(got, truth) <= low_precision_bound(truth, base), name


def check_half_gradients(backend, device, dtype, m):
    """m half-precision features, "mean": the gradient weights are ~1/m² per row pair, below
    fp16's normal range. With a GradScaler-like scale of 1024 or unscaled, an entry is zero only
    where the float64 reference is within one subnormal of zero (rounding it to the dtype could
    give 0 there too: at m = 4096 a few scaled entries of 65536 are, e.g. 2e-8 and 2e-9 beside
    fp16's 6e-8, and the plain dense formula in fp16 zeroes 11 entries where the float64 reference
    is nonzero), and the scaled error is within the 2× rule of the same dense formula in that dtype."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(m, 16, generator=g)
    y0 = (x0 + 0.7 * torch.randn(m, 16, generator=g)).to(device, dtype)
    x0 = x0.to(device, dtype)

    def grad(scale):
        x = x0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(d2sm_ext.d2sm_divergence(x, y0, backend=backend) * scale, x)
        _, want, _ = reference64(x, y0, None, "kl", True, "mean", torch.tensor(scale))
        return x, g, want

    smallest = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps  # the smallest subnormal

    def assert_not_flushed(got, want, what):
        flushed = (got.cpu() == 0) & (want.abs() > smallest)
        assert not flushed.any(), (f"{what}: {int(flushed.sum())} entries flushed to zero where the reference is "
                                   f"> 1 subnormal: {want[flushed][:5].tolist()}")

    x, got, want = grad(1024.0)
    assert_not_flushed(got, want, "scaled by 1024")
    xl = x.detach().clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(dense_divergence(xl, y0, "kl", True, "mean", 1e-8) * 1024.0, xl)
    assert max_err(got, want) <= low_precision_bound(want, plain)

    _, got, want = grad(1.0)
    assert_not_flushed(got, want, "unscaled")


def huge_row_inputs(device, magnitude, seed=0):
    """Unit-scale features (x, y, memory rows) and the same features with every other live row
    and every other memory row multiplied by ``magnitude`` in float32 (squared norms overflow
    beyond ~2e19). Returns (unit inputs, huge inputs, live-row scales (N, 1))."""
    x, y, mem = make_inputs((9, 24), 7, device)
    live = torch.ones(9, 1, device=device)
    live[::2] = magnitude
    memory = torch.ones(7, 1, device=device)
    memory[1::2] = magnitude
    big_x = (x.detach() * live).requires_grad_(True)
    big_y = (y.detach() * live).requires_grad_(True)
    big_mem = (mem[0] * memory, mem[1] * memory)
    assert torch.isfinite(big_x).all() and torch.isinf(big_x.double().pow(2).sum(-1).float()).any() == (magnitude > 2e19)
    return (x, y, mem), (big_x, big_y, big_mem), live


def check_huge_rows(backend, device, magnitude, div, red):
    """The divergence is scale-invariant per row: rows of magnitude 3e19 or 1e30 (live and
    memory, x and y) give the value of the unit-scale rows, and gradients that times the row's
    scale are the unit rows' (∇L(c·x) = ∇L(x)/c), against the float64 reference of the unit rows,
    within the float32 tolerance."""
    (x, y, mem), (bx, by, bmem), live = huge_row_inputs(device, magnitude)
    upstream = None if red != "none" else torch.randn(16, generator=torch.Generator().manual_seed(1))
    want, wgx, wgy = reference64(x, y, mem, div, True, red, upstream)
    got, gx, gy = run_backend(backend, bx, by, bmem, div, True, red, upstream)
    assert_f32_close(got, want, "value")
    assert_f32_close(gx * live, wgx, "grad x")
    assert_f32_close(gy * live, wgy, "grad y")


def check_huge_rows_with_queue(backend, device, magnitude, div, use_last_batch=False):
    """As check_huge_rows with the memory rows in a FeatureQueue(statistics=True) (queue=...):
    two queues, one fed the unit rows and one the same rows with every other row at
    ``magnitude``, over three steps (loss, backward, enqueue); the huge queue's loss and
    gradients (times the row scale) equal the float64 reference of the unit rows against the
    unit queue's memory, and its kept sums stay finite."""
    from d2sm_ext import FeatureQueue

    g = torch.Generator().manual_seed(0)
    unit_q = FeatureQueue(12, 16, device=device, statistics=True, backend=backend)
    big_q = FeatureQueue(12, 16, device=device, statistics=True, backend=backend)
    scale = torch.ones(5, 1, device=device)
    scale[::2] = magnitude
    for step in range(3):
        x = torch.randn(5, 16, generator=g).to(device)
        y = (x + 0.7 * torch.randn(5, 16, generator=g).to(device))
        bx, by = (x * scale).requires_grad_(True), (y * scale).requires_grad_(True)
        if step > 0:
            mem = unit_q.memory()
            want, wgx, wgy = reference64(x, y, mem, div, True, "mean")
            got, gx, gy = run_backend(backend, bx, by, None, div, True, "mean", queue=big_q)
            assert_f32_close(got, want, f"value (step {step})")
            assert_f32_close(gx * scale, wgx, f"grad x (step {step})")
            assert_f32_close(gy * scale, wgy, f"grad y (step {step})")
        unit_q.enqueue(x, y)
        if use_last_batch and step > 0:
            big_q.enqueue_last_batch()
        else:
            big_q.enqueue(bx, by)
        assert torch.isfinite(big_q.stats.row_sums).all() and torch.isfinite(big_q.stats.row_inv_norms).all()
