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

    def spy(x, y, xm, ym, rx, ry, a, bn, w, div, excl, eps, tf32, compute_stats, gx, gy, grams=None):
        calls.append(dict(live=x.shape[1], memory=0 if xm is None else xm.shape[1], stats=compute_stats,
                          gx=None if gx is None else tuple(gx.shape), gy=None if gy is None else tuple(gy.shape)))
        return real(x, y, xm, ym, rx, ry, a, bn, w, div, excl, eps, tf32, compute_stats, gx, gy, grams)

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
    # cuda ranks above triton where it is built and usable (auto_rules.py: measured faster on an H200)
    first = "cuda" if "cuda" in d2sm_ext.available_backends() else "triton"
    assert resolve_backend("auto", "cuda", torch.float32).name == first
    assert resolve_backend("auto", "cuda", torch.bfloat16).name == first
    assert resolve_backend("auto", "cuda", torch.float64).name != "triton"  # float64: not a Triton dtype
    assert resolve_backend("auto", "cpu", torch.float32).name != "triton"   # the interpreter is never "auto"
    with pytest.raises(ValueError, match="backend 'triton' cannot run torch.float64.*float32, float16, bfloat16"):
        d2sm_ext.d2sm_divergence(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64),
                                 backend="triton")


class _LaunchSpy:
    """Stands in for triton_kernels: every `kernel[grid](...)` records whether it ran inside
    triton_backend.device_guard, and for which device."""

    def __init__(self, module, monkeypatch):
        self.module, self.launches, self.inside = module, [], []
        real_guard = triton_backend.device_guard
        spy = self

        class Guard:
            def __init__(self, device):
                self.device, self.ctx = device, real_guard(device)

            def __enter__(self):
                spy.inside.append(self.device)
                return self.ctx.__enter__()

            def __exit__(self, *exc):
                spy.inside.pop()
                return self.ctx.__exit__(*exc)

        monkeypatch.setattr(triton_backend, "device_guard", Guard)
        monkeypatch.setattr(triton_backend, "K", self)

    def __getattr__(self, name):
        real = getattr(self.module, name)
        if not name.endswith("_kernel"):
            return real
        spy = self

        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    spy.launches.append((name, spy.inside[-1] if spy.inside else None))
                    return real[grid](*args, **kwargs)
                return launch
        return Launcher()


@pytest.mark.parametrize("device", DEVICES)
def test_every_launch_runs_under_the_device_guard(device, monkeypatch):
    """Triton launches on the current device: each op (forward, backward of "none", the queue's
    cross sums) makes the inputs' device current around all of its launches."""
    spy = _LaunchSpy(triton_backend.K, monkeypatch)
    x, y, _ = make_inputs((2, 5, 8), 0, device, y_grad=True)
    xm, ym = torch.randn(2, 7, 8, device=device), torch.randn(2, 7, 8, device=device)
    d2sm_ext.d2sm_divergence(x, y, reduction="none", backend="triton", x_memory=xm, y_memory=ym).sum().backward()
    rows = torch.randn(6, 8, device=device)
    norms = torch.rand(6, device=device)
    triton_backend.cross_sums(rows, rows, norms, norms, rows, rows, norms, norms, 1e-8, None, None, 3, False)
    names = {name for name, _ in spy.launches}
    assert {"row_inv_norm_kernel", "weighted_colsum_kernel", "row_dot_kernel", "pair_panel_kernel",
            "panel_grad_kernel", "cross_sums_kernel"} <= names, names
    assert all(guard == torch.device(device) or guard == x.device for _, guard in spy.launches), spy.launches


@pytest.mark.parametrize("device", DEVICES)
def test_too_many_problems_raise_before_any_launch(device, monkeypatch):
    """B sits on a grid axis limited to 65535: the clear message comes before the first launch
    (the O(M·d) pre-pass kernels, which put B on grid y, included)."""
    spy = _LaunchSpy(triton_backend.K, monkeypatch)
    x = torch.randn(65536, 2, 1, device=device)
    with pytest.raises(ValueError, match="at most 65535 problems per call, got B=65536"):
        d2sm_ext.d2sm_divergence(x, x.clone(), backend="triton")
    with pytest.raises(ValueError, match="at most 65535 problems per call, got B=65536"):
        torch.ops.d2sm_ext.triton_d2sm_backward(x, x, None, None, torch.ones(6, 65536, 2, device=device),
                                                torch.ones(65536, 2, device=device), "kl", True, 1e-8, False,
                                                True, False)
    assert spy.launches == []


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason=f"needs two CUDA devices (inputs on one that is not current); "
                           f"{torch.cuda.device_count()} visible")
def test_inputs_on_a_device_that_is_not_current():
    """Inputs on cuda:1 while cuda:0 is current: same values and gradients as on cuda:0."""
    x, y, mem = make_inputs((2, 40, 16), 24, "cuda:0", y_grad=True)
    out0 = d2sm_ext.d2sm_divergence(x, y, backend="triton", x_memory=mem[0], y_memory=mem[1])
    g0 = torch.autograd.grad(out0, (x, y))
    x1, y1 = (t.detach().to("cuda:1").requires_grad_(True) for t in (x, y))
    with torch.cuda.device(0):
        out1 = d2sm_ext.d2sm_divergence(x1, y1, backend="triton", x_memory=mem[0].to("cuda:1"),
                                        y_memory=mem[1].to("cuda:1"))
        g1 = torch.autograd.grad(out1, (x1, y1))
        torch.cuda.synchronize(1)
    assert out1.device == torch.device("cuda", 1)
    assert torch.equal(out1.cpu(), out0.cpu())
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(g0, g1))
