"""Every validation error of d2sm_divergence says what was expected and what was given."""
import pytest
import torch

import d2sm_ext
from d2sm_ext import d2sm_divergence

x = torch.randn(5, 4)
y = torch.randn(5, 4)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(x=torch.randn(4), y=torch.randn(4)), ValueError, r"\(M, d\) or \(B, M, d\).*1-d"),
    (dict(x=torch.randn(1, 2, 3, 4), y=torch.randn(1, 2, 3, 4)), ValueError, "4-d"),
    (dict(x=x, y=torch.randn(5, 3)), ValueError, r"same shape.*\(5, 4\).*\(5, 3\)"),
    (dict(x=torch.ones(5, 4, dtype=torch.long), y=torch.ones(5, 4, dtype=torch.long)), TypeError, "floating.*int64"),
    (dict(x=torch.randn(5, 4, dtype=torch.complex64), y=torch.randn(5, 4, dtype=torch.complex64)), TypeError, "complex64"),
    (dict(x=x, y=y.to("meta")), ValueError, "same device"),
    (dict(x=[[1.0]], y=y), TypeError, "torch.Tensor"),
    (dict(x=torch.randn(1, 4), y=torch.randn(1, 4)), ValueError, "needs at least 2"),
    (dict(x=torch.randn(0, 4), y=torch.randn(0, 4), exclude_self=False), ValueError, "needs at least 1"),
    (dict(x=torch.randn(5, 0), y=torch.randn(5, 0)), ValueError, "d must be >= 1"),
    (dict(x=x, y=y, divergence="kld"), ValueError, "divergence must be one of"),
    (dict(x=x, y=y, reduction="avg"), ValueError, "reduction must be one of"),
    (dict(x=x, y=y, precision="fp8"), ValueError, "precision must be one of"),
    (dict(x=x, y=y, eps=-1.0), ValueError, "eps must be"),
    (dict(x=x, y=y, eps=float("nan")), ValueError, "eps must be"),
    (dict(x=x, y=y, eps=0.0, backend="cpu"), ValueError, r"backend 'cpu' cannot run.*need eps >= 1.18e-38"),
    (dict(x=x, y=y, eps=1e-40, backend="cpu"), ValueError, r"need eps >= .*got eps=1e-40"),
    (dict(x=x, y=y, exclude_self=1), TypeError, "exclude_self must be a bool"),
    (dict(x=x, y=y, backend="fastest"), ValueError, r"unknown backend 'fastest'.*available: 'auto', .*'reference'"),
    (dict(x=x, y=y, x_memory=torch.randn(3, 4)), ValueError, "given together"),
    (dict(x=x, y=y, x_memory=torch.randn(3, 5), y_memory=torch.randn(3, 5)), ValueError, r"\(Q, d\) matching x"),
    (dict(x=x, y=y, x_memory=torch.randn(3, 4), y_memory=torch.randn(2, 4)), ValueError, "same shape"),
    (dict(x=torch.randn(2, 5, 4), y=torch.randn(2, 5, 4), x_memory=torch.randn(3, 5, 4), y_memory=torch.randn(3, 5, 4)), ValueError, r"\(B, Q, d\)"),
    (dict(x=torch.randn(0, 5, 4), y=torch.randn(0, 5, 4)), ValueError, "B must be >= 1"),
])
def test_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        d2sm_divergence(**kwargs)


def test_single_live_row_with_memory_is_valid():
    out = d2sm_divergence(torch.randn(1, 4), torch.randn(1, 4), x_memory=torch.randn(3, 4), y_memory=torch.randn(3, 4))
    assert torch.isfinite(out)


def test_single_row_without_exclude_self_is_valid():
    out = d2sm_divergence(torch.randn(1, 4), torch.randn(1, 4), exclude_self=False)
    assert out.item() == 0.0  # one row: both distributions are the point mass on itself


def test_auto_uses_a_registered_backend_and_registry_lists_reference():
    assert "reference" in d2sm_ext.available_backends()
    torch.testing.assert_close(d2sm_divergence(x, y), d2sm_divergence(x, y, backend="reference"))
