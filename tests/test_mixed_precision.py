"""Mixed precision as people train (docs/DESIGN.md §4), on every row of the backend matrix
(tests/backend_matrix.py: the reference and the fused backends, CPU and, on a GPU, CUDA):
torch.autocast (CPU bf16; CUDA fp16 and bf16), mixed input dtypes, half-precision gradients that
do not flush to zero, eps = 0, torch.compile under autocast, and a D2SMLoss training step with a
GradScaler-scaled loss."""
import pytest
import torch

import d2sm_ext
from backend_cases import (assert_f32_close, check_compile_fullgraph, check_half_gradients, check_under_autocast,
                           edge_inputs, make_inputs, max_err, reference64)
from backend_matrix import ops_of, rows_params
from loss_cases import SAMPLING_CONFIGS, tiny_denoiser, tiny_extractor
from d2sm_ext.registry import resolve_backend
from d2sm_ext.reference import d2sm_reference

ROWS = rows_params(variants=False)
FUSED = rows_params(fused=True, variants=False)
CHECKED = rows_params(checked=True, variants=False)  # every backend but the reference
AUTOCAST_DTYPES = {"cpu": (torch.bfloat16,), "cuda": (torch.float16, torch.bfloat16)}


def _with_autocast_dtypes(params):
    out = []
    for p in params:
        row = p.values[0]
        for dtype in AUTOCAST_DTYPES[row.device]:
            out.append(pytest.param(row, dtype, id=f"{p.id}-{str(dtype)[6:]}"))
    return out


def _row_ids(params):
    return [pytest.param(p.values[0], id=p.id) for p in params]


@pytest.mark.parametrize("row,autocast_dtype", _with_autocast_dtypes(ROWS))
@pytest.mark.parametrize("features", ["float32", "autocast dtype"])
@pytest.mark.parametrize("red", ["mean", "none"])
def test_op_under_autocast_matches_float64_reference(row, autocast_dtype, features, red):
    feature_dtype = torch.float32 if features == "float32" else autocast_dtype
    check_under_autocast(row.backend, row.device, autocast_dtype, feature_dtype, red)


@pytest.mark.parametrize("row", _row_ids(ROWS))
def test_mixed_dtypes_are_promoted_to_the_widest(row):
    """bf16 x, fp32 y, fp16 memory rows → computed as float32; each gradient in its input's dtype."""
    x, y, mem = make_inputs((20, 16), 8, row.device)
    xb = x.detach().to(torch.bfloat16).requires_grad_(True)
    mem_h = (mem[0].half(), mem[1].half())
    out = d2sm_ext.d2sm_divergence(xb, y, backend=row.backend, x_memory=mem_h[0], y_memory=mem_h[1])
    assert out.dtype == torch.float32
    gx, gy = torch.autograd.grad(out * 2, (xb, y))
    assert gx.dtype == torch.bfloat16 and gy.dtype == torch.float32
    promoted = (mem_h[0].float(), mem_h[1].float())
    want, wgx, wgy = reference64(xb.float(), y, promoted, "kl", True, "mean")
    assert_f32_close(out, want, "value")
    assert_f32_close(gy, wgy, "grad y")
    assert max_err(gx, wgx) <= 1e-2 * wgx.abs().max().item()  # the float32 gradient rounded once to bf16
    # fp16 with bf16 (neither contains the other) promotes to float32, as torch.promote_types does
    out = d2sm_ext.d2sm_divergence(x.detach().half(), y.detach().bfloat16(), backend=row.backend)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("row", _row_ids(CHECKED))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_gradients_do_not_flush_to_zero(row, dtype):
    # ~1/m² pair weights fall below fp16's smallest normal (6.1e-5) from m = 129 on: the Triton
    # interpreter (triton-cpu, slow) takes m = 256, the C++ CPU path 1024, a GPU 4096
    m = 4096 if row.device != "cpu" else 256 if row.backend == "triton" else 1024
    check_half_gradients(row.backend, row.device, dtype, m)


@pytest.mark.parametrize("row", _row_ids(CHECKED))
def test_fused_backends_refuse_eps_zero_and_auto_takes_the_reference(row):
    for eps in (0.0, 1e-40):  # 1e-40 is not a normal float32: the fused kernels would see 0
        assert resolve_backend("auto", row.device, torch.float32, eps).name == "reference"
        with pytest.raises(ValueError, match=f"backend '{row.backend}' cannot run.*need eps >="):
            d2sm_ext.d2sm_divergence(torch.randn(5, 3, device=row.device), torch.randn(5, 3, device=row.device),
                                     eps=eps, backend=row.backend)
    assert row.backend in (resolve_backend(row.backend, row.device, torch.float32, 1e-30).name,)


