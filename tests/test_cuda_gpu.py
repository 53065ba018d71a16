"""The extension's "cuda" backend run on a GPU (benchmarks/gpu_check.sh runs this file on the lent
one): the reference's breadth of parity tests, float64 against the literal loops and gradcheck,
edge rows, half and TF32 precision, several panels, empty live sets, streams, determinism, opcheck
and torch.compile. Without a GPU the whole module is reported as one skip, never as passing. The
per-pair math the kernels run is csrc/pair_math.h, shared with the CPU kernel, so
tests/test_cpp.py checks every formula on CPU."""
import itertools

import pytest
import torch

import d2sm_ext
from backend_cases import (LOW_PRECISION_FACTOR, assert_f32_close, check_compile_fullgraph, check_edge_rows_float64,
                           check_float64_literal, check_gradcheck, check_half_gradients, check_low_precision,
                           check_non_contiguous, check_opcheck, check_parity, check_under_autocast, edge_inputs,
                           make_inputs, max_err, reference64, run_backend)
from d2sm_ext import cpp_backend
from d2sm_ext.reference import DIVERGENCES, REDUCTIONS, d2sm_reference, dense_divergence

if not torch.cuda.is_available():
    pytest.skip("no CUDA device here: the CUDA kernels are compiled (tests/test_cuda.py), not run",
                allow_module_level=True)
if cpp_backend.CUDA_ERROR is not None:
    pytest.fail(f"a GPU is present but the CUDA kernels are not: {cpp_backend.CUDA_ERROR}", pytrace=False)

COMBOS = list(itertools.product(DIVERGENCES, (True, False), REDUCTIONS))
SHAPES = [((2, 1), 0), ((3, 17, 5), 6), ((64, 300), 0), ((3, 3, 300), 64), ((130, 7), 70)]


@pytest.mark.parametrize("shape,n_memory", SHAPES)
@pytest.mark.parametrize("div,excl,red", COMBOS)
def test_parity_float32(div, excl, red, shape, n_memory):
    check_parity("cuda", shape, n_memory, div, excl, red, "cuda")


@pytest.mark.parametrize("div,excl,red", COMBOS)
def test_float64_matches_literal_and_reference(div, excl, red):
    check_float64_literal("cuda", "cuda", div, excl, red)


@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("excl", [True, False])
@pytest.mark.parametrize("red", ["mean", "none"])
def test_gradcheck_float64(div, excl, red):
    check_gradcheck("cuda", "cuda", div, excl, red)


@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("excl", [True, False])
def test_edge_rows_float64(div, excl):
    check_edge_rows_float64("cuda", "cuda", div, excl)


@pytest.mark.parametrize("div", DIVERGENCES)
def test_edge_rows_float32(div):
    """eps = 1e-3: above float32's rounding of 1 + cos for antipodal rows (see test_triton.py)."""
    x, y, mem = edge_inputs("cuda")
    want, wgx, wgy = reference64(x, y, mem, div, True, "none", torch.ones(13), eps=1e-3)
    got, gx, gy = run_backend("cuda", x, y, mem, div, True, "none", torch.ones(13), eps=1e-3)
    assert_f32_close(got, want, "value")
    assert_f32_close(gx, wgx, "grad x")
    assert_f32_close(gy, wgy, "grad y")


def test_non_contiguous_inputs_and_memory():
    check_non_contiguous("cuda", "cuda", "js")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("div,red", [("kl", "mean"), ("js", "none"), ("reverse_kl", "sum")])
def test_half_inputs(dtype, div, red):
    check_low_precision("cuda", (2, 40, 96), 24, div, True, red, "cuda", dtype)


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


def test_several_panels():
    """More live rows than one panel holds under the default budget (256 MiB of fp32 panels:
    5461 rows at M = 6144)."""
    x, y, mem = make_inputs((6000, 8), 144, "cuda")
    want, wgx, wgy = reference64(x, y, mem, "symmetric_kl", True, "mean")
    got, gx, gy = run_backend("cuda", x, y, mem, "symmetric_kl", True, "mean")
    assert_f32_close(got, want, "value")
    assert_f32_close(gx, wgx, "grad x")
    assert_f32_close(gy, wgy, "grad y")


