"""Queue statistics kept across steps (docs/DESIGN.md §3.6): d2sm_divergence(x, y, queue=queue)
equals the full pass over queue.memory(), values and gradients, for every divergence,
exclude_self and reduction, on every backend of the matrix that runs here; the kept sums stay
exact over a long random stream (wrap-around, oversize and non-finite batches, a reset, a
state_dict round trip); enqueue writes only the slots that change and never syncs."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import d2sm_ext
from backend_cases import assert_f32_close
from backend_matrix import rows_params
from d2sm_ext import FeatureQueue
from d2sm_ext.queue import statistics as queue_statistics
from d2sm_ext.queue import step as queue_step
from d2sm_ext.reference import DIVERGENCES, REDUCTIONS

FUSED = [pytest.param(p.values[0], id=p.id) for p in rows_params(fused=True, variants=False)]
FUSED_F64 = [pytest.param(p.values[0], id=p.id) for p in rows_params(fused=True, variants=False, dtype=torch.float64)]


def filled_queue(size, dim, n_rows, dtype=torch.float64, device="cpu", seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    q = FeatureQueue(size, dim, dtype=dtype, device=device, statistics=True, **kw)
    for start in range(0, n_rows, 5):  # several enqueues: the sums are built incrementally
        n = min(5, n_rows - start)
        x = torch.randn(n, dim, generator=g, dtype=dtype)
        q.enqueue(x.to(device), (x + 0.7 * torch.randn(n, dim, generator=g, dtype=dtype)).to(device))
    return q


def both_paths(x0, y0, queue, div, excl, red, backend, upstream):
    """(value, grad x, grad y) from the kept statistics and from the full pass over memory()."""
    out = []
    for use_queue in (True, False):
        x, y = x0.clone().requires_grad_(True), y0.clone().requires_grad_(True)
        if use_queue:
            v = d2sm_ext.d2sm_divergence(x, y, div, excl, red, backend=backend, queue=queue)
        else:
            xm, ym = queue.memory()
            v = d2sm_ext.d2sm_divergence(x, y, div, excl, red, backend="reference", x_memory=xm, y_memory=ym)
        gx, gy = torch.autograd.grad(v, (x, y), upstream if red == "none" else torch.tensor(2.0, dtype=v.dtype))
        out.append((v.detach(), gx, gy))
    return out


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize("row", FUSED_F64)
@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("excl", [True, False])
@pytest.mark.parametrize("red", REDUCTIONS)
def test_equals_the_full_pass_float64(row, div, excl, red):
    q = filled_queue(23, 6, 30, device=row.device)  # wrapped once
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(7, 6, generator=g, dtype=torch.float64).to(row.device)
    y0 = (x0 + torch.randn(7, 6, generator=g, dtype=torch.float64).to(row.device))
    upstream = torch.randn(7 + 23, generator=g, dtype=torch.float64).to(row.device)
    (v, gx, gy), (wv, wgx, wgy) = both_paths(x0, y0, q, div, excl, red, row.backend, upstream)
    assert rel_err(v, wv) < 1e-9 and rel_err(gx, wgx) < 1e-9 and rel_err(gy, wgy) < 1e-9


@pytest.mark.parametrize("row", FUSED)
@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("red", ["mean", "none"])
def test_equals_the_full_pass_float32(row, div, red):
    q = filled_queue(40, 16, 55, dtype=torch.float32, device=row.device)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(9, 16, generator=g).to(row.device)
    y0 = x0 + 0.7 * torch.randn(9, 16, generator=g).to(row.device)
    upstream = torch.randn(49, generator=g).to(row.device)
    (v, gx, gy), (wv, wgx, wgy) = both_paths(x0, y0, q, div, True, red, row.backend, upstream)
    for name, got, want in (("value", v, wv), ("grad x", gx, wgx), ("grad y", gy, wgy)):
        assert_f32_close(got, want.double().cpu(), name)


def test_the_statistics_path_is_taken_and_js_takes_the_full_pass(monkeypatch):
    calls = []  # the kernels of every step over the queue's kept statistics
    real = queue_step._totals
    monkeypatch.setattr(queue_step, "_totals", lambda *a: (calls.append(a[-2]), real(*a))[1])
    q = filled_queue(10, 4, 10)
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    for div in DIVERGENCES:
        d2sm_ext.d2sm_divergence(x, y, div, queue=q)
    d2sm_ext.d2sm_divergence(x, y, "kl", queue=q, backend="reference")  # the reference's own queue kernels
    registry = d2sm_ext.registry
    kernels = [registry.resolve_backend(name, "cpu", torch.float64, need_queue=True).queue
               for name in ("auto", "reference")]
    assert calls == [kernels[0]] * 3 + [kernels[1]]  # kl, reverse_kl, symmetric_kl; not js
    # D2SMLoss with a queue takes it by default
    crit = d2sm_ext.D2SMLoss(extractor=torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1)),
                             sampling="batch", queue_size=8)
    assert crit.queue.statistics_enabled and crit.queue.eps == crit.eps
    imgs = torch.rand(3, 3, 12, 12)
    crit(imgs, imgs.flip(0))
    crit(imgs, imgs.flip(0))
    assert calls[4:] == [kernels[0]] * 2


def test_a_backend_without_queue_kernels(monkeypatch):
    """A backend joins the queue path by registering QueueKernels: "auto" passes over one without
    them, and naming it raises, naming the backends that have them."""
    registry = d2sm_ext.registry
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    ref = registry._REGISTRY["reference"]
    registry.register_backend("plain", ref.fn, ref.supports, priority=99, description="no queue kernels")
    q = filled_queue(10, 4, 10)
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    assert registry.resolve_backend("auto", "cpu", torch.float64).name == "plain"
    assert registry.resolve_backend("auto", "cpu", torch.float64, need_queue=True).name != "plain"
    torch.testing.assert_close(d2sm_ext.d2sm_divergence(x, y, queue=q),
                               d2sm_ext.d2sm_divergence(x, y, queue=q, backend="reference"), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=r"backend 'plain' cannot run .*no kernels for the kept-statistics queue"):
        d2sm_ext.d2sm_divergence(x, y, queue=q, backend="plain")
    d2sm_ext.d2sm_divergence(x, y, "js", queue=q, backend="plain")  # js: the full pass, any backend


def test_errors():
    q = filled_queue(10, 4, 10)
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"keeps statistics for eps=1e-08, but eps=0.001 was given"):
        d2sm_ext.d2sm_divergence(x, y, eps=1e-3, queue=q)
    d2sm_ext.d2sm_divergence(x, y, "js", eps=1e-3, queue=q)  # js takes the full pass: any eps
    with pytest.raises(ValueError, match="either queue or x_memory"):
        d2sm_ext.d2sm_divergence(x, y, queue=q, x_memory=x, y_memory=y)
    with pytest.raises(ValueError, match=r"x must be \(N, d\)"):
        d2sm_ext.d2sm_divergence(x[None], y[None], queue=q)
    with pytest.raises(TypeError, match="FeatureQueue"):
        d2sm_ext.d2sm_divergence(x, y, queue=object())
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        FeatureQueue(4, 4, statistics=True, eps=0.0)
    with pytest.raises(RuntimeError, match="statistics=True"):
        FeatureQueue(4, 4).refresh_statistics()
    plain = FeatureQueue(10, 4, dtype=torch.float64)  # no statistics: the full pass, same values
    plain.enqueue(*q.memory())
    torch.testing.assert_close(d2sm_ext.d2sm_divergence(x, y, queue=plain), d2sm_ext.d2sm_divergence(x, y, queue=q),
                               rtol=1e-12, atol=0)


def _random_batch(g, n, dim, dtype, nonfinite: bool):
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    y = x + 0.5 * torch.randn(n, dim, generator=g, dtype=torch.float64)
    if nonfinite and n > 1:
        x[torch.randint(0, n, (1,), generator=g)] = float("nan")
        y[torch.randint(0, n, (1,), generator=g)] = float("inf")
    return x.to(dtype), y.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_long_stream_stays_exact(dtype):
    """2000 steps of a random stream into a 37-row queue: batch sizes 1…42 (most do not divide
    37, some exceed it), wrap-around, non-finite rows, a reset and a state_dict round trip
    midway. Every 4th step the loss and gradients (kl, reverse_kl, symmetric_kl, both
    exclude_self) equal the full recomputation — to 1e-9 relative in float64, within the fused
    backends' float32 tolerance in float32 — and at the end the kept sums equal an exact
    recomputation (the drift of 2000 steps of running sums)."""
    size, dim = 37, 5
    q = FeatureQueue(size, dim, dtype=dtype, statistics=True)
    g = torch.Generator().manual_seed(5)
    divergences = ["kl", "reverse_kl", "symmetric_kl"]
    compared = 0
    for step in range(2000):
        n = int(torch.randint(1, size + 6, (1,), generator=g))
        if step % 4 == 0 and len(q) >= 2:
            x0, y0 = _random_batch(g, 4, dim, dtype, nonfinite=False)
            div, excl = divergences[step % 3], step % 8 == 0
            (v, gx, gy), (wv, wgx, wgy) = both_paths(x0, y0, q, div, excl, "mean", "cpu", None)
            if dtype == torch.float64:
                assert rel_err(v, wv) < 1e-9 and rel_err(gx, wgx) < 1e-9 and rel_err(gy, wgy) < 1e-9, step
            else:
                for name, got, want in (("value", v, wv), ("grad x", gx, wgx), ("grad y", gy, wgy)):
                    assert_f32_close(got, want.double(), f"{name} at step {step}")
            compared += 1
        if step == 700:
            q.reset()
        if step == 1300:
            state = q.state_dict()
            q = FeatureQueue(size, dim, dtype=dtype, statistics=True)
            q.load_state_dict(state)
        q.enqueue(*_random_batch(g, n, dim, dtype, nonfinite=step % 7 == 0))
    assert compared >= 490
    kept = q.stats.row_sums.clone()
    q.refresh_statistics()
    assert rel_err(kept, q.stats.row_sums) < (1e-10 if dtype == torch.float64 else 1e-6)


def test_refresh_and_state(tmp_path):
    q = filled_queue(12, 4, 30)
    kept = q.stats.row_sums.clone()
    q.refresh_statistics()
    torch.testing.assert_close(kept, q.stats.row_sums, rtol=1e-12, atol=1e-12)
    state = q.state_dict()
    assert "stats.row_sums" in state and "stats.row_inv_norms" in state
    other = FeatureQueue(12, 4, dtype=torch.float64, statistics=True)
    other.load_state_dict(state)
    torch.testing.assert_close(other.stats.row_sums, q.stats.row_sums)
    q.reset()
    assert (q.stats.row_sums == 0).all() and len(q) == 0
    assert "statistics=True" in repr(other)


class _Allocations(TorchDispatchMode):
    """Records the size of every tensor an op returns that is not one of its inputs."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(a) for a in args if isinstance(a, torch.Tensor)}
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and id(t) not in inputs:
                self.sizes.append(t.numel())
        return out


