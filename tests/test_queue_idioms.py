"""The queue path under ordinary PyTorch idioms (issue 21; README "Semantics in one place"):
evaluation under inference_mode/no_grad, module casts, checkpoints that carry the statistics'
meaning, deepcopy and pickle, double backward, activation checkpointing, torch.compile without
per-step recompiles. Each case either gives the exact numbers or raises a clear error."""
import copy
import io
import pickle

import pytest
import torch
import torch.utils.checkpoint

import d2sm_ext
from backend_matrix import rows_params
from d2sm_ext import D2SMLoss, FeatureQueue, d2sm_divergence

FUSED = [pytest.param(p.values[0], id=p.id) for p in rows_params(fused=True, variants=False)]


def filled(size=12, dim=5, dtype=torch.float32, device="cpu", seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    q = FeatureQueue(size, dim, dtype=dtype, device=device, statistics=True, **kw)
    x = torch.randn(size, dim, generator=g, dtype=torch.float64)
    q.enqueue(x.to(device, dtype), (x + 0.7 * torch.randn(size, dim, generator=g, dtype=torch.float64)).to(device, dtype))
    return q


def exact_error(q) -> float:
    kept = q.stats.row_sums.clone()
    q.refresh_statistics()
    return ((kept - q.stats.row_sums).abs().max() / q.stats.row_sums.abs().max()).item()


def full_pass(x, y, q, **kw):
    xm, ym = q.memory()
    return d2sm_divergence(x, y, x_memory=xm, y_memory=ym, backend="reference", **kw)


@pytest.mark.parametrize("row", FUSED + [pytest.param(None, id="reference")])
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_evaluation_modes(row, mode):
    """A loss under inference_mode or no_grad equals the full pass; what it leaves can still be
    enqueued (exactly); an enqueue under either mode keeps exact sums."""
    device, backend = ("cpu", "reference") if row is None else (row.device, row.backend)
    q = filled(device=device, backend=backend)
    x, y = torch.randn(4, 5, device=device), torch.randn(4, 5, device=device)
    context = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    with context():
        value = d2sm_divergence(x, y, queue=q, backend=backend)
        want = full_pass(x.double(), y.double(), q)
        q.enqueue_last_batch()
        q.enqueue(torch.randn(3, 5, device=device), torch.randn(3, 5, device=device))
    torch.testing.assert_close(value.double().cpu(), want.cpu(), rtol=1e-4, atol=1e-6)
    assert exact_error(q) < 1e-6


def test_d2smloss_evaluation_under_inference_mode():
    crit = D2SMLoss(extractor=torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1)),
                    sampling="batch", queue_size=8)
    imgs = torch.rand(5, 3, 12, 12)
    crit(imgs, imgs.flip(0))  # training: fills the queue
    crit.eval()
    before = crit.queue.x_buffer.clone()
    with torch.inference_mode():
        value = crit(imgs, imgs.flip(0))
    assert torch.isfinite(value) and torch.equal(crit.queue.x_buffer, before)


@pytest.mark.parametrize("cast", ["float", "half", "bfloat16", "double", "to_float64", "to_device"])
def test_module_casts_keep_the_sums_float64_and_exact(cast):
    """Module casts keep the sums in float64; a cast that changes the rows' dtype recomputes them
    for the rows as they now are (exact to float64 rounding), and the next loss equals the full
    pass over the cast rows."""
    q = filled()
    casts = {"float": lambda m: m.float(), "half": lambda m: m.half(), "bfloat16": lambda m: m.bfloat16(),
             "double": lambda m: m.double(), "to_float64": lambda m: m.to(torch.float64),
             "to_device": lambda m: m.to("cpu")}
    casts[cast](q)
    assert q.stats.row_sums.dtype == torch.float64
    kept = q.stats.row_sums.clone()
    q.refresh_statistics()
    torch.testing.assert_close(kept, q.stats.row_sums, rtol=1e-12, atol=0)
    q.enqueue(torch.randn(3, 5), torch.randn(3, 5))  # no dtype clash
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(d2sm_divergence(x.to(q.x_buffer.dtype), y.to(q.x_buffer.dtype), queue=q).double(),
                               full_pass(x.to(q.x_buffer.dtype), y.to(q.x_buffer.dtype), q).double(),
                               rtol=1e-3 if cast in ("half", "bfloat16") else 1e-5, atol=0)


