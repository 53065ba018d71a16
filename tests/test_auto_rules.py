"""The measured rule behind backend="auto" on a GPU (d2sm_ext/auto_rules.py): a fused backend is
taken only where it was measured faster than the dense paths, or where they would not fit in
memory. Checked on CPU with synthetic problems (and a fake device memory)."""
import dataclasses

import pytest
import torch

import d2sm_ext
from d2sm_ext import auto_rules
from d2sm_ext.registry import resolve_backend

GPU = torch.device("cuda", 0)


def problem(dtype=torch.float32, tf32=False, rows=4096, batch=1, dim=4096):
    return auto_rules.Problem(GPU, dtype, tf32, batch, rows, dim)


@pytest.fixture
def free_memory(monkeypatch):
    def set_free(gib):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(gib * 2 ** 30), 80 * 2 ** 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    set_free(70)
    return set_free


@pytest.mark.parametrize("backend,dtype,tf32,rows,fused", [
    ("cuda", torch.bfloat16, False, 4096, True),      # H200: 4.50 ms, triton 8.30, plain eager 13.58
    ("cuda", torch.float32, True, 4096, True),        # H200: 4.23 ms, reference 6.66
    ("cuda", torch.float32, False, 4096, True),       # H200: 11.49 ms, reference 15.66
    ("cuda", torch.float16, False, 2048, False),      # not measured below 4096: the dense path
    ("cuda", torch.float32, True, 1024, False),
    ("triton", torch.bfloat16, False, 4096, True),    # H100: 3.70x the reference
    ("triton", torch.float16, False, 8192, True),
    ("triton", torch.bfloat16, False, 256, False),    # H100: 0.43x (M=256 d=100352)
    ("triton", torch.float32, True, 16384, True),     # H100: 1.62x (M=16384 d=1280)
    ("triton", torch.float32, True, 4096, False),     # H200: 14.06 ms against 6.66 for the reference
    ("triton", torch.float32, False, 16384, False),   # IEEE fp32: slower wherever measured
    ("cuda", torch.float64, False, 8192, False),      # float64: not measured
])
def test_rule_follows_the_measurements(backend, dtype, tf32, rows, fused, free_memory):
    reason = auto_rules.fused_reason(backend, problem(dtype, tf32, rows))
    assert (reason is None) == fused, reason
    if not fused:
        assert "not measured faster than the paths below it" in reason and f"'{backend}'" in reason


def test_fused_backend_where_the_dense_path_would_not_fit(free_memory):
    # the dense path needs ~9 M×M float32 matrices: 9 GiB at M = 16384, 144 GiB at M = 65536
    assert auto_rules.dense_peak_bytes(problem(rows=16384)) == 9 * 2 ** 30
    free_memory(70)
    assert auto_rules.fused_reason("triton", problem(rows=65536)) is None           # IEEE fp32, but OOM for dense
    assert auto_rules.fused_reason("triton", problem(rows=16384)) is not None       # fits: dense is faster
    free_memory(8)
    assert auto_rules.fused_reason("triton", problem(rows=16384)) is None           # does not fit in 8 GiB
    assert auto_rules.fused_reason("triton", problem(rows=4096, batch=64)) is None  # 64 problems of 4096 rows: 36 GiB
    # float64 needs twice the bytes: 4.5 GiB at M = 8192 fits in 8 GiB, 9 GiB at M = 11585 does not
    assert auto_rules.dense_peak_bytes(problem(torch.float64, rows=8192)) == 2 * auto_rules.dense_peak_bytes(problem(rows=8192))
    assert auto_rules.fused_reason("cuda", problem(torch.float64, rows=8192)) is not None
    assert auto_rules.fused_reason("cuda", problem(torch.float64, rows=11585)) is None