@pytest.mark.parametrize("statistics", [False, True])
def test_enqueue_writes_only_the_slots_that_change(statistics):
    """No op of an enqueue creates a tensor as large as the buffers: O(N·d) traffic for the rows
    (the statistics add O(N·q) pair values, never size×dim)."""
    size, dim = 500, 64
    q = FeatureQueue(size, dim, statistics=statistics)
    q.enqueue(torch.randn(size, dim), torch.randn(size, dim))
    before = q.x_buffer.clone()
    with _Allocations() as record:
        q.enqueue(torch.randn(8, dim), torch.randn(8, dim))
    assert max(record.sizes) < size * dim, max(record.sizes)
    changed = (q.x_buffer != before).any(dim=1)
    assert int(changed.sum()) == 8


@pytest.mark.parametrize("statistics", [False, True])
def test_enqueue_does_not_sync(statistics, monkeypatch):
    q = FeatureQueue(size=5, dim=3, statistics=statistics)
    calls = []
    for name in ("item", "__int__", "__bool__", "tolist", "__float__"):
        orig = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _o=orig, _n=name, **k: (calls.append(_n), _o(self, *a, **k))[1])
    q.enqueue(torch.randn(8, 3), torch.randn(8, 3))
    q.enqueue(torch.randn(2, 3), torch.randn(2, 3))
    monkeypatch.undo()
    assert calls == []


