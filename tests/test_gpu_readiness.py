"""The CUDA path's host-side decisions, checked on CPU (issue 20, "GPU readiness without a GPU";
docs/DESIGN.md §3.5, §4): the cuBLAS arguments of the fp32 GEMMs with an explicit TF32 choice,
the precision flag the Python side passes for every PyTorch setting, and that the CPU path ignores
that flag. What needs a card runs in tests/test_cuda_on_gpu.py."""
import pytest
import torch

from d2sm_ext import fused_op
from d2sm_ext.backends import cpp_backend

needs_extension = pytest.mark.skipif(cpp_backend.LOAD_ERROR is not None, reason=f"{cpp_backend.LOAD_ERROR}")


# --- item 1: TF32 only in the Gram and gradient GEMMs -------------------------------------------

def _gemm_cases():
    """(name, out view, a, b, untouched) with the stride patterns the driver passes: Gram panels
    (rows · segmentᵀ into a column slice of an (nr, M) panel), gradient products (a column slice
    of W' · rows), the O(M·d) products with a size-1 side, the cross sums' 2-D product."""
    g = torch.Generator().manual_seed(3)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    cases = []
    for bc in (1, 3):
        # Gram: out = panel[:, :, N:N+Q] (ldc = M), a = rows (contiguous), b = memᵀ (a transposed view)
        panel = torch.full((bc, 5, 19), float("nan"))
        cases.append((f"gram bc={bc}", panel, panel.narrow(2, 11, 8), rnd(bc, 5, 7), rnd(bc, 8, 7).transpose(1, 2)))
        # gradient: a = W'[:, :, :N] (row stride M), b = rows (contiguous)
        w = rnd(bc, 5, 19)
        g_buf = torch.full((bc, 5, 7), float("nan"))
        cases.append((f"grad bc={bc}", g_buf, g_buf, w.narrow(2, 0, 11), rnd(bc, 11, 7)))
        # weighted rows: (bc, 1, N) · (bc, N, d), weights a slice of a (bc, M) array
        r = rnd(bc, 19)
        out = torch.full((bc, 1, 7), float("nan"))
        cases.append((f"weighted rows bc={bc}", out, out, r.narrow(1, 11, 8).unsqueeze(1), rnd(bc, 8, 7)))
        # normaliser dots: (bc, N, d) · (bc, d, 1)
        out = torch.full((bc, 8, 1), float("nan"))
        cases.append((f"dots bc={bc}", out, out, rnd(bc, 8, 7), rnd(bc, 7).unsqueeze(2)))
    # cross sums: xr (R, d) · xc[c0:c0+nc]ᵀ, batch 1
    xc = rnd(30, 7)
    out = torch.full((1, 6, 9), float("nan"))
    cases.append(("cross", out, out, rnd(6, 7).unsqueeze(0), xc.narrow(0, 4, 9).t().unsqueeze(0)))
    # a transposed left operand and k = 1
    out = torch.full((2, 4, 5), float("nan"))
    cases.append(("a transposed", out, out, rnd(2, 3, 4).transpose(1, 2), rnd(2, 3, 5)))
    out = torch.full((2, 4, 5), float("nan"))
    cases.append(("k=1", out, out, rnd(2, 4, 1), rnd(2, 1, 5)))
    return cases


@needs_extension
@pytest.mark.parametrize("case", _gemm_cases(), ids=lambda c: c[0])
def test_cublas_layout_of_the_fp32_gemm(case):
    """The column-major arguments the CUDA fp32 GEMM gives cuBLAS (gemm_layout), executed with
    loops by d2sm_ext::_gemm_by_layout, equal the product, and write only the output view."""
    _, buffer, out, a, b = case
    before = buffer.clone()
    torch.ops.d2sm_ext._gemm_by_layout(out, a, b)
    want = torch.bmm(a.double(), b.double()).float()
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    # `buffer` started as NaN: the output view is written, everything else in it is not
    inside = torch.zeros_like(buffer, dtype=torch.bool)
    inside.as_strided(out.shape, out.stride(), out.storage_offset() - buffer.storage_offset()).fill_(True)
    assert torch.isnan(before).all() and torch.isnan(buffer[~inside]).all()
    assert not torch.isnan(buffer[inside]).any()


@needs_extension
def test_gemm_layout_refuses_a_transposed_output():
    out = torch.empty(1, 5, 4).transpose(1, 2)  # columns not unit-stride: no cuBLAS form for C
    with pytest.raises(RuntimeError, match="no cuBLAS layout"):
        torch.ops.d2sm_ext._gemm_by_layout(out, torch.randn(1, 4, 3), torch.randn(1, 3, 5))


@pytest.fixture
def restore_precision():
    cuda_matmul = torch.backends.cuda.matmul
    old = (torch.backends.fp32_precision, cuda_matmul.fp32_precision)
    legacy = None
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:
        pass
    yield
    torch.backends.fp32_precision = "none"
    cuda_matmul.fp32_precision = "none"
    if legacy is not None:
        torch.set_float32_matmul_precision(legacy)
    torch.backends.fp32_precision = old[0]
    cuda_matmul.fp32_precision = old[1]


def _legacy(value):
    def apply():
        torch.set_float32_matmul_precision(value)
    return apply


def _attr(obj, name, value):
    def apply():
        setattr(obj, name, value)
    return apply


