"""Triton backend vs the float64 reference: every divergence × exclude_self × reduction, shapes,
memory rows, edge rows, low precision, gradients, registration (opcheck, torch.compile).

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors (conftest sets it);
with a GPU they run for real on CUDA tensors.
"""
import itertools

import pytest
import torch

import d2sm_ext
from backend_cases import (assert_f32_close, check_compile_fullgraph, check_low_precision, check_non_contiguous,
                           check_opcheck, check_parity, edge_inputs, make_inputs, reference64, run_backend)
from d2sm_ext.backends import resolve_backend
from d2sm_ext.reference import DIVERGENCES, REDUCTIONS

triton_backend = pytest.importorskip("d2sm_ext.triton_backend", reason="Triton is not importable")

DEVICES = (["cpu"] if triton_backend.interpreter_active() else []) + (["cuda"] if torch.cuda.is_available() else [])
if not DEVICES:
    pytest.skip("no device for Triton: no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

COMBOS = list(itertools.product(DIVERGENCES, (True, False), REDUCTIONS))
# (shape, memory rows): every M in {2, 3, 37, 130}, d in {1, 7, 64, 300}, B in {1, 3}, memory on/off.
SMALL = [((2, 1), 0), ((3, 3, 7), 5), ((37, 64), 20)]
LARGE = [((3, 130, 300), 0), ((130, 7), 70)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,n_memory", SMALL)
@pytest.mark.parametrize("div,excl,red", COMBOS)
def test_parity_small(div, excl, red, shape, n_memory, device):
    check_parity("triton", shape, n_memory, div, excl, red, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,n_memory", LARGE)
@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("excl,red", [(True, "none"), (False, "mean")])
def test_parity_multi_block(div, excl, red, shape, n_memory, device):
    """Several row and column blocks, d over several chunks, blocks straddling no segment."""
    check_parity("triton", shape, n_memory, div, excl, red, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("excl", [True, False])
def test_edge_rows(div, excl, device):
    """Zero rows, antipodal rows, duplicated rows, in x, y and memory.

    eps = 1e-3 here: an antipodal pair's kernel value is eps + (1 + cos), and in float32 the
    rounding of 1 + cos is ~6e-8, so with eps well above that the log-kernel is well conditioned
    and float32 tolerances apply. The default eps is covered by the next test.
    """
    x, y, mem = edge_inputs(device)
    for red in ("mean", "none"):
        up = None if red == "mean" else torch.randn(13)
        want, wgx, wgy = reference64(x, y, mem, div, excl, red, up, eps=1e-3)
        got, gx, gy = run_backend("triton", x, y, mem, div, excl, red, up, eps=1e-3)
        assert_f32_close(got, want, "value")
        assert_f32_close(gx, wgx, "grad x")
        assert_f32_close(gy, wgy, "grad y")
        assert (gx[0] == 0).all() and (gy[3] == 0).all()  # zero rows: zero gradient


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("div", DIVERGENCES)
def test_edge_rows_default_eps_finite(div, device):
    """With eps = 1e-8, below float32's ~6e-8 rounding of 1 + cos, an antipodal pair's log-kernel
    is ill-conditioned for any float32 code (which of 1e-8 or 7e-8 you get is rounding luck).
    Everything must stay finite, and the rows with no antipodal partner must stay accurate."""
    x, y, mem = edge_inputs(device)
    want, _, _ = reference64(x, y, mem, div, True, "none", torch.ones(13))
    got, gx, gy = run_backend("triton", x, y, mem, div, True, "none", torch.ones(13))
    assert torch.isfinite(got).all() and torch.isfinite(gx).all() and torch.isfinite(gy).all()
    antipodal_rows = [6, 7, 4, 5, 8, 11]  # x6/x7, y4/y5, y8/y-memory row 2 (global row 11)
    keep = [i for i in range(13) if i not in antipodal_rows]
    assert_f32_close(got[keep], want[keep], "value on well-conditioned rows")


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs_and_memory(device):
    check_non_contiguous("triton", device, "kl")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("div,red", [("kl", "mean"), ("js", "none"), ("reverse_kl", "sum")])
def test_low_precision(dtype, div, red, device):
    check_low_precision("triton", (2, 40, 96), 24, div, True, red, device, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_memory_rows_get_no_gradient_and_no_gradient_work(device, monkeypatch):
    calls = []
    real = triton_backend._pair_pass

    def spy(x, y, xm, ym, rx, ry, a, bn, w, div, excl, eps, tf32, compute_stats, gx, gy):
        calls.append(dict(live=x.shape[1], memory=0 if xm is None else xm.shape[1], stats=compute_stats,
                          gx=None if gx is None else tuple(gx.shape), gy=None if gy is None else tuple(gy.shape)))
        return real(x, y, xm, ym, rx, ry, a, bn, w, div, excl, eps, tf32, compute_stats, gx, gy)

    monkeypatch.setattr(triton_backend, "_pair_pass", spy)
    x, y, _ = make_inputs((5, 8), 0, device, y_grad=False)
    xm = torch.randn(30, 8, device=device, requires_grad=True)
    ym = torch.randn(30, 8, device=device, requires_grad=True)
    d2sm_ext.d2sm_divergence(x, y, backend="triton", x_memory=xm, y_memory=ym).backward()
    # one fused pass; gradient buffers only for the 5 live rows of x; none for y (no grad needed)
    assert calls == [dict(live=5, memory=30, stats=True, gx=(1, 5, 8), gy=None)]
    assert xm.grad is None and ym.grad is None and x.grad is not None

    calls.clear()
    d2sm_ext.d2sm_divergence(x, y, reduction="none", backend="triton", x_memory=xm, y_memory=ym).sum().backward()
    # forward: statistics only; backward: gradient pass over the live rows only, no statistics
    assert calls == [dict(live=5, memory=30, stats=True, gx=None, gy=None),
                     dict(live=5, memory=30, stats=False, gx=(1, 5, 8), gy=None)]

    calls.clear()
    with torch.no_grad():
        d2sm_ext.d2sm_divergence(x, y, backend="triton", x_memory=xm, y_memory=ym)
    assert calls == [dict(live=5, memory=30, stats=True, gx=None, gy=None)]


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    x, y, mem = make_inputs((3, 70, 40), 10, device)
    runs = [run_backend("triton", x, y, mem, "js", True, "mean") for _ in range(3)]
    for out, gx, gy in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(gx, runs[0][1]) and torch.equal(gy, runs[0][2])


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    check_opcheck(torch.ops.d2sm_ext.triton_d2sm, torch.ops.d2sm_ext.triton_d2sm_backward, device)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    check_compile_fullgraph("triton", device, "js")


def test_auto_selection_and_errors():
    assert resolve_backend("auto", "cuda", torch.float32).name == "triton"
    assert resolve_backend("auto", "cuda", torch.bfloat16).name == "triton"
    assert resolve_backend("auto", "cuda", torch.float64).name != "triton"  # float64: not a Triton dtype
    assert resolve_backend("auto", "cpu", torch.float32).name != "triton"   # the interpreter is never "auto"
    with pytest.raises(ValueError, match="backend 'triton' cannot run torch.float64.*float32, float16, bfloat16"):
        d2sm_ext.d2sm_divergence(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64),
                                 backend="triton")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("red", ["mean", "none"])
def test_several_gradient_panels(red, device, monkeypatch):
    """Live rows processed in panels of 48 rows (3 panels for 130 rows), as for large M."""
    monkeypatch.setenv("D2SM_PANEL_ROWS", "48")
    check_parity("triton", (2, 130, 20), 30, "symmetric_kl", True, red, device)
