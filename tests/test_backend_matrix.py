"""Every fused backend against the reference, driven by one table (tests/backend_matrix.py):
float32 parity for every divergence × exclude_self × reduction at several M, d, B and memory
sizes, float64 against the independent literal loops, gradcheck, edge rows (zero, duplicated,
antipodal), non-contiguous inputs, half precision, several panels, empty live sets, memory rows
without gradient, determinism, opcheck and torch.compile. Rows that cannot run here are one
skip each (test_row_runs_here). Backend-specific tests: test_cpp_extension.py,
test_cuda_build.py, test_cuda_on_gpu.py, test_triton_kernels.py, test_triton_compile.py."""
import itertools

import pytest
import torch

import d2sm_ext
from backend_cases import (assert_f32_close, check_compile_fullgraph, check_edge_rows_float64, check_float64_literal,
                           check_huge_rows, check_huge_rows_with_queue,
                           check_gradcheck, check_low_precision, check_non_contiguous, check_opcheck, check_parity,
                           edge_inputs, make_inputs, reference64, run_backend)
from backend_matrix import CPP_OPS, ROWS, TRITON_OPS, apply_variant, ops_of, rows_params
from d2sm_ext.reference import DIVERGENCES, REDUCTIONS, d2sm_reference

COMBOS = list(itertools.product(DIVERGENCES, (True, False), REDUCTIONS))
# (shape, memory rows): M from 2 to 200, d from 1 to 300, B in {1, 3}, memory on and off.
SMALL = [((2, 1), 0), ((3, 3, 7), 5), ((3, 17, 5), 6), ((37, 64), 20)]
# Several row and column blocks, d over several chunks: every divergence, two settings each.
LARGE = [((64, 300), 0), ((3, 3, 300), 64), ((3, 130, 300), 0), ((130, 7), 70)]

# The math suites run on every backend but the reference (CHECKED: the fused ones and "dense");
# the op suites (opcheck, direct op calls) on the fused ones.
CHECKED = rows_params(checked=True)
CHECKED_F32 = rows_params(checked=True, dtype=torch.float32)
CHECKED_F64 = rows_params(checked=True, dtype=torch.float64)
CHECKED_ONCE = rows_params(checked=True, variants=False)
FUSED = rows_params(fused=True)
FUSED_ONCE = rows_params(fused=True, variants=False)


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_row_runs_here(row):
    """One line per row of the matrix that has no cases on this machine, with the reason."""
    reason = row.why_not_here()
    if reason is not None:
        pytest.skip(f"{row.id}: {reason}")


@pytest.mark.parametrize("row,env", CHECKED_F32)
@pytest.mark.parametrize("shape,n_memory", SMALL)
@pytest.mark.parametrize("div,excl,red", COMBOS)
def test_parity_float32(row, env, div, excl, red, shape, n_memory, monkeypatch):
    apply_variant(monkeypatch, env)
    check_parity(row.backend, shape, n_memory, div, excl, red, row.device)


def _multi_block_params():
    """CHECKED_F32 × LARGE × divergences, except that the Triton interpreter (the triton-cpu row, two
    orders of magnitude slower than compiled code) takes the largest shape for kl and js only:
    reverse_kl and symmetric_kl reach several row, column and d blocks there through the other
    three shapes."""
    params = []
    for p in CHECKED_F32:
        row, env = p.values
        for i, (shape, n_memory) in enumerate(LARGE):
            for div in DIVERGENCES:
                if row.backend == "triton" and row.device == "cpu" and (shape, n_memory) == LARGE[2] \
                        and div in ("reverse_kl", "symmetric_kl"):
                    continue
                params.append(pytest.param(row, env, shape, n_memory, div, id=f"{p.id}-shape{i}-{div}"))
    return params


@pytest.mark.slow
@pytest.mark.parametrize("row,env,shape,n_memory,div", _multi_block_params())
@pytest.mark.parametrize("excl,red", [(True, "none"), (False, "mean")])
def test_parity_multi_block(row, env, div, excl, red, shape, n_memory, monkeypatch):
    apply_variant(monkeypatch, env)
    check_parity(row.backend, shape, n_memory, div, excl, red, row.device)