@pytest.mark.parametrize("setting,tf32", [
    ((), False),  # PyTorch's default: highest
    ((_legacy("highest"),), False),
    ((_legacy("high"),), True),
    ((_legacy("medium"),), True),
    ((_attr(torch.backends.cuda.matmul, "allow_tf32", True),), True),
    ((_attr(torch.backends.cuda.matmul, "allow_tf32", False),), False),
    # the per-backend setting alone (get_float32_matmul_precision() then raises)
    ((_attr(torch.backends.cuda.matmul, "fp32_precision", "tf32"),), True),
    ((_attr(torch.backends.cuda.matmul, "fp32_precision", "ieee"),), False),
    # the generic setting, inherited by cuda.matmul
    ((_attr(torch.backends, "fp32_precision", "tf32"),), True),
    ((_attr(torch.backends, "fp32_precision", "ieee"),), False),
    # the per-backend setting wins over the legacy one
    ((_legacy("high"), _attr(torch.backends.cuda.matmul, "fp32_precision", "ieee")), False),
    ((_legacy("highest"), _attr(torch.backends.cuda.matmul, "fp32_precision", "tf32")), True),
], ids=lambda v: v if isinstance(v, bool) else None)
def test_tf32_flag_for_every_pytorch_setting(setting, tf32, restore_precision):
    """precision="auto" resolves to PyTorch's float32 matmul setting for CUDA, whichever API set
    it; "ieee" and "tf32" force it. The op receives that flag and reads no global itself."""
    torch.backends.fp32_precision = "none"
    torch.backends.cuda.matmul.fp32_precision = "none"
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.fp32_precision = "none"
    for apply in setting:
        apply()
    assert fused_op.use_tf32("auto") is tf32
    assert fused_op.use_tf32("ieee") is False and fused_op.use_tf32("tf32") is True


@needs_extension
@pytest.mark.parametrize("cpu_pass", ["panel", "symmetric"])
def test_cpu_path_ignores_the_tf32_flag(cpu_pass, monkeypatch, restore_precision):
    """On CPU the flag changes nothing (bit for bit), nor does the op change PyTorch's setting."""
    monkeypatch.setenv("D2SM_CPU_PASS", cpu_pass)
    monkeypatch.setenv("D2SM_PANEL_ROWS", "8")  # several panels
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 20, 6, generator=g), torch.randn(2, 20, 6, generator=g)
    xm, ym = torch.randn(2, 9, 6, generator=g), torch.randn(2, 9, 6, generator=g)
    grad_rows = torch.rand(2, 29, generator=g)
    outs = []
    for tf32 in (False, True):
        fwd = torch.ops.d2sm_ext.fused_forward(x, y, xm, ym, "js", True, 1e-8, tf32, "mean", True, True)
        bwd = torch.ops.d2sm_ext.fused_backward(x, y, xm, ym, fwd[1], grad_rows, "js", True,
                                                1e-8, tf32, True, True)
        outs.append((*fwd, *bwd))
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    for i, (a, b) in enumerate(zip(*outs)):
        assert torch.equal(a, b), i


# --- item 3: fp16 row scaling without panel-sized temporaries -----------------------------------

def _pow2_row_scale_before(w):
    """The rule as it was (abs().amax: an |w| panel as a temporary): the bit-for-bit baseline."""
    peak = w.abs().amax(dim=-1)
    _, exponent = torch.frexp(peak)
    shift = torch.clamp(14 - exponent, min=-126, max=126)
    scale = torch.ldexp(torch.ones_like(peak), shift)
    return torch.where((peak > 0) & torch.isfinite(peak), scale, torch.ones_like(scale))


def _weight_panel():
    """(3, 8, 40) fp32 panels: rows of magnitudes from 1e-38 to 1e30 (the "mean" weights are
    ~1/(B·M²)), subnormal, zero, NaN and ±inf rows, a row whose peak is an exact power of two."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(3, 8, 40, generator=g)
    w = w * torch.pow(10.0, torch.randint(-38, 31, (3, 8, 1), generator=g).float())
    w[0, 0] = 0.0
    w[0, 1, 3] = float("nan")
    w[0, 2, 7] = float("inf")
    w[0, 3, 9] = -float("inf")
    w[1, 0] = torch.randn(40, generator=g) * 1e-41  # subnormal
    w[1, 1] = torch.randn(40, generator=g).clamp(-0.5, 0.5)
    w[1, 1, 4] = -1.0  # peak exactly 2^0
    w[2, 0] = torch.randn(40, generator=g) * 3e38
    return w


def _bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def test_triton_pow2_row_scale_is_bit_identical():
    from d2sm_ext.backends import triton_backend

    w = _weight_panel()
    assert torch.equal(triton_backend.pow2_row_scale(w), _pow2_row_scale_before(w))


@needs_extension
def test_cpp_fp16_operand_is_bit_identical_and_in_place():
    """The C++ gradient product's fp16 operand (csrc/driver.cpp fp16_operand: one inf-norm
    reduction for the row peaks, W' scaled in place, one cast) is bit for bit the former
    (w·scale).to(float16) with the former scales, and leaves W'·scale in the panel."""
    w = _weight_panel()
    panel = w.clone()
    w16, scale = torch.ops.d2sm_ext._fp16_operand(panel)
    want_scale = _pow2_row_scale_before(w)
    assert torch.equal(scale, want_scale)
    want16 = (w * want_scale.unsqueeze(2)).to(torch.float16)
    assert w16.dtype == torch.float16 and torch.equal(_bits(w16), _bits(want16))
    assert torch.equal(_bits(panel), _bits(w * want_scale.unsqueeze(2)))