@pytest.mark.parametrize("red", ["mean", "none"])
def test_forced_small_panels_and_batch_chunks(red, monkeypatch):
    monkeypatch.setenv("D2SM_PANEL_ROWS", "48")
    check_parity("cuda", (3, 130, 20), 30, "symmetric_kl", True, red, "cuda")


def test_memory_only_live_rows_empty():
    x, y = torch.randn(0, 5, device="cuda"), torch.randn(0, 5, device="cuda")
    xm, ym = torch.randn(7, 5, device="cuda"), torch.randn(7, 5, device="cuda")
    got = d2sm_ext.d2sm_divergence(x, y, "kl", True, "none", backend="cuda", x_memory=xm, y_memory=ym)
    want = d2sm_reference(x.cpu().double(), y.cpu().double(), "kl", True, "none", x_memory=xm.cpu().double(),
                          y_memory=ym.cpu().double())
    assert_f32_close(got, want, "values of memory rows")


def test_side_stream_and_deterministic():
    x, y, mem = make_inputs((3, 70, 40), 10, "cuda")
    runs = [run_backend("cuda", x, y, mem, "js", True, "mean") for _ in range(3)]
    for out, gx, gy in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(gx, runs[0][1]) and torch.equal(gy, runs[0][2])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out, gx, gy = run_backend("cuda", x, y, mem, "js", True, "mean")
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(out, runs[0][0]) and torch.equal(gx, runs[0][1])


def test_opcheck():
    check_opcheck(torch.ops.d2sm_ext.fused_forward, torch.ops.d2sm_ext.fused_backward, "cuda")


def test_torch_compile_fullgraph():
    check_compile_fullgraph("cuda", "cuda", "symmetric_kl")


# Mixed precision on the GPU (docs/DESIGN.md §4), for both fused CUDA backends; the CPU variants
# are tests/test_mixed_precision.py.
CUDA_FUSED = ["cuda", "triton"]


@pytest.mark.parametrize("backend", CUDA_FUSED)
@pytest.mark.parametrize("autocast_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("feature_dtype", ["float32", "autocast"])
@pytest.mark.parametrize("red", ["mean", "none"])
def test_op_under_autocast(backend, autocast_dtype, feature_dtype, red):
    features = torch.float32 if feature_dtype == "float32" else autocast_dtype
    check_under_autocast(backend, "cuda", autocast_dtype, features, red)


@pytest.mark.parametrize("backend", CUDA_FUSED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_gradients_do_not_flush_to_zero(backend, dtype):
    check_half_gradients(backend, "cuda", dtype, 4096)


@pytest.mark.parametrize("backend", CUDA_FUSED)
@pytest.mark.parametrize("autocast_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("queue_size", [0, 16])
def test_training_step_under_autocast_with_grad_scaler(backend, autocast_dtype, queue_size):
    """Pooled patches (with and without a queue) and internal patches under CUDA autocast with a
    GradScaler: finite float32 loss, finite non-zero parameter gradients."""
    torch.manual_seed(1)
    ext = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.AdaptiveAvgPool2d(2))
    sampling = dict(sampling="pooled", queue_size=queue_size) if queue_size else dict(sampling="internal")
    crit = d2sm_ext.D2SMLoss(extractor=ext, patch_size=8, stride=4, backend=backend, **sampling).cuda()
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 3, 3, padding=1)).cuda()
    opt = torch.optim.SGD(net.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cuda")
    clean = torch.rand(4, 3, 12, 12, device="cuda")
    for _ in range(2):
        noisy = clean + 0.1 * torch.randn_like(clean)
        opt.zero_grad()
        with torch.autocast("cuda", dtype=autocast_dtype):
            loss = crit(noisy + net(noisy), clean)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        for p in net.parameters():
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
        scaler.step(opt)
        scaler.update()