@pytest.mark.parametrize("div", d2sm_ext.DIVERGENCES)
@pytest.mark.parametrize("excl", [True, False])
def test_eps_zero_with_antipodal_and_zero_rows(div, excl):
    """eps = 0 on the edge rows (zero, duplicated, antipodal): "auto" equals the reference in the
    same dtype (+inf included) and its gradients are finite wherever the reference's are."""
    for dtype in (torch.float32, torch.float64):
        x, y, mem = edge_inputs("cpu", dtype)
        for red in ("mean", "none"):
            up = torch.tensor(2.0, dtype=dtype) if red == "mean" else torch.ones(13, dtype=dtype)
            want = d2sm_reference(x, y, div, excl, red, eps=0.0, x_memory=mem[0], y_memory=mem[1])
            wgx, wgy = torch.autograd.grad(want, (x, y), up)
            out = d2sm_ext.d2sm_divergence(x, y, div, excl, red, eps=0.0, x_memory=mem[0], y_memory=mem[1])
            gx, gy = torch.autograd.grad(out, (x, y), up)
            assert torch.equal(torch.isinf(out), torch.isinf(want))
            finite = torch.isfinite(want)
            torch.testing.assert_close(out[finite], want[finite], rtol=0, atol=0)
            for got, ref in ((gx, wgx), (gy, wgy)):
                assert torch.isfinite(got[torch.isfinite(ref)]).all()
    # exactly antipodal restored rows 0 and 1 (K' = 0) whose clean rows are not: p = 0 < q
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    rows = d2sm_ext.d2sm_divergence(x, y, "reverse_kl", True, "none", eps=0.0)
    assert torch.isinf(rows[:2]).all() and torch.isfinite(rows[2])
    assert torch.isfinite(d2sm_ext.d2sm_divergence(x, y, "kl", True, "none", eps=0.0)).all()


@pytest.mark.parametrize("row,autocast_dtype", _with_autocast_dtypes(FUSED))
def test_op_autocast_kernel_promotes_and_excludes_autocast(row, autocast_dtype):
    """The op itself (its autocast registration), called directly with half x and float32 y under
    autocast: inputs promoted to float32, computed as float32, value in float32."""
    forward, _ = ops_of(row)
    x, y, mem = make_inputs((12, 8), 4, row.device)
    with torch.autocast(row.device, dtype=autocast_dtype):
        value, _, gx, _ = forward(x.detach().to(autocast_dtype), y.detach(), mem[0], mem[1], "kl", True, 1e-8, False,
                                  "mean", True, False)
    assert value.dtype == torch.float32 and gx.dtype == torch.float32
    want, _, _ = reference64(x.detach().to(autocast_dtype).float(), y, mem, "kl", True, "mean")
    assert_f32_close(value, want, "value")


@pytest.mark.parametrize("row,autocast_dtype", _with_autocast_dtypes(ROWS))
def test_compiled_step_under_autocast(row, autocast_dtype):
    check_compile_fullgraph(row.backend, row.device, "kl", autocast_dtype=autocast_dtype)


@pytest.mark.parametrize("row,autocast_dtype", _with_autocast_dtypes(ROWS))
@pytest.mark.parametrize("mode", list(SAMPLING_CONFIGS))
def test_training_step_under_autocast_with_grad_scaler(row, autocast_dtype, mode):
    """Two steps under autocast with a GradScaler-scaled loss: the loss is a finite float32
    scalar and every parameter of the network gets a finite, non-zero gradient. (The step cannot
    match a float32 step: the network and the extractor themselves run in half precision.)"""
    device = row.device
    crit = d2sm_ext.D2SMLoss(extractor=tiny_extractor(), backend=row.backend, **SAMPLING_CONFIGS[mode]).to(device)
    net = tiny_denoiser().to(device)
    opt = torch.optim.SGD(net.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 10)
    clean = torch.rand(4, 3, 12, 12, device=device)
    for _ in range(2):
        noisy = clean + 0.1 * torch.randn_like(clean)
        opt.zero_grad()
        with torch.autocast(device, dtype=autocast_dtype):
            loss = crit(noisy + net(noisy), clean)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        for p in net.parameters():
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
        scaler.step(opt)
        scaler.update()