@pytest.mark.parametrize("row,env", CHECKED_F32)
@pytest.mark.parametrize("red", ["mean", "none"])
def test_several_panels_and_batch_chunks(row, env, red, monkeypatch):
    """Panels (or CPU blocks) of 48 rows, as for large M: with 130 live + 30 memory rows, 3 live
    panels (the symmetric CPU pass: 4 blocks, one straddling the live/memory boundary)."""
    apply_variant(monkeypatch, env)
    monkeypatch.setenv("D2SM_PANEL_ROWS", "48")
    check_parity(row.backend, (3, 130, 20), 30, "symmetric_kl", True, red, row.device)


@pytest.mark.parametrize("row,env", CHECKED_F64)
@pytest.mark.parametrize("div,excl,red", COMBOS)
def test_float64_matches_literal_and_reference(row, env, div, excl, red, monkeypatch):
    apply_variant(monkeypatch, env)
    check_float64_literal(row.backend, row.device, div, excl, red)


@pytest.mark.parametrize("row,env", CHECKED_F64)
@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("excl", [True, False])
@pytest.mark.parametrize("red", ["mean", "none"])
def test_gradcheck_float64(row, env, div, excl, red, monkeypatch):
    apply_variant(monkeypatch, env)
    check_gradcheck(row.backend, row.device, div, excl, red)


@pytest.mark.parametrize("row,env", CHECKED_F64)
@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("excl", [True, False])
def test_edge_rows_float64(row, env, div, excl, monkeypatch):
    apply_variant(monkeypatch, env)
    check_edge_rows_float64(row.backend, row.device, div, excl)


@pytest.mark.parametrize("row,env", CHECKED_F32)
@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("excl", [True, False])
def test_edge_rows_float32(row, env, div, excl, monkeypatch):
    """Zero, antipodal and duplicated rows in x, y and memory, with eps = 1e-3: an antipodal
    pair's kernel is eps + (1 + cos), and float32 rounds 1 + cos by ~6e-8, so with eps well
    above that the log-kernel is well conditioned and float32 tolerances apply."""
    apply_variant(monkeypatch, env)
    x, y, mem = edge_inputs(row.device)
    for red in ("mean", "none"):
        up = None if red == "mean" else torch.randn(13)
        want, wgx, wgy = reference64(x, y, mem, div, excl, red, up, eps=1e-3)
        got, gx, gy = run_backend(row.backend, x, y, mem, div, excl, red, up, eps=1e-3)
        assert_f32_close(got, want, "value")
        assert_f32_close(gx, wgx, "grad x")
        assert_f32_close(gy, wgy, "grad y")
        assert (gx[0] == 0).all() and (gy[3] == 0).all()  # zero rows: zero gradient


@pytest.mark.parametrize("row,env", CHECKED_F32)
@pytest.mark.parametrize("div", DIVERGENCES)
def test_edge_rows_default_eps_finite(row, env, div, monkeypatch):
    """With eps = 1e-8, below float32's rounding of 1 + cos, an antipodal pair's log-kernel is
    ill-conditioned for any float32 code. Everything stays finite, and the rows with no antipodal
    partner stay accurate."""
    apply_variant(monkeypatch, env)
    x, y, mem = edge_inputs(row.device)
    want, _, _ = reference64(x, y, mem, div, True, "none", torch.ones(13))
    got, gx, gy = run_backend(row.backend, x, y, mem, div, True, "none", torch.ones(13))
    assert torch.isfinite(got).all() and torch.isfinite(gx).all() and torch.isfinite(gy).all()
    antipodal_rows = [6, 7, 4, 5, 8, 11]  # x6/x7, y4/y5, y8/y-memory row 2 (global row 11)
    keep = [i for i in range(13) if i not in antipodal_rows]
    assert_f32_close(got[keep], want[keep], "value on well-conditioned rows")


@pytest.mark.parametrize("row,env", CHECKED_F32)
@pytest.mark.parametrize("div", ["kl", "js"])
def test_non_contiguous_inputs_and_memory(row, env, div, monkeypatch):
    apply_variant(monkeypatch, env)
    check_non_contiguous(row.backend, row.device, div)


@pytest.mark.parametrize("row,env", CHECKED_ONCE)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("div,red", [("kl", "mean"), ("js", "none"), ("reverse_kl", "sum")])
def test_half_inputs(row, env, dtype, div, red):
    check_low_precision(row.backend, (2, 40, 96), 24, div, True, red, row.device, dtype)