def _queue_kernels(name):
    """A backend's QueueKernels for CPU tensors (Triton: under its interpreter)."""
    if name == "triton":
        triton_backend = pytest.importorskip("d2sm_ext.backends.triton_backend", reason="Triton is not importable")
        if not triton_backend.interpreter_active():
            pytest.skip("Triton's kernel on CPU tensors needs TRITON_INTERPRET=1 (set without a GPU)")
    return d2sm_ext.registry.resolve_backend(name, "cpu", torch.float32, need_queue=True).queue


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
@pytest.mark.parametrize("panel_mb", [None, "0.01"])
@pytest.mark.parametrize("split", [70, 25, 0])
def test_cross_sums_match_float64(backend, panel_mb, split, monkeypatch):
    """Each backend's cross sums (the C++ kernel, Triton's in its interpreter, the chunked PyTorch
    form) against float64, with signed row weights, column weights, a zero row, two row groups,
    several tiles, and (0.01 MiB) chunks of a few columns."""
    kernels = _queue_kernels(backend)
    if panel_mb:
        monkeypatch.setenv("D2SM_PANEL_MB", panel_mb)
    g = torch.Generator().manual_seed(3)
    xr, yr, xc, yc = (torch.randn(n, 33, generator=g) for n in (70, 70, 300, 300))
    xr[3] = 0
    xc[5] = 0
    wr, wc = torch.rand(70, generator=g) - 0.3, torch.rand(300, generator=g)
    norms = [queue_statistics.inverse_norms(t) for t in (xr, yr, xc, yc)]
    d = [t.double() for t in (xr, yr, norms[0], norms[1], xc, yc, norms[2], norms[3])]
    terms = queue_statistics.pair_terms(d[0] @ d[4].T, d[1] @ d[5].T, d[2], d[3], d[6], d[7], 1e-8)
    by_row = terms * wr.double()[:, None]
    want_rows = (terms * wc.double()).sum(2)
    want_cols = torch.stack([by_row[:, :split].sum(1), by_row[:, split:].sum(1)])
    rows, cols, gram_x, gram_y = kernels.cross_sums(xr, yr, *norms[:2], xc, yc, *norms[2:], 1e-8, wr, wc, split, False)
    assert rows.dtype == cols.dtype == torch.float64 and gram_x is None and gram_y is None
    assert rows.shape == (4, 70) and cols.shape == (2, 4, 300)
    assert rel_err(rows, want_rows) < 1e-6
    for group in range(2):
        assert (cols[group] == 0).all() if want_cols[group].abs().max() == 0 else \
            rel_err(cols[group], want_cols[group]) < 1e-6
    if kernels.keeps_gram:
        _, _, gram_x, gram_y = kernels.cross_sums(xr, yr, *norms[:2], xc, yc, *norms[2:], 1e-8, wr, wc, split, True)
        assert rel_err(gram_x, d[0] @ d[4].T) < 1e-6 and rel_err(gram_y, d[1] @ d[5].T) < 1e-6