def test_auto_applies_the_rule(free_memory, monkeypatch):
    """cuda first (measured faster than triton in every precision), triton where cuda cannot run,
    the dense path below the measured shapes, the reference for eps = 0."""
    from d2sm_ext import registry

    usable = {name: registry._REGISTRY[name] for name in ("cuda", "triton") if name in registry._REGISTRY}
    if not usable:
        pytest.skip("neither the cuda nor the triton backend is registered here")
    for name, backend in usable.items():  # "auto" as on a GPU machine: every registered GPU backend usable
        monkeypatch.setitem(registry._REGISTRY, name, dataclasses.replace(backend, usable=lambda: None))
    first = "cuda" if "cuda" in usable else "triton"
    assert resolve_backend("auto", "cuda", torch.bfloat16, 1e-8, problem(torch.bfloat16)).name == first
    assert resolve_backend("auto", "cuda", torch.float32, 1e-8, problem(torch.float32, rows=1024)).name == "dense"
    assert resolve_backend("auto", "cuda", torch.float32, 0.0, problem(torch.float32, rows=1024)).name == "reference"
    if "cuda" in usable:
        assert resolve_backend("auto", "cuda", torch.float32, 1e-8, problem(torch.float32)).name == "cuda"
        monkeypatch.setitem(registry._REGISTRY, "cuda", dataclasses.replace(usable["cuda"], usable=lambda: "not built"))
    if "triton" in usable:  # cuda unusable: triton by its own rule
        assert resolve_backend("auto", "cuda", torch.float32, 1e-8, problem(torch.float32)).name == "dense"
        assert resolve_backend("auto", "cuda", torch.float32, 1e-8, problem(torch.float32, True, 16384)).name == "triton"
        # explicit names are never overridden by the rule
        assert resolve_backend("triton", "cuda", torch.float32, 1e-8, problem(torch.float32)).name == "triton"


def test_the_rule_is_not_applied_to_the_kept_statistics_path(monkeypatch):
    """The rule compares full passes; with a statistics queue (O(N·q·d)) "auto" is not ruled by
    it (the problem is not passed), while js over the same queue (a full pass) is."""
    from d2sm_ext import FeatureQueue, functional
    from d2sm_ext.queue import step

    seen = []
    real = functional.resolve_backend
    for module in (functional, step):  # the full pass, the step over the queue
        monkeypatch.setattr(module, "resolve_backend", lambda *a, **k: (seen.append(a[4]), real(*a, **k))[1])
    q = FeatureQueue(16, 4, statistics=True)
    q.enqueue(torch.randn(16, 4), torch.randn(16, 4))
    x, y = torch.randn(5, 4), torch.randn(5, 4)
    d2sm_ext.d2sm_divergence(x, y, "kl", queue=q)
    d2sm_ext.d2sm_divergence(x, y, "js", queue=q)
    assert seen[0] is None and isinstance(seen[1], auto_rules.Problem) and seen[1].rows == 21


def test_free_memory_counts_pytorch_cache_and_does_not_break_compile(monkeypatch):
    """Memory PyTorch's allocator keeps reserved but unused is free for the dense path, though
    mem_get_info counts it as used; the query is a constant under torch.compile (fullgraph)."""
    gib = 2 ** 30
    # torch._dynamo.disable: like the real CUDA query, something Dynamo cannot trace into
    monkeypatch.setattr(torch.cuda, "mem_get_info", torch._dynamo.disable(lambda device=None: (2 * gib, 80 * gib)))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 10 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 * gib)
    assert auto_rules.free_device_bytes(0) == 11 * gib
    # M = 12288: the dense path needs 5.1 GiB, fits in 0.8 × 11 GiB (not in 0.8 × 2 GiB): Triton's
    # IEEE fp32 is measured slower, so "auto" keeps the dense path
    assert auto_rules.fused_reason("triton", problem(rows=12288)) is not None

    @torch.compile(fullgraph=True, backend="eager")
    def step(x):
        return x + (1.0 if auto_rules.fused_reason("triton", problem(rows=12288)) is None else 2.0)

    assert step(torch.zeros(1)).item() == 2.0
