"""When "auto" may take a fused backend on a GPU: a rule written from measurements, per backend and
precision, so that "auto" takes the fastest backend measured for a shape and precision.

The measurements (BENCHMARKS.md, "GPU: NVIDIA H200, 2026-12-04", the card-toolchain issue's run:
torch 2.11, Triton 3.6; fwd+bwd medians of CUDA events in one run, M = 4096, d = 4096, ms):

| precision | plain formula, eager | its torch.compile | reference | triton | cuda |
|---|---|---|---|---|---|
| fp32 (IEEE) | 13.54 | 11.56 | 15.66 | did not compile (Triton 3.6, BK 8) | 11.49 |
| tf32 | 4.12 | 2.24 | 6.66 | 14.06 | 4.23 |
| bf16 | 13.58 | 11.53 | - | 8.30 | 4.50 |

and, older (NVIDIA H100, run 2, the Triton panel kernel against the reference): bf16 3.70× faster
at M = 4096, 0.43× at M = 256 (d = 100352); tf32 1.62× faster at M = 16384 (d = 1280); IEEE fp32
slower at every measured shape. Queue step (q = 2^20, d = 1280, N = 256, bf16, H200): cuda 22.0 ms,
triton 44.7 ms — "auto" takes cuda there by priority (the rule is not applied to the
kept-statistics queue path, which does O(N·q·d) work instead of O((N+q)²·d)).

So: cuda from M = 4096 in fp32, TF32 and half precision — the fastest of what "auto" could take
in all three (the reference then; Triton was slower, or did not compile in IEEE fp32), with O(M)
memory where the dense paths hold M×M matrices. In TF32 the plain formula was level (4.12 against
4.23 ms eager) and its torch.compile 1.9× faster; the new dense path was not on that card, so the
TF32 threshold is the measured choice until a card run measures dense (issue 27). triton where
cuda cannot run, from its own measured thresholds; float64 was not measured for a fused backend;
below the measured shapes, the dense PyTorch path ("dense", backends/dense_backend.py: the
fallback, written to be no slower than the plain formula). Beyond the device's free memory for the
dense path's M×M matrices only a fused backend runs (M = 65536: the reference cannot allocate,
Triton runs in 1.3 GiB). A new GPU run (benchmarks/gpu_check.sh) that moves a threshold updates the constants here
and BENCHMARKS.md together.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import torch

# Smallest sample-set size M from which a fused backend was measured faster than the dense paths,
# per backend and GPU precision (None: slower wherever measured).
FUSED_MIN_ROWS = {
    "cuda": {"half": 4096, "tf32": 4096, "ieee": 4096, "fp64": None},     # H200, 2026-12-04
    "triton": {"half": 4096, "tf32": 16384, "ieee": None, "fp64": None},  # H100 run 2 (H200: slower than cuda)
}
# The dense fallback's fwd+bwd peak, in M×M matrices of the compute dtype per problem (measured on
# CPU with benchmarks.common.peak_memory_bytes: 7.1 at M = 1024, d = 64; 9.0 at M = d = 2048, where the
# O(M·d) rows weigh as much; the reference's 10.9 and 12.8).
DENSE_MATRICES = 9
# Share of the free device memory the dense path may be expected to use.
MEMORY_HEADROOM = 0.8


@dataclasses.dataclass(frozen=True)
class Problem:
    """What the rule looks at: problems B, rows M = N + Q per problem, features d, the dtype
    and whether float32 matmuls may use TF32."""
    device: torch.device
    dtype: torch.dtype
    tf32: bool
    batch: int
    rows: int
    dim: int


def precision_of(p: Problem) -> str:
    if p.dtype in (torch.float16, torch.bfloat16):
        return "half"
    if p.dtype == torch.float64:
        return "fp64"
    return "tf32" if p.tf32 else "ieee"


def dense_peak_bytes(p: Problem) -> int:
    element = 8 if p.dtype == torch.float64 else 4  # half inputs are computed in float32
    return DENSE_MATRICES * p.batch * p.rows * p.rows * element


@torch.compiler.assume_constant_result
def free_device_bytes(device_index: int) -> int:
    """Bytes the dense path could allocate on the device: the driver's free memory plus what
    PyTorch's caching allocator holds reserved but unused (memory_reserved − memory_allocated),
    which mem_get_info counts as used. Opaque to torch.compile (assume_constant_result: read once
    while tracing, a constant of the graph; no graph break in a compiled caller)."""
    free, _ = torch.cuda.mem_get_info(device_index)
    cached = torch.cuda.memory_reserved(device_index) - torch.cuda.memory_allocated(device_index)
    return int(free + max(cached, 0))


def _dense_fits(p: Problem) -> bool:
    need = dense_peak_bytes(p)
    if need < 2 ** 30:  # small: no device query needed
        return True
    index = p.device.index if p.device.index is not None else torch.cuda.current_device()
    return need <= MEMORY_HEADROOM * free_device_bytes(index)


def fused_reason(backend: str, p: Problem) -> Optional[str]:
    """Why "auto" should not take fused GPU backend ``backend`` for this problem (None: take it)."""
    if not _dense_fits(p):
        return None  # the dense paths would not fit in memory: the fused backend is the one that runs
    precision = precision_of(p)
    least = FUSED_MIN_ROWS[backend][precision]
    if least is not None and p.rows >= least:
        return None
    name = "tf32" if precision == "tf32" else str(p.dtype).replace("torch.", "")
    return (f"'{backend}' was not measured faster than the paths below it at M={p.rows} in {name} on the GPU "
            f"(d2sm_ext/auto_rules.py, BENCHMARKS.md)")


def rule_for(backend: str) -> Callable[[Problem], Optional[str]]:
    """The registry's ``auto_rule`` of a fused GPU backend."""
    return functools.partial(fused_reason, backend)