def test_under_autocast_and_torch_compile():
    """The queue path inside a bf16 autocast region, eager and under torch.compile (the queue is
    a module argument: a graph break, not an error): float32 loss, the full pass's value, the same
    parameter gradient."""
    q = FeatureQueue(20, 8, statistics=True)
    q.enqueue(torch.randn(20, 8), torch.randn(20, 8))
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 8)
    xin, yf = torch.randn(6, 4), torch.randn(6, 8)

    def step(inp, **memory):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return d2sm_ext.d2sm_divergence(net(inp), yf, **memory)

    eager = step(xin, queue=q)
    eager.backward()
    g_eager = net.weight.grad.clone()
    net.zero_grad()
    xm, ym = q.memory()
    full = step(xin, x_memory=xm, y_memory=ym)
    compiled = torch.compile(step, backend="aot_eager")(xin, queue=q)
    compiled.backward()
    assert eager.dtype == compiled.dtype == torch.float32
    assert_f32_close(eager, full.double(), "value vs the full pass")
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(net.weight.grad, g_eager, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("row, dtype", [pytest.param(p.values[0], torch.float32, id=f"{p.id}-float32") for p in FUSED] +
                         [pytest.param(p.values[0], torch.float64, id=f"{p.id}-float64") for p in FUSED_F64])
def test_enqueue_last_batch_reuses_the_losss_sums_and_stays_exact(row, dtype):
    """The training-loop order (loss over the batch and the queue, then enqueue_last_batch) forms
    the entering rows' sums from the loss's: over 300 steps with non-finite rows, oversize batches
    and batches the caller changes in place after the loss, the kept sums equal those of a twin
    queue fed the loss-time rows with enqueue(), and an exact recomputation."""
    size, dim = 29, 6
    q = FeatureQueue(size, dim, dtype=dtype, statistics=True, device=row.device, backend=row.backend)
    twin = FeatureQueue(size, dim, dtype=dtype, statistics=True, device=row.device, backend=row.backend)
    g = torch.Generator().manual_seed(11)
    steps = 300 if row.backend != "triton" else 60  # the interpreter is slow
    for step in range(steps):
        n = int(torch.randint(1, 12, (1,), generator=g)) if step % 25 else size + 3
        x, y = (t.to(row.device) for t in _random_batch(g, n, dim, dtype, nonfinite=step % 9 == 0))
        if len(q) >= 2:
            xg = x.clone().requires_grad_(True)
            loss = d2sm_ext.d2sm_divergence(xg, y, queue=q, backend=row.backend)
            if torch.isfinite(x).all() and torch.isfinite(y).all():
                loss.backward()
            twin.enqueue(x, y)  # the rows as the loss saw them
            if step % 13 == 0:
                x.mul_(2.0)  # changed after the loss: enqueue_last_batch takes the loss's own copy
                y.data.add_(1.0)
            q.enqueue_last_batch()
        else:
            q.enqueue(x, y)
            twin.enqueue(x, y)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert rel_err(q.stats.row_sums, twin.stats.row_sums) < tol
    torch.testing.assert_close(q.x_buffer, twin.x_buffer, rtol=0, atol=0)
    kept = q.stats.row_sums.clone()
    q.refresh_statistics()
    assert rel_err(kept, q.stats.row_sums) < tol


CPU_ROW_DTYPES = [pytest.param(p.values[0], dtype, id=f"{p.id}-{str(dtype).split('.')[-1]}")
                  for p in rows_params(device="cpu", variants=False) for dtype in p.values[0].dtypes]


@pytest.mark.parametrize("row, dtype", CPU_ROW_DTYPES)
def test_the_training_loop_runs_from_an_empty_queue(row, dtype):
    """README's loop (loss over the batch and the queue, backward, enqueue_last_batch) from its
    first step, on a new queue and after reset(), with a first batch that fits and one larger than
    the queue (with a non-finite row): the loss over the empty queue equals the full pass over
    the batch alone and leaves the batch pending; enqueue_last_batch gives the rows and kept sums
    a twin queue gets from enqueue(x, y), and an exact recomputation; the next step continues."""
    size, dim = 7, 5
    rtol = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    sums_tol = 1e-12 if dtype == torch.float64 else 1e-6
    g = torch.Generator().manual_seed(3)
    q = FeatureQueue(size, dim, dtype=dtype, statistics=True, backend=row.backend)
    twin = FeatureQueue(size, dim, dtype=dtype, statistics=True, backend=row.backend)
    for first in (4, size + 3):
        if first > size:
            q.reset()
            twin.reset()
        for step, n in enumerate((first, 3)):
            x, y = _random_batch(g, n, dim, dtype, nonfinite=first > size and step == 0)
            xm, ym = q.memory()
            assert (xm.shape[0] == 0) == (step == 0)
            values, grads = [], []
            for memory in ({"queue": q}, {"x_memory": xm, "y_memory": ym}):
                xg = x.clone().requires_grad_(True)
                v = d2sm_ext.d2sm_divergence(xg, y, backend=row.backend, **memory)
                v.backward()
                values.append(v.detach())
                grads.append(xg.grad)
            if torch.isfinite(values[1]):
                assert rel_err(values[0], values[1]) <= rtol and rel_err(grads[0], grads[1]) <= rtol, (first, step)
            else:  # a non-finite row: NaN value and gradients, as the full pass
                assert torch.isnan(values[0]) and torch.isnan(grads[0]).all()
            assert q.stats.has_pending(), (first, step)
            q.enqueue_last_batch()
            twin.enqueue(x, y)
            assert len(q) == len(twin) and torch.equal(q.x_buffer, twin.x_buffer)
            assert rel_err(q.stats.row_sums, twin.stats.row_sums) <= sums_tol, (first, step)
            kept = q.stats.row_sums.clone()
            q.refresh_statistics()
            assert rel_err(kept, q.stats.row_sums) <= sums_tol, (first, step)


def test_d2smloss_enqueues_its_first_batch_from_the_losss_sums(monkeypatch):
    """D2SMLoss with a queue, from its first training step: every step's batch enters through
    enqueue_last_batch (the loss's own rows and sums), the first loss is the loss over the batch
    alone, and the kept sums stay exact."""
    from loss_cases import tiny_extractor

    crit = d2sm_ext.D2SMLoss(extractor=tiny_extractor(), sampling="batch", queue_size=8)
    alone = d2sm_ext.D2SMLoss(extractor=tiny_extractor(), sampling="batch")
    calls = []
    for name in ("enqueue", "enqueue_last_batch"):
        real = getattr(crit.queue, name)
        monkeypatch.setattr(crit.queue, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name),
                                                                                       _real(*a, **k))[1])
    g = torch.Generator().manual_seed(4)
    for step in range(3):
        imgs = torch.rand(3, 3, 12, 12, generator=g)
        loss = crit(imgs.clone().requires_grad_(True), imgs.flip(0))
        loss.backward()
        if step == 0:
            torch.testing.assert_close(loss.detach(), alone(imgs, imgs.flip(0)), rtol=1e-6, atol=0)
    assert calls == ["enqueue_last_batch"] * 3 and len(crit.queue) == 8
    kept = crit.queue.stats.row_sums.clone()
    crit.queue.refresh_statistics()
    assert rel_err(kept, crit.queue.stats.row_sums) < 1e-6


