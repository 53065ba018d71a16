"""What only the Triton backend has (its math against the reference runs in the backend matrix,
tests/test_backend_matrix.py; the sm_90 compile of every kernel variant in
tests/test_triton_compile.py): which passes it launches (no gradient work for memory rows, no
statistics in the backward of "none"), its "auto" selection and dtype errors.

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors (conftest sets it); with a
GPU they run for real on CUDA tensors.
"""
import pytest
import torch

import d2sm_ext
from backend_cases import make_inputs
from d2sm_ext.registry import resolve_backend

triton_backend = pytest.importorskip("d2sm_ext.backends.triton_backend", reason="Triton is not importable")

DEVICES = (["cpu"] if triton_backend.interpreter_active() else []) + (["cuda"] if torch.cuda.is_available() else [])
if not DEVICES:
    pytest.skip("no device for Triton: no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)


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


def test_auto_selection_and_errors():
    assert resolve_backend("auto", "cuda", torch.float32).name == "triton"
    assert resolve_backend("auto", "cuda", torch.bfloat16).name == "triton"
    assert resolve_backend("auto", "cuda", torch.float64).name != "triton"  # float64: not a Triton dtype
    assert resolve_backend("auto", "cpu", torch.float32).name != "triton"   # the interpreter is never "auto"
    with pytest.raises(ValueError, match="backend 'triton' cannot run torch.float64.*float32, float16, bfloat16"):
        d2sm_ext.d2sm_divergence(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64),
                                 backend="triton")
