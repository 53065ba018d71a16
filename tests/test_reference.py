"""The reference against the literal loop implementation, gradcheck in float64, edge cases."""
import itertools

import pytest
import torch

import d2sm_ext
from d2sm_ext.reference import DIVERGENCES, REDUCTIONS, d2sm_reference
from literal import literal_d2sm

CASES = list(itertools.product(DIVERGENCES, (True, False), REDUCTIONS))


def _assert_matches_literal(x, y, div, excl, red, rtol=1e-10, **kw):
    got = d2sm_reference(x, y, div, excl, red, **kw)
    want = torch.tensor(literal_d2sm(x, y, div, excl, red, **kw), dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("div,excl,red", CASES)
@pytest.mark.parametrize("m,d", [(2, 1), (3, 5), (17, 300), (64, 5)])
def test_matches_literal(div, excl, red, m, d):
    x = torch.randn(m, d, dtype=torch.float64)
    y = x + 0.5 * torch.randn(m, d, dtype=torch.float64)
    _assert_matches_literal(x, y, div, excl, red)


@pytest.mark.parametrize("div,excl,red", CASES)
def test_edge_rows_match_literal(div, excl, red):
    """Zero rows, duplicated rows and antipodal rows (kernel value eps)."""
    x = torch.randn(9, 6, dtype=torch.float64)
    y = torch.randn(9, 6, dtype=torch.float64)
    x[0] = 0.0           # zero row in x
    y[3] = 0.0           # zero row in y
    x[1] = x[2]          # duplicated rows
    y[4] = -y[5]         # antipodal rows
    x[6] = -2.0 * x[7]
    # An antipodal pair's kernel is eps + (rounding of 1 + cos ~ 1e-16): its log is conditioned
    # like 1e-16 / eps = 1e-8 relative, so with eps = 1e-8 we can ask for 1e-7, not 1e-10.
    _assert_matches_literal(x, y, div, excl, red, rtol=1e-7)
    _assert_matches_literal(x, y, div, excl, red, eps=0.1)


def test_noncontiguous_equals_contiguous():
    base = torch.randn(6, 20, 2, dtype=torch.float64)
    x, y = base[..., 0], base[..., 1]  # strided views
    assert not x.is_contiguous()
    for div in DIVERGENCES:
        torch.testing.assert_close(d2sm_reference(x, y, div), d2sm_reference(x.contiguous(), y.contiguous(), div))
    _assert_matches_literal(x, y, "js", True, "none")


@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("excl", [True, False])
def test_batch_equals_loop_over_problems(div, excl):
    x = torch.randn(3, 7, 4, dtype=torch.float64)
    y = torch.randn(3, 7, 4, dtype=torch.float64)
    rows = d2sm_reference(x, y, div, excl, "none")
    assert rows.shape == (3, 7)
    for b in range(3):
        torch.testing.assert_close(rows[b], d2sm_reference(x[b], y[b], div, excl, "none"))
    torch.testing.assert_close(d2sm_reference(x, y, div, excl, "mean"), rows.mean())
    _assert_matches_literal(x, y, div, excl, "none")


@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("batched", [False, True])
def test_memory_rows_equal_concatenation_and_get_no_gradient(div, batched):
    lead = (2,) if batched else ()
    x = torch.randn(*lead, 5, 8, dtype=torch.float64, requires_grad=True)
    y = torch.randn(*lead, 5, 8, dtype=torch.float64, requires_grad=True)
    xm = torch.randn(*lead, 11, 8, dtype=torch.float64, requires_grad=True)
    ym = torch.randn(*lead, 11, 8, dtype=torch.float64, requires_grad=True)
    got = d2sm_reference(x, y, div, True, "mean", x_memory=xm, y_memory=ym)
    want = d2sm_reference(torch.cat([x, xm], -2), torch.cat([y, ym], -2), div, True, "mean")
    torch.testing.assert_close(got, want)
    _assert_matches_literal(x.detach(), y.detach(), div, True, "none", x_memory=xm.detach(), y_memory=ym.detach())
    got.backward()
    assert xm.grad is None and ym.grad is None
    assert x.grad is not None and x.grad.abs().sum() > 0 and y.grad.abs().sum() > 0


@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("excl", [True, False])
def test_gradcheck_float64(div, excl):
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: d2sm_reference(a, b, div, excl, "mean"), (x, y))
    # reduction="none" exercises every row's upstream gradient separately
    assert torch.autograd.gradcheck(lambda a, b: d2sm_reference(a, b, div, excl, "none"), (x, y))


def test_gradcheck_with_memory_and_batch():
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    xm = torch.randn(2, 4, 5, dtype=torch.float64)
    ym = torch.randn(2, 4, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, b: d2sm_reference(a, b, "symmetric_kl", True, "sum", x_memory=xm, y_memory=ym), (x, y))


def test_zero_row_gets_zero_gradient_not_nan():
    x = torch.randn(5, 3, dtype=torch.float64)
    x[2] = 0
    x.requires_grad_(True)
    y = torch.randn(5, 3, dtype=torch.float64)
    d2sm_reference(x, y).backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[2] == 0).all()


def test_identical_inputs_give_zero_divergence():
    x = torch.randn(10, 16, dtype=torch.float64)
    for div in DIVERGENCES:
        assert d2sm_reference(x, x.clone(), div).abs() < 1e-14
        # scale-invariance of the cosine kernel: the divergence sees directions only
        assert d2sm_reference(3.0 * x, x, div).abs() < 1e-14


def test_closed_form_normaliser_fact():
    """docs/DESIGN.md §3.1: A_i = |S_i|(1/2 + eps) + 1/2 (x̂_i·s − ‖x̂_i‖²), s = Σ_j x̂_j."""
    x = torch.randn(12, 7, dtype=torch.float64)
    eps = 1e-3
    xn = torch.nn.functional.normalize(x, dim=1)
    k = 0.5 + 0.5 * xn @ xn.T + eps
    direct = k.sum(1) - k.diagonal()
    s = xn.sum(0)
    closed = 11 * (0.5 + eps) + 0.5 * (xn @ s - (xn * xn).sum(1))
    torch.testing.assert_close(direct, closed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(dtype):
    x = torch.randn(9, 12)
    y = torch.randn(9, 12)
    got = d2sm_ext.d2sm_divergence(x.to(dtype), y.to(dtype), backend="reference")
    assert got.dtype == dtype
    want = d2sm_reference(x.to(dtype).float(), y.to(dtype).float())
    torch.testing.assert_close(got, want.to(dtype), rtol=0, atol=0)


def test_eps_zero_antipodal_is_inf_not_nan():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    rows = d2sm_reference(x, y, "kl", True, "none", eps=0.0)
    assert not torch.isnan(rows).any()
    assert torch.isinf(rows).any()