def test_enqueue_last_batch_cannot_be_fooled():
    """Every way a user can break the reuse: another batch enqueued in between, two losses before
    one enqueue, a loss over another queue, a slice or .data write of the batch, a loss whose rows
    were promoted past the queue's dtype, a reset/refresh/cast/load in between, a deepcopy. The
    result is always the exact queue or a clear error, never wrong sums."""
    import copy

    def exact(queue):
        kept = queue.stats.row_sums.clone()
        queue.refresh_statistics()
        return rel_err(kept, queue.stats.row_sums)

    q = filled_queue(9, 4, 9, dtype=torch.float32)
    other = filled_queue(9, 4, 9, dtype=torch.float32, seed=1)
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="no loss over this queue"):
        q.enqueue_last_batch()
    d2sm_ext.d2sm_divergence(x, y, queue=q)
    q.enqueue(torch.randn(2, 4), torch.randn(2, 4))  # another batch in between: the loss's sums are stale
    with pytest.raises(RuntimeError, match="use enqueue"):
        q.enqueue_last_batch()
    # two losses before one enqueue: the last one's rows enter
    d2sm_ext.d2sm_divergence(x, y, queue=q)
    x2, y2 = torch.randn(3, 4), torch.randn(3, 4)
    d2sm_ext.d2sm_divergence(x2, y2, queue=q)
    d2sm_ext.d2sm_divergence(x, y, queue=other)  # another queue's loss leaves nothing here
    q.enqueue_last_batch()
    assert (q.history()[0][-3:] == x2).all() and exact(q) < 1e-6
    # a slice, then .data and in-place writes after the loss: the loss-time copy enters
    big = torch.randn(6, 4)
    d2sm_ext.d2sm_divergence(big[1:4], y, queue=q)
    want = big[1:4].clone()
    big.data.zero_()
    q.enqueue_last_batch()
    assert (q.history()[0][-3:] == want).all() and exact(q) < 1e-6
    # rows wider than the queue's dtype: their enqueue would round them, so nothing is left
    d2sm_ext.d2sm_divergence(x.double(), y.double(), queue=q)
    with pytest.raises(RuntimeError, match="no loss over this queue"):
        q.enqueue_last_batch()
    # reset, refresh, cast and load in between discard what the loss left
    for change in (lambda: q.refresh_statistics(), lambda: q.to(torch.float32), lambda: q.load_state_dict(q.state_dict()),
                   lambda: q.reset()):
        d2sm_ext.d2sm_divergence(x, y, queue=q) if len(q) else None
        change()
        with pytest.raises(RuntimeError, match="no loss over this queue"):
            q.enqueue_last_batch()
    # a deepcopy does not carry the original's pending rows
    q = filled_queue(9, 4, 9, dtype=torch.float32)
    d2sm_ext.d2sm_divergence(x, y, queue=q)
    twin = copy.deepcopy(q)
    with pytest.raises(RuntimeError, match="no loss over this queue"):
        twin.enqueue_last_batch()
    q.enqueue_last_batch()
    assert exact(q) < 1e-6


