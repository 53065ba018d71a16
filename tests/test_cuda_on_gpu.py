"""What only the "cuda" backend has on a card (benchmarks/gpu_check.sh runs this file on the lent
GPU): the TF32 switch that leaves the user's global setting alone, panels at the default memory
budget, and side streams. Its math against the reference (parity, float64 vs the literal loops,
gradcheck, edge rows, half precision, forced small panels, empty live sets, determinism, opcheck,
torch.compile) and mixed precision run in the backend matrix (tests/test_backend_matrix.py,
tests/test_mixed_precision.py), whose CUDA rows run wherever a GPU is visible. Without a GPU this
module is reported as one skip, never as passing."""
import pytest
import torch

import d2sm_ext
from backend_cases import LOW_PRECISION_FACTOR, assert_f32_close, make_inputs, max_err, reference64, run_backend
from d2sm_ext.backends import cpp_backend
from d2sm_ext.reference import dense_divergence

if not torch.cuda.is_available():
    pytest.skip("no CUDA device here: the CUDA kernels are compiled (tests/test_cuda_build.py), not run",
                allow_module_level=True)
if cpp_backend.CUDA_ERROR is not None:
    pytest.fail(f"a GPU is present but the CUDA kernels are not: {cpp_backend.CUDA_ERROR}", pytrace=False)


def test_tf32_precision_and_the_global_flag_is_restored():
    """precision="tf32": error at most 2× that of the dense formula with PyTorch's own TF32
    matmuls (the low-precision rule of backend_cases.py); the user's TF32 setting is untouched."""
    x, y, mem = make_inputs((3, 200, 256), 50, "cuda")
    want, wgx, wgy = reference64(x, y, mem, "kl", True, "mean")
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        got, gx, gy = run_backend("cuda", x, y, mem, "kl", True, "mean", precision="tf32")
        assert torch.backends.cuda.matmul.allow_tf32 is False
        torch.backends.cuda.matmul.allow_tf32 = True
        xl, yl = x.detach().clone().requires_grad_(True), y.detach().clone().requires_grad_(True)
        plain = dense_divergence(xl, yl, "kl", True, "mean", 1e-8, mem[0], mem[1])
        pgx, pgy = torch.autograd.grad(plain, (xl, yl), torch.ones_like(plain) * 2.0)
        ieee = run_backend("cuda", x, y, mem, "kl", True, "mean", precision="ieee")
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert_f32_close(ieee[0], want, "ieee value")
    for name, mine, base, truth in (("value", got, plain, want), ("grad x", gx, pgx, wgx), ("grad y", gy, pgy, wgy)):
        floor = 1e-4 * truth.abs().max().item()
        assert max_err(mine, truth) <= LOW_PRECISION_FACTOR * max_err(base, truth) + floor, name


@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_precision_is_independent_of_the_global_setting(precision):
    """precision="ieee"/"tf32" give the same bits whatever PyTorch's own setting, including the
    per-backend one set alone (where the old global switch could not read the legacy flag and
    "ieee" silently ran TF32): the Gram and gradient GEMMs take the op's flag as cuBLAS's compute
    type, per call, and the setting is left as it was."""
    x, y, mem = make_inputs((2, 150, 96), 40, "cuda")
    matmul = torch.backends.cuda.matmul
    old = matmul.fp32_precision
    runs = []
    try:
        for setting in ("ieee", "tf32"):
            matmul.fp32_precision = setting
            runs.append(run_backend("cuda", x, y, mem, "js", True, "mean", precision=precision))
            assert matmul.fp32_precision == setting
    finally:
        matmul.fp32_precision = old
    for name, a, b in zip(("value", "grad x", "grad y"), *runs):
        assert torch.equal(a, b), name
    if precision == "ieee":
        want, wgx, wgy = reference64(x, y, mem, "js", True, "mean")
        for name, got, truth in zip(("value", "grad x", "grad y"), runs[0], (want, wgx, wgy)):
            assert_f32_close(got, truth, name)


def test_several_panels():
    """More live rows than one panel holds under the default budget (256 MiB of fp32 panels:
    5461 rows at M = 6144)."""
    x, y, mem = make_inputs((6000, 8), 144, "cuda")
    want, wgx, wgy = reference64(x, y, mem, "symmetric_kl", True, "mean")
    got, gx, gy = run_backend("cuda", x, y, mem, "symmetric_kl", True, "mean")
    assert_f32_close(got, want, "value")
    assert_f32_close(gx, wgx, "grad x")
    assert_f32_close(gy, wgy, "grad y")


def test_side_stream():
    """On a side stream the kernels and cuBLAS calls follow the current stream: same results."""
    x, y, mem = make_inputs((3, 70, 40), 10, "cuda")
    ref = run_backend("cuda", x, y, mem, "js", True, "mean")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out, gx, gy = run_backend("cuda", x, y, mem, "js", True, "mean")
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(out, ref[0]) and torch.equal(gx, ref[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", ["fused_backward", "queue_backward"])
def test_half_memory_rows_are_not_copied(dtype, op, monkeypatch):
    """Half rows, N = 8 live and Q = 2^18 memory rows, d = 256, 16 MiB budget (docs/DESIGN.md
    §3.5): the peak of one backward call stays far below the fp32 copies of the memory rows
    (2·Q·d·4 = 512 MiB) that the path made before, and its gradients are the CPU path's up to the
    half rounding of W' in the gradient product (2^-11 relative per weight for fp16, 2^-8 bf16)."""
    monkeypatch.setenv("D2SM_PANEL_MB", "16")
    n, q, dim = 8, 1 << 18, 256
    g = torch.Generator().manual_seed(2)
    x, y, xm, ym = (torch.randn(m, dim, generator=g).to(dtype) for m in (n, n, q, q))
    r = [d2sm_ext.reference.inverse_norms(torch.cat([a, b]).float()) for a, b in ((x, xm), (y, ym))]
    half_sum = torch.full((n + q,), (n + q) / 2.0)
    saved = torch.stack([r[0], r[1], half_sum, half_sum, torch.zeros(n + q), torch.zeros(n + q)]).unsqueeze(1)
    grad_rows = torch.rand(1, n + q, generator=g)

    def call(t):
        if op == "fused_backward":
            return torch.ops.d2sm_ext.fused_backward(*t, "kl", True, 1e-8, False, True, True)
        empty = t[0].new_empty(0, dtype=torch.float32)
        return torch.ops.d2sm_ext.queue_backward(*t[:5], t[5].view(-1), "kl", True, 1e-8, False, True, True,
                                                 empty, empty)

    host = [x, y, xm, ym, saved, grad_rows]
    device = [v.cuda() for v in host]  # resident before the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    got = call(device)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 2 * q * dim * 4 / 4, peak
    want = call(host)  # the CPU path: fp32 copies of every row, fp32 GEMMs
    rel = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    for a, b in zip(want, got):
        assert torch.isfinite(b).all()
        assert max_err(b, a.double()) <= 8 * rel * a.abs().max().item()
