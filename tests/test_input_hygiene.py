"""No silently wrong loss: non-finite values propagate on every backend, bad images are refused
with a message that names the fix, empty and degenerate batches behave as documented, and the
backend listing says only what runs here. (DDP with an empty batch on one rank:
tests/test_distributed.py.)"""
import pydoc
import warnings

import pytest
import torch
from torch import nn

import d2sm_ext
from backend_matrix import rows_params
from loss_cases import SAMPLING_CONFIGS, tiny_extractor
from d2sm_ext import D2SMLoss
from d2sm_ext.backends import triton_backend

ROWS = [pytest.param(p.values[0], id=p.id) for p in rows_params(variants=False)]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy in Triton's interpreter
@pytest.mark.parametrize("row", ROWS)
@pytest.mark.parametrize("where", ["x", "y", "x_memory", "y_memory"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("red", ["mean", "none"])
def test_non_finite_values_propagate(row, where, bad, red):
    """One non-finite entry in problem 1 (of 2): every row of problem 1 is NaN, so is the reduced
    loss, and so are problem 1's gradients; problem 0 stays finite."""
    g = torch.Generator().manual_seed(0)
    t = {k: torch.randn(2, 10 if k in ("x", "y") else 3, 8, generator=g) for k in ("x", "y", "x_memory", "y_memory")}
    t[where][1, 2, 3] = bad
    t = {k: v.to(row.device) for k, v in t.items()}
    x, y = t["x"].requires_grad_(True), t["y"].requires_grad_(True)
    out = d2sm_ext.d2sm_divergence(x, y, reduction=red, backend=row.backend, x_memory=t["x_memory"],
                                   y_memory=t["y_memory"])
    gx, gy = torch.autograd.grad(out.sum(), (x, y))
    if red == "mean":
        assert torch.isnan(out)
    else:
        assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()
        assert torch.isfinite(gx[0]).all() and torch.isfinite(gy[0]).all()
    assert torch.isnan(gx[1]).all() and torch.isnan(gy[1]).all()


@pytest.mark.parametrize("row", ROWS)
@pytest.mark.parametrize("div", d2sm_ext.DIVERGENCES)
def test_zero_divergences_are_not_negative(row, div):
    """Identical restored and clean features (every divergence exactly 0): no tiny negatives."""
    x = torch.randn(3, 40, 16, device=row.device)
    rows = d2sm_ext.d2sm_divergence(x, x.clone(), div, reduction="none", backend=row.backend)
    assert (rows >= 0).all() and rows.max() < 1e-6


def test_nan_pixel_gives_nan_loss():
    crit = D2SMLoss(extractor=tiny_extractor(), patch_size=8, stride=4)
    clean = torch.rand(2, 3, 12, 12)
    restored = clean.clone()
    restored[0, 1, 5, 5] = float("nan")
    restored.requires_grad_(True)
    loss = crit(restored, clean)
    assert torch.isnan(loss)
    (g,) = torch.autograd.grad(loss, restored)
    assert torch.isnan(g[0]).any()  # the image's gradient shows it too (GradScaler skips the step)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_integer_images_are_refused_with_the_fix(dtype):
    crit = D2SMLoss(extractor=tiny_extractor(), patch_size=8, stride=4)
    imgs = torch.randint(0, 255, (2, 3, 12, 12)).to(dtype)
    with pytest.raises(TypeError, match=r"floating-point.*img\.float\(\) / 255"):
        crit(imgs, imgs)


@pytest.mark.parametrize("scale,shift", [(255.0, 0.0), (2.0, -1.0)])
def test_out_of_range_images_warn_once(scale, shift):
    crit = D2SMLoss(extractor=tiny_extractor(), patch_size=8, stride=4)
    imgs = torch.rand(2, 3, 12, 12) * scale + shift
    with pytest.warns(UserWarning, match=r"expects images in \[0, 1\]"):
        crit(imgs, imgs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        crit(imgs, imgs)  # checked on the first call only: no second warning, no sync


def test_images_in_range_do_not_warn():
    crit = D2SMLoss(extractor=tiny_extractor(), patch_size=8, stride=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        imgs = torch.rand(2, 3, 12, 12)
        crit(imgs + 0.005, imgs)


def test_image_dtypes_are_reconciled_with_the_extractor():
    """bf16 images with the float32 extractor, restored bf16 vs clean float32, float32 images
    with a float64 criterion: cast to the extractor's dtype, no layer error."""
    crit = D2SMLoss(extractor=tiny_extractor(), patch_size=8, stride=4)
    clean = torch.rand(2, 3, 12, 12)
    restored = (clean + 0.05 * torch.randn_like(clean)).requires_grad_(True)
    for r, c in ((restored.bfloat16(), clean.bfloat16()), (restored.bfloat16(), clean), (restored, clean.half())):
        loss = crit(r, c)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
    (g,) = torch.autograd.grad(crit(restored.bfloat16(), clean), restored)
    assert g.dtype == torch.float32 and g.abs().sum() > 0
    loss = crit.double()(restored, clean)
    assert loss.dtype == torch.float64 and torch.isfinite(loss)


def test_construction_checks_sizes_against_the_extractor():
    for kwargs, match in ((dict(patch_size=0), "patch_size must be a positive int"),
                          (dict(stride=0), "stride must be a positive int"),
                          (dict(weight=float("nan")), "weight must be a finite number"),
                          (dict(weight=-1.0), "weight must be a finite number")):
        with pytest.raises(ValueError, match=match):
            D2SMLoss(extractor=tiny_extractor(), **kwargs)
    with pytest.raises(ValueError, match=r"patch_size 16 is smaller than the extractor's minimum input size 32"):
        D2SMLoss(patch_size=16, stride=8)  # EfficientNet-Lite0
    declared = tiny_extractor()
    declared.min_input_size = 10
    with pytest.raises(ValueError, match="minimum input size 10"):
        D2SMLoss(extractor=declared, patch_size=8, stride=4)
    crit = D2SMLoss(extractor=declared, sampling="batch")  # whole images: checked per call
    with pytest.raises(ValueError, match=r"smaller than the extractor's minimum input size 10"):
        crit(torch.rand(3, 3, 8, 8), torch.rand(3, 3, 8, 8))


@pytest.mark.parametrize("mode", list(SAMPLING_CONFIGS))
def test_empty_batch(mode):
    """B = 0: 0 without a queue, the queue rows' own divergence with a filled one; backward works
    with zero gradients; the queue does not change."""
    crit = D2SMLoss(extractor=tiny_extractor(), **SAMPLING_CONFIGS[mode])
    torch.manual_seed(3)
    net = nn.Conv2d(3, 3, 3, padding=1)
    if crit.queue is not None:
        crit(torch.rand(3, 3, 12, 12), torch.rand(3, 3, 12, 12))  # fills the queue
    before = None if crit.queue is None else crit.queue.history()
    empty = torch.rand(0, 3, 12, 12)
    loss = crit(empty + net(empty), empty)
    loss.backward()
    assert net.weight.grad is not None and (net.weight.grad == 0).all()
    if crit.queue is None:
        assert loss == 0
    else:
        x_mem, y_mem = crit.queue.memory()
        # the queue rows' own divergence (the kept statistics or the full pass: float32 rounding apart)
        torch.testing.assert_close(loss.detach(), d2sm_ext.d2sm_divergence(x_mem, y_mem), rtol=1e-4, atol=1e-7)
        assert loss > 0
        after = crit.queue.history()
        assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_degenerate_sample_sets_are_refused_with_the_fix():
    fix = "Use a queue.*a larger batch.*or exclude_self=False"
    crit = D2SMLoss(extractor=tiny_extractor(), sampling="batch")
    imgs = torch.rand(2, 3, 12, 12)
    with pytest.raises(ValueError, match="the sample set has 2 row.*1 neighbour.*" + fix):
        crit(imgs, imgs)
    internal = D2SMLoss(extractor=tiny_extractor(), patch_size=12, stride=4)  # one patch per image
    with pytest.raises(ValueError, match="patch set has 1 row.*" + fix):
        internal(imgs, imgs)
    # the fixes work: exclude_self=False, a larger batch, a queue (its first step is 0: still filling)
    assert torch.isfinite(D2SMLoss(extractor=tiny_extractor(), sampling="batch", exclude_self=False)(imgs, imgs))
    assert torch.isfinite(crit(torch.rand(3, 3, 12, 12), torch.rand(3, 3, 12, 12)))
    queued = D2SMLoss(extractor=tiny_extractor(), sampling="batch", queue_size=8)
    assert queued(imgs, torch.rand(2, 3, 12, 12)) == 0
    assert queued(imgs, torch.rand(2, 3, 12, 12)) > 0


def test_available_backends_lists_only_what_runs_here(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(triton_backend, "interpreter_active", lambda: False)
    available, unavailable = d2sm_ext.available_backends(), d2sm_ext.unavailable_backends()
    assert "triton" not in available and "cuda" not in available
    assert "no CUDA device" in unavailable["triton"] and "no CUDA device" in unavailable["cuda"]
    with pytest.raises(ValueError, match="backend 'triton' cannot run here: no CUDA device"):
        d2sm_ext.d2sm_divergence(torch.randn(5, 3), torch.randn(5, 3), backend="triton")
    assert "reference" in available


def test_help_documents_every_argument():
    init = pydoc.render_doc(D2SMLoss.__init__, renderer=pydoc.plaintext)
    for arg in ("extractor", "sampling", "patch_size", "stride", "queue_size", "divergence", "weight",
                "exclude_self", "eps", "backend", "extractor_weights", "vgg_layer", "feature_dim", "distributed",
                "gather_live", ">= 32 px"):
        assert f"{arg}" in init, arg
    forward = pydoc.render_doc(D2SMLoss.forward, renderer=pydoc.plaintext)
    for phrase in ("B×3×H×W", "[0, 1]", "enqueued", "empty batch", "float32 under autocast"):
        assert phrase in forward, phrase


@pytest.mark.parametrize("row", ROWS)
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_evaluation_under_no_grad_and_inference_mode(row, context):
    """Under no_grad / inference_mode the value is the grad-mode value (float32 tolerance; the
    fused ops skip the gradient work), with explicit memory rows and with a queue; a queue
    enqueued under inference_mode keeps working with autograd afterwards."""
    from backend_cases import assert_f32_close

    g = torch.Generator().manual_seed(0)
    x, y, xm, ym = (torch.randn(n, 8, generator=g).to(row.device) for n in (10, 10, 6, 6))
    want = d2sm_ext.d2sm_divergence(x, y, backend=row.backend, x_memory=xm, y_memory=ym)
    with context():
        got = d2sm_ext.d2sm_divergence(x, y, backend=row.backend, x_memory=xm, y_memory=ym)
    assert_f32_close(got, want.detach().double().cpu(), "value")
    queue = d2sm_ext.FeatureQueue(8, 8, device=row.device, statistics=True, backend=row.backend)
    with context():
        queue.enqueue(xm, ym)
        got = d2sm_ext.d2sm_divergence(x, y, backend=row.backend, queue=queue)
    xg = x.clone().requires_grad_(True)
    want = d2sm_ext.d2sm_divergence(xg, y, backend=row.backend, queue=queue)
    assert_f32_close(got, want.detach().double().cpu(), "value with a queue")
    (gx,) = torch.autograd.grad(want, xg)
    assert torch.isfinite(gx).all() and gx.abs().sum() > 0
    queue.enqueue(x, y)
    assert len(queue) == 8


def test_d2sm_loss_enqueues_by_module_mode_not_by_grad_mode():
    """no_grad / inference_mode do not change what D2SMLoss does: in training mode it enqueues
    (a validation loop must call .eval()); in eval mode it never does."""
    for context in (torch.no_grad, torch.inference_mode):
        crit = D2SMLoss(extractor=tiny_extractor(), sampling="batch", queue_size=8)
        with context():
            crit(torch.rand(3, 3, 12, 12), torch.rand(3, 3, 12, 12))
        assert len(crit.queue) == 3
        crit.eval()
        with context():
            crit(torch.rand(3, 3, 12, 12), torch.rand(3, 3, 12, 12))
        assert len(crit.queue) == 3
        crit.train()
        restored = torch.rand(3, 3, 12, 12, requires_grad=True)
        loss = crit(restored, torch.rand(3, 3, 12, 12))
        (g,) = torch.autograd.grad(loss, restored)
        assert loss > 0 and g.abs().sum() > 0 and len(crit.queue) == 6