def test_double_precision_cast_gives_float64_exact_sums():
    q = filled()
    q.double()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    got, want = d2sm_divergence(x, y, queue=q), full_pass(x, y, q)
    assert abs(got.item() - want.item()) <= 1e-9 * abs(want.item())


def test_d2smloss_module_cast():
    crit = D2SMLoss(extractor=torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1)),
                    sampling="batch", queue_size=8)
    imgs = torch.rand(5, 3, 12, 12)
    crit(imgs, imgs.flip(0))
    crit.to(torch.float64)
    assert crit.queue.stats.row_sums.dtype == torch.float64 and crit.queue.x_buffer.dtype == torch.float64
    crit(imgs.double(), imgs.flip(0).double())
    assert exact_error(crit.queue) < 1e-12


def test_checkpoints_carry_what_the_sums_mean():
    """eps and the statistics flag are saved: a checkpoint never loads into a queue that would
    read the sums for another eps; sums that were not saved (a queue without statistics, loaded
    with strict=False; a checkpoint from before eps was saved) are recomputed on load."""
    q = filled()
    state = q.state_dict()
    assert state["_extra_state"] == {"statistics": True, "eps": 1e-8}
    with pytest.raises(ValueError, match=r"kept for eps=1e-08, this queue keeps them for eps=0.001"):
        FeatureQueue(12, 5, statistics=True, eps=1e-3).load_state_dict(state)
    plain = FeatureQueue(12, 5)
    plain.load_state_dict({k: v for k, v in state.items() if not k.startswith("stats.")}, strict=False)
    with_stats = FeatureQueue(12, 5, statistics=True)
    with_stats.load_state_dict(plain.state_dict(), strict=False)
    torch.testing.assert_close(with_stats.stats.row_sums, q.stats.row_sums, rtol=1e-6, atol=0)
    legacy = {k.replace("stats.", ""): v for k, v in state.items() if k != "_extra_state"}
    legacy["row_sums"] = torch.zeros_like(legacy["row_sums"])  # of unknown meaning: recomputed
    old = FeatureQueue(12, 5, statistics=True)
    old.load_state_dict(legacy)
    torch.testing.assert_close(old.stats.row_sums, q.stats.row_sums, rtol=1e-6, atol=0)
    buffer = io.BytesIO()
    torch.save(q.state_dict(), buffer)
    buffer.seek(0)
    again = FeatureQueue(12, 5, statistics=True)
    again.load_state_dict(torch.load(buffer))
    assert torch.equal(again.stats.row_sums, q.stats.row_sums)


def test_deepcopy_and_pickle():
    q = filled()
    x, y = torch.randn(3, 5), torch.randn(3, 5)
    d2sm_divergence(x, y, queue=q)
    for twin in (copy.deepcopy(q), pickle.loads(pickle.dumps(q))):
        assert torch.equal(twin.stats.row_sums, q.stats.row_sums) and twin.stats.row_sums is not q.stats.row_sums
        with pytest.raises(RuntimeError, match="no loss over this queue"):
            twin.enqueue_last_batch()  # the original's pending rows stay with the original
        twin.enqueue(x, y)
        assert exact_error(twin) < 1e-6
    q.enqueue_last_batch()
    assert exact_error(q) < 1e-6


@pytest.mark.parametrize("row", FUSED)
def test_double_backward_raises_on_fused_backends(row):
    """The fused computations are differentiable once: create_graph=True raises (never a gradient
    without a graph that a gradient penalty would silently drop), with and without a queue."""
    q = filled(device=row.device)
    x = torch.randn(4, 5, device=row.device, requires_grad=True)
    y = torch.randn(4, 5, device=row.device)
    xm, ym = q.memory()
    for kw in (dict(queue=q), dict(x_memory=xm, y_memory=ym)):
        loss = d2sm_divergence(x, y, backend=row.backend, **kw)
        with pytest.raises(RuntimeError, match="differentiable once"):
            torch.autograd.grad(loss, x, create_graph=True)


