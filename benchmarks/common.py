"""Shared benchmark machinery: configurations, the FLOP model, timing and peak memory.

Both the pytest-benchmark suite and ``python -m benchmarks.compare`` use these, and they call
the same reference the tests use (``d2sm_ext.reference.d2sm_reference``), so benchmark and test
compare against the same code.

FLOP model (docs/DESIGN.md §3.5 cost model, counted the same for every backend — "useful" FLOPs):
forward 4·M²·d (the Gram matrices of x and y over all M = N + Q rows); forward+backward adds
2·N·M·d for the gradient of the N live rows of x (y needs no gradient in these benchmarks:
clean features are computed without grad). A backend that does more (the reference's autograd
forms the full M×M×d products; the fused kernel does not reuse the symmetric half) shows it as a
lower achieved rate.
"""
from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from typing import Callable, Optional

import torch

import d2sm_ext
from d2sm_ext.reference import d2sm_reference


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    m: int              # live rows per problem
    d: int
    b: int = 1          # problems in the batch
    q: int = 0          # memory rows
    dtype: torch.dtype = torch.float32
    tf32: bool = False  # float32 matmul precision for every backend in this row
    note: str = ""
    compiled_baseline: bool = True  # also time torch.compile(reference) (compiling costs ~30 s)

    @property
    def m_total(self) -> int:
        return self.m + self.q

    def flops(self, backward: bool) -> float:
        f = 4.0 * self.b * self.m_total ** 2 * self.d
        if backward:
            f += 2.0 * self.b * self.m * self.m_total * self.d
        return f

    def label(self) -> str:
        shape = f"B={self.b} " if self.b > 1 else ""
        mem = f"N={self.m}+Q={self.q}" if self.q else f"M={self.m}"
        prec = {torch.float32: "tf32" if self.tf32 else "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        return f"{self.name}: {shape}{mem} d={self.d} {prec}"


def make_inputs(cfg: Config, device: str, requires_grad: bool = True, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    lead = (cfg.b,) if cfg.b > 1 else ()

    def rnd(rows):
        return torch.randn(*lead, rows, cfg.d, generator=g, device=device, dtype=cfg.dtype)

    x = rnd(cfg.m).requires_grad_(requires_grad)
    y = rnd(cfg.m)
    xm = ym = None
    if cfg.q:
        xm, ym = rnd(cfg.q), rnd(cfg.q)
    return x, y, xm, ym


def plain_formula(x, y, xm=None, ym=None, eps: float = 1e-8):
    """The dense formula as a user writes it (kl, neighbours j ≠ i, mean): F.normalize, matmul,
    masked log-ratio, mean — the "plain PyTorch" baseline, eager and under torch.compile. Unlike
    the package's paths it has no zero-row, huge-row, eps = 0 or non-finite handling."""
    if xm is not None:
        x, y = torch.cat([x, xm.detach()], dim=-2), torch.cat([y, ym.detach()], dim=-2)
    xn, yn = torch.nn.functional.normalize(x, dim=-1), torch.nn.functional.normalize(y, dim=-1)
    off = ~torch.eye(x.shape[-2], dtype=torch.bool, device=x.device)
    kx = ((1 + xn @ xn.mT) / 2 + eps) * off
    ky = ((1 + yn @ yn.mT) / 2 + eps) * off
    p, q = kx / kx.sum(-1, keepdim=True), ky / ky.sum(-1, keepdim=True)
    log_ratio = torch.where(off, torch.log(p) - torch.log(q), 0.0)
    return (p * log_ratio).sum(-1).mean()


def runner(backend: str) -> Callable:
    """A callable (x, y, xm, ym) -> scalar loss for a backend name or a baseline: "reference",
    "reference+compile", "plain" and "plain+compile" (``plain_formula``), or any backend name.

    "reference+compile" compiles afresh for each call of runner() after resetting Dynamo: one
    shared compiled function would hit Dynamo's recompile limit after a few shapes and silently
    fall back to eager (seen: a "compiled" row as slow as eager)."""
    if backend == "reference":
        return lambda x, y, xm, ym: d2sm_reference(x, y, x_memory=xm, y_memory=ym)
    if backend == "reference+compile":
        torch._dynamo.reset()
        compiled = torch.compile(d2sm_reference, dynamic=False)
        return lambda x, y, xm, ym: compiled(x, y, x_memory=xm, y_memory=ym)
    if backend == "plain":
        return plain_formula
    if backend == "plain+compile":
        torch._dynamo.reset()
        return torch.compile(plain_formula, dynamic=False)
    return lambda x, y, xm, ym: d2sm_ext.d2sm_divergence(x, y, backend=backend, x_memory=xm, y_memory=ym)


def usable_backend(name: str, device: str, dtype: torch.dtype, need_queue: bool = False) -> bool:
    """Whether backend ``name`` runs ``dtype`` tensors on ``device`` here (with queue kernels when
    ``need_queue``); Triton's CPU interpreter is for tests only, never benchmarked."""
    try:
        d2sm_ext.registry.resolve_backend(name, device, dtype, need_queue=need_queue)
    except ValueError:
        return False
    return not (name == "triton" and device == "cpu")


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_fn(fn: Callable, inputs, backward: bool) -> Callable[[], None]:
    x, y, xm, ym = inputs

    def step():
        if backward:
            x.grad = None
            fn(x, y, xm, ym).backward()
        else:
            with torch.no_grad():
                fn(x, y, xm, ym)
    return step


def time_ms(step: Callable[[], None], device: str, reps: int, warmup: int = 1,
            budget_s: float = 60.0) -> Optional[list[float]]:
    """Per-call times in ms (synchronised around each call); None when the warm-up alone
    exceeds the time budget (reported as a timeout)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize(device)
    first = time.perf_counter() - t0
    if first > budget_s:
        return None
    reps = max(1, min(reps, int(budget_s / max(first / max(warmup, 1), 1e-6))))
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            step()
            times.append((time.perf_counter() - t) * 1e3)
    return times


def summarize(times: list[float]) -> dict:
    s = sorted(times)
    q = statistics.quantiles(s, n=5) if len(s) >= 2 else [s[0]] * 4
    return dict(median=statistics.median(s), p20=q[0], p80=q[3], reps=len(s))


def peak_memory_bytes(step: Callable[[], None], device: str) -> int:
    """Peak memory allocated during one call, above what was allocated before it."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # CPU: the profiler records every allocation with the CPU allocator's running total, including
    # those made inside C++ ops (an op's own "self memory" figure nets its frees out and misses
    # them), so the peak is the highest total seen minus the total before the first allocation.
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    allocations = sorted((n for n in walk(prof.profiler.kineto_results.experimental_event_tree())
                          if n.tag == _EventType.Allocation), key=lambda n: n.start_time_ns)
    if not allocations:
        return 0
    first = allocations[0].extra_fields
    base = first.total_allocated - first.alloc_size
    return max(n.extra_fields.total_allocated for n in allocations) - base


def gemm_tflops(device: str, dtype: torch.dtype, tf32: bool, n: int) -> float:
    """Dense GEMM rate (n×n×n) measured now, in the same dtype and float32 precision."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    with float32_precision(tf32):
        times = time_ms(lambda: a @ b, device, reps=10 if device == "cuda" else 3, warmup=2)
    return 2.0 * n ** 3 / (statistics.median(times) * 1e-3) / 1e12


class float32_precision:
    """Context: PyTorch's float32 matmul precision ("high" allows TF32) for every backend."""

    def __init__(self, tf32: bool):
        self.value = "high" if tf32 else "highest"

    def __enter__(self):
        self.old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(self.value)

    def __exit__(self, *exc):
        torch.set_float32_matmul_precision(self.old)