@pytest.mark.parametrize("row,env", FUSED)
def test_memory_rows_get_no_gradient(row, env, monkeypatch):
    apply_variant(monkeypatch, env)
    x = torch.randn(5, 8, device=row.device, requires_grad=True)
    y = torch.randn(5, 8, device=row.device)
    xm = torch.randn(30, 8, device=row.device, requires_grad=True)
    ym = torch.randn(30, 8, device=row.device, requires_grad=True)
    d2sm_ext.d2sm_divergence(x, y, backend=row.backend, x_memory=xm, y_memory=ym).backward()
    assert xm.grad is None and ym.grad is None and x.grad.abs().sum() > 0
    # the forward op is asked for the live rows' gradient only, and none for y
    forward, _ = ops_of(row)
    out = forward(x.detach(), y, xm.detach(), ym.detach(), "kl", True, 1e-8, False, "mean", True, False)
    assert out[2].shape == x.shape and out[3].numel() == 0


@pytest.mark.parametrize("row,env", CHECKED)
def test_no_live_rows_only_memory(row, env, monkeypatch):
    """N = 0 live rows with 7 memory rows: the memory rows' own divergences."""
    apply_variant(monkeypatch, env)
    x, y = torch.randn(0, 5, device=row.device), torch.randn(0, 5, device=row.device)
    xm, ym = torch.randn(7, 5, device=row.device), torch.randn(7, 5, device=row.device)
    got = d2sm_ext.d2sm_divergence(x, y, "kl", True, "none", backend=row.backend, x_memory=xm, y_memory=ym)
    want = d2sm_reference(x.cpu().double(), y.cpu().double(), "kl", True, "none", x_memory=xm.cpu().double(),
                          y_memory=ym.cpu().double())
    assert_f32_close(got, want, "values of memory rows")


@pytest.mark.parametrize("row,env", CHECKED)
def test_deterministic(row, env, monkeypatch):
    apply_variant(monkeypatch, env)
    x, y, mem = make_inputs((3, 70, 40), 10, row.device)
    runs = [run_backend(row.backend, x, y, mem, "js", True, "mean") for _ in range(3)]
    for out, gx, gy in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(gx, runs[0][1]) and torch.equal(gy, runs[0][2])


@pytest.mark.parametrize("row,env", FUSED_ONCE)
def test_opcheck(row, env):
    check_opcheck(*ops_of(row), row.device)


@pytest.mark.parametrize("row,env", CHECKED)
@pytest.mark.parametrize("div", ["symmetric_kl", "js"])
def test_torch_compile_fullgraph(row, env, div, monkeypatch):
    apply_variant(monkeypatch, env)
    check_compile_fullgraph(row.backend, row.device, div)


def test_fused_op_schemas_are_identical():
    """The C++ and Triton ops implement one contract (fused_op): the same arguments and returns."""
    ns = torch.ops.d2sm_ext
    if not (hasattr(ns, CPP_OPS[0]) and hasattr(ns, TRITON_OPS[0])):
        pytest.skip("needs both the C++ extension and Triton loaded")

    def signature(name):
        schema = getattr(ns, name).default._schema
        return [(a.name, str(a.type)) for a in schema.arguments], [str(r.type) for r in schema.returns]

    for cpp, triton in zip(CPP_OPS, TRITON_OPS):
        assert signature(cpp) == signature(triton), (cpp, triton)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy in Triton's interpreter
@pytest.mark.parametrize("row,env", rows_params(dtype=torch.float32))
@pytest.mark.parametrize("magnitude", [3e19, 1e30])
@pytest.mark.parametrize("div,red", [("kl", "mean"), ("js", "none"), ("reverse_kl", "sum")])
def test_huge_rows_are_scale_invariant(row, env, magnitude, div, red, monkeypatch):
    """float32 rows whose squared norm overflows (live and memory): same values and gradients
    (times the row scale) as the same rows at magnitude 1, on every row of the matrix."""
    apply_variant(monkeypatch, env)
    check_huge_rows(row.backend, row.device, magnitude, div, red)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy in Triton's interpreter
@pytest.mark.parametrize("row,env", rows_params(dtype=torch.float32))
@pytest.mark.parametrize("magnitude", [3e19, 1e30])
@pytest.mark.parametrize("div,last_batch", [("kl", False), ("symmetric_kl", True), ("js", False)])
def test_huge_rows_with_a_queue(row, env, magnitude, div, last_batch, monkeypatch):
    """The same with the memory rows in a FeatureQueue(statistics=True) passed as queue= (the
    kept-statistics path; js takes the full pass), enqueue and enqueue_last_batch."""
    apply_variant(monkeypatch, env)
    check_huge_rows_with_queue(row.backend, row.device, magnitude, div, use_last_batch=last_batch)