def test_double_backward_on_dense_raises_for_the_full_pass():
    """backend='dense' ("auto"'s fallback on a GPU and without the C++ extension) differentiates its
    full pass once (a hand-written normalisation backward): create_graph=True raises naming the
    reference; over a statistics queue it differentiates through the sums, twice, as the reference."""
    q = filled(dtype=torch.float64)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 5, dtype=torch.float64)
    xm, ym = q.memory()
    loss = d2sm_divergence(x, y, backend="dense", x_memory=xm, y_memory=ym)
    with pytest.raises(RuntimeError, match="differentiable once.*backend='reference'"):
        torch.autograd.grad(loss, x, create_graph=True)
    (g,) = torch.autograd.grad(d2sm_divergence(x, y, backend="dense", queue=q), x, create_graph=True)
    (want,) = torch.autograd.grad(d2sm_divergence(x, y, backend="reference", queue=q), x, create_graph=True)
    torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12)
    assert g.requires_grad


def test_double_backward_on_the_reference_with_a_queue():
    """backend='reference' differentiates twice, with a queue too (autograd through the kept-
    statistics formula): a gradient penalty equals the full pass's."""
    q = filled(dtype=torch.float64)
    x0, y = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    penalties = []
    for kw in (dict(queue=q), dict(x_memory=q.memory()[0], y_memory=q.memory()[1])):
        x = x0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(d2sm_divergence(x, y, backend="reference", **kw), x, create_graph=True)
        (gg,) = torch.autograd.grad(g.square().sum(), x)
        penalties.append(gg)
    assert penalties[0].abs().max() > 0
    torch.testing.assert_close(penalties[0], penalties[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_of_the_loss_module_raises(use_reentrant):
    """A D2SMLoss with a queue recomputed by activation checkpointing would see a queue that
    already holds its batch: it raises, naming the fix. Checkpointing only the network works."""
    crit = D2SMLoss(extractor=torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1)),
                    sampling="batch", queue_size=8)
    net = torch.nn.Conv2d(3, 3, 3, padding=1)
    imgs = torch.rand(5, 3, 12, 12)
    crit(imgs, imgs.flip(0))
    out = net(imgs)
    loss = torch.utils.checkpoint.checkpoint(crit, out, imgs.flip(0), use_reentrant=use_reentrant)
    with pytest.raises(RuntimeError, match="run again inside a backward pass"):
        loss.backward()
    filled_rows = len(crit.queue)
    out = torch.utils.checkpoint.checkpoint(net, imgs.requires_grad_(use_reentrant), use_reentrant=use_reentrant)
    crit(out, imgs.flip(0)).backward()
    assert net.weight.grad is not None and len(crit.queue) == min(8, filled_rows + 5)


def test_functional_loss_under_checkpoint_before_the_enqueue():
    """The functional path under checkpointing is exact when the enqueue follows the backward
    (MoCo order): the recomputation sees the same queue."""
    q = filled(dtype=torch.float64)
    x0, y = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    grads = []
    for wrap in (True, False):
        x = x0.clone().requires_grad_(True)
        fn = lambda a: d2sm_divergence(a * 2.0, y, queue=q)  # noqa: E731
        loss = torch.utils.checkpoint.checkpoint(fn, x, use_reentrant=False) if wrap else fn(x)
        loss.backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=0)


def test_torch_compile_captures_the_queue_step_once():
    """A compiled training step with a statistics queue compiles once (one recompile when the
    queue is first seen full), not once per step: no guard on per-step host state."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    q = FeatureQueue(40, 8, statistics=True)
    q.enqueue(torch.randn(40, 8), torch.randn(40, 8))
    net = torch.nn.Linear(4, 8)
    step = torch.compile(lambda inp, yf: d2sm_divergence(net(inp), yf, queue=q), backend="aot_eager")
    graphs = []
    for _ in range(6):
        step(torch.randn(5, 4), torch.randn(5, 8)).backward()
        q.enqueue_last_batch()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[-1] == graphs[1] and exact_error(q) < 1e-6
