"""Mixed precision as people train (docs/DESIGN.md §4): every backend that runs on the CPU here
under torch.autocast, mixed input dtypes, half-precision gradients that do not flush to zero,
eps = 0, and a D2SMLoss training step with a GradScaler-scaled loss. The CUDA variants (fp16
and bf16 autocast) are in tests/test_cuda_gpu.py."""
import pytest
import torch
from torch import nn

import d2sm_ext
from backend_cases import (assert_f32_close, backends_on, check_half_gradients, check_under_autocast, edge_inputs,
                           make_inputs, max_err, reference64)
from d2sm_ext.backends import resolve_backend
from d2sm_ext.reference import d2sm_reference

CPU_BACKENDS = backends_on("cpu")
FUSED_CPU_BACKENDS = [b for b in CPU_BACKENDS if b != "reference"]


def test_every_cpu_backend_is_covered():
    assert {"reference", "cpu"} <= set(CPU_BACKENDS), CPU_BACKENDS


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("feature_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("red", ["mean", "none"])
def test_op_under_autocast_matches_float64_reference(backend, feature_dtype, red):
    check_under_autocast(backend, "cpu", torch.bfloat16, feature_dtype, red)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mixed_dtypes_are_promoted_to_the_widest(backend):
    """bf16 x, fp32 y, fp16 memory rows → computed as float32; each gradient in its input's dtype."""
    x, y, mem = make_inputs((20, 16), 8, "cpu")
    xb = x.detach().to(torch.bfloat16).requires_grad_(True)
    mem_h = (mem[0].half(), mem[1].half())
    out = d2sm_ext.d2sm_divergence(xb, y, backend=backend, x_memory=mem_h[0], y_memory=mem_h[1])
    assert out.dtype == torch.float32
    gx, gy = torch.autograd.grad(out * 2, (xb, y))
    assert gx.dtype == torch.bfloat16 and gy.dtype == torch.float32
    promoted = (mem_h[0].float(), mem_h[1].float())
    want, wgx, wgy = reference64(xb.float(), y, promoted, "kl", True, "mean")
    assert_f32_close(out, want, "value")
    assert_f32_close(gy, wgy, "grad y")
    assert max_err(gx, wgx) <= 1e-2 * wgx.abs().max().item()  # the float32 gradient rounded once to bf16
    # fp16 with bf16 (neither contains the other) promotes to float32, as torch.promote_types does
    out = d2sm_ext.d2sm_divergence(x.detach().half(), y.detach().bfloat16(), backend=backend)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("backend", FUSED_CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_gradients_do_not_flush_to_zero(backend, dtype):
    check_half_gradients(backend, "cpu", dtype, 1024)


def test_fused_backends_refuse_eps_zero_and_auto_takes_the_reference():
    for eps in (0.0, 1e-40):  # 1e-40 is not a normal float32: the fused kernels would see 0
        assert resolve_backend("auto", "cpu", torch.float32, eps).name == "reference"
        for backend in FUSED_CPU_BACKENDS:
            with pytest.raises(ValueError, match=f"backend '{backend}' cannot run.*need eps >="):
                d2sm_ext.d2sm_divergence(torch.randn(5, 3), torch.randn(5, 3), eps=eps, backend=backend)
    assert resolve_backend("auto", "cpu", torch.float32, 1e-30).name != "reference"


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


def _tiny_extractor():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(2))


TRAINING_CONFIGS = {
    "internal": dict(sampling="internal", patch_size=8, stride=4),
    "pooled": dict(sampling="pooled", patch_size=8, stride=4),
    "pooled+queue": dict(sampling="pooled", patch_size=8, stride=4, queue_size=16),
    "batch": dict(sampling="batch"),
    "batch+queue": dict(sampling="batch", queue_size=5),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", list(TRAINING_CONFIGS))
def test_training_step_under_autocast_with_grad_scaler(backend, mode):
    """Two steps under CPU bf16 autocast with a GradScaler-scaled loss: the loss is a finite
    float32 scalar and every parameter of the network gets a finite, non-zero gradient."""
    crit = d2sm_ext.D2SMLoss(extractor=_tiny_extractor(), backend=backend, **TRAINING_CONFIGS[mode])
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1))
    opt = torch.optim.SGD(net.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    clean = torch.rand(4, 3, 12, 12)
    for _ in range(2):
        noisy = clean + 0.1 * torch.randn_like(clean)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = crit(noisy + net(noisy), clean)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        for p in net.parameters():
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
        scaler.step(opt)
        scaler.update()


def _forward_ops():
    ops = {}
    if "cpu" in FUSED_CPU_BACKENDS:
        ops["cpu"] = torch.ops.d2sm_ext.fused_forward
    if "triton" in FUSED_CPU_BACKENDS:
        ops["triton"] = torch.ops.d2sm_ext.triton_d2sm
    return ops


@pytest.mark.parametrize("backend", FUSED_CPU_BACKENDS)
def test_op_autocast_kernel_promotes_and_excludes_autocast(backend):
    """The op itself (its autocast registration), called directly with bf16 x and float32 y
    under bf16 autocast: inputs promoted to float32, computed as float32, value in float32."""
    op = _forward_ops()[backend]
    x, y, mem = make_inputs((12, 8), 4, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value, _, gx, _ = op(x.detach().bfloat16(), y.detach(), mem[0], mem[1], "kl", True, 1e-8, False, "mean",
                             True, False)
    assert value.dtype == torch.float32 and gx.dtype == torch.float32
    want, _, _ = reference64(x.detach().bfloat16().float(), y, mem, "kl", True, "mean")
    assert_f32_close(value, want, "value")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_step_under_autocast(backend):
    """torch.compile(fullgraph=True) of a model step under bf16 autocast: no graph break, same
    float32 value and parameter gradient as eager."""
    torch.manual_seed(0)
    net = nn.Linear(8, 16)
    xin, yfeat = torch.randn(12, 8), torch.randn(12, 16)

    def step(inp):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return d2sm_ext.d2sm_divergence(net(inp), yfeat, backend=backend)

    eager = step(xin)
    eager.backward()
    g_eager = net.weight.grad.clone()
    net.zero_grad()
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(xin)
    out.backward()
    assert out.dtype == eager.dtype == torch.float32
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(net.weight.grad, g_eager)