def test_a_step_reads_the_queue_three_times():
    """At the floor (docs/DESIGN.md §3.6): with the cpu backend, a training step (loss, backward,
    enqueue_last_batch) calls one cross_sums over the queue (live and evicted rows together, one
    product per side), one queue_backward (the gradient product), and nothing else that takes the
    queue's rows; the enqueue only takes the batch against the evicted rows."""
    size, dim = 64, 8
    q = FeatureQueue(size, dim, statistics=True)
    q.enqueue(torch.randn(size, dim), torch.randn(size, dim))
    x, y = torch.randn(5, dim, requires_grad=True), torch.randn(5, dim)
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            rows = [a.shape[0] for a in args if isinstance(a, torch.Tensor) and a.ndim == 2]
            if func.namespace == "d2sm_ext" or (size in rows and func.__name__.startswith(("mm", "bmm", "addmm"))):
                seen.append((func.__name__.split(".")[0], max(rows)))
            return func(*args, **(kwargs or {}))

    with Record():
        d2sm_ext.d2sm_divergence(x, y, queue=q).backward()
        q.enqueue_last_batch()
    assert seen == [("cross_sums", size), ("queue_backward", size), ("cross_sums", 5)], seen


@pytest.mark.parametrize("div", ["kl", "reverse_kl", "symmetric_kl"])
@pytest.mark.parametrize("excl", [True, False])
def test_edge_rows(div, excl):
    """Zero rows (in the queue and live), an antipodal pair inside the queue and one between a
    live and a queue row, float64: equal to the full pass within the matrix's edge-row tolerance
    (the antipodal log-kernel is conditioned like 1e-16/eps)."""
    g = torch.Generator().manual_seed(0)
    xm, ym = (torch.randn(12, 5, generator=g, dtype=torch.float64) for _ in range(2))
    xm[3], ym[7], xm[5] = 0.0, 0.0, -xm[4]
    q = FeatureQueue(12, 5, dtype=torch.float64, statistics=True)
    q.enqueue(xm[:7], ym[:7])
    q.enqueue(xm[7:], ym[7:])
    x, y = (torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(2))
    x[1], y[2] = 0.0, -ym[0]
    for red in ("mean", "none"):
        up = torch.randn(16, generator=g, dtype=torch.float64)
        (v, gx, gy), (wv, wgx, wgy) = both_paths(x, y, q, div, excl, red, "cpu", up)
        torch.testing.assert_close(v, wv, rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(gx, wgx, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(gy, wgy, rtol=1e-6, atol=1e-9)
        assert (gx[1] == 0).all()  # a zero row: zero gradient


def test_opcheck_of_the_cpp_queue_ops():
    """The C++ queue ops' schemas, fake implementations (torch.compile traces them without a graph
    break) and dispatch registrations, by torch.library.opcheck."""
    g = torch.Generator().manual_seed(4)
    xr, yr, xc, yc = (torch.randn(n, 6, generator=g) for n in (5, 5, 9, 9))
    norms = [queue_statistics.inverse_norms(t) for t in (xr, yr, xc, yc)]
    for keep in (False, True):
        torch.library.opcheck(torch.ops.d2sm_ext.cross_sums.default,
                              (xr, yr, *norms[:2], xc, yc, *norms[2:], 1e-8, torch.rand(5, generator=g), None, 3, keep))
    q = filled_queue(9, 6, 9, dtype=torch.float32)
    xm, ym = q.memory()
    x, y = xr.clone(), yr.clone()
    _, _, gram_x, gram_y = d2sm_ext.registry.resolve_backend("cpu", "cpu", torch.float32, need_queue=True).queue \
        .cross_sums(x, y, *norms[:2], xm, ym, *q.stats.inverse_norms(9), 1e-8, None, None, 5, True)
    saved = torch.rand(6, 1, 14, generator=g) + 0.5
    weights = torch.full((1, 14), 1 / 14)
    for grams in ((gram_x, gram_y), (torch.empty(0), torch.empty(0))):
        torch.library.opcheck(torch.ops.d2sm_ext.queue_backward.default,
                              (x, y, xm, ym, saved, weights, "kl", True, 1e-8, False, True, True, *grams))


def test_triton_hands_the_gram_over():
    """The triton row of the queue path at the floor: the cross sums kernel keeps the Gram
    (KEEP_GRAM) and the gradient's pair kernel reads it for the memory tiles (TILES=2, no dot
    loop) instead of multiplying the live rows against the queue again; the result equals the
    full pass (the stream tests cover exactness at length)."""
    kernels = _queue_kernels("triton")
    from d2sm_ext.backends import triton_backend, triton_kernels

    launches = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kw):
                launches.append((self.kernel.fn.__name__, kw.get("TILES", kw.get("KEEP_GRAM"))))
                return self.kernel[grid](*args, **kw)
            return launch

    q = filled_queue(40, 16, 40, dtype=torch.float32, backend="triton")
    g = torch.Generator().manual_seed(6)
    x0, y0 = torch.randn(9, 16, generator=g), torch.randn(9, 16, generator=g)
    real = {name: getattr(triton_kernels, name) for name in ("pair_panel_kernel", "cross_sums_kernel")}
    try:
        for name, kernel in real.items():
            setattr(triton_kernels, name, Spy(kernel))
        (v, gx, gy), (wv, wgx, wgy) = both_paths(x0, y0, q, "symmetric_kl", True, "mean", "triton", None)
    finally:
        for name, kernel in real.items():
            setattr(triton_kernels, name, kernel)
    step = launches[:launches.index(("pair_panel_kernel", 1)) + 2]
    assert ("cross_sums_kernel", True) in step and step[-2:] == [("pair_panel_kernel", 1), ("pair_panel_kernel", 2)]
    assert kernels.keeps_gram and triton_backend.queue_backward is kernels.backward
    for name, got, want in (("value", v, wv), ("grad x", gx, wgx), ("grad y", gy, wgy)):
        assert_f32_close(got, want.double(), name)
