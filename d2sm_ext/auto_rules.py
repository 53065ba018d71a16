"""When "auto" may take a fused backend on a GPU: a rule written from measurements, so that "auto"
never picks a fused backend measured slower than the eager reference for a shape and precision.

The measurements (BENCHMARKS.md, "GPU: NVIDIA H100 80GB HBM3", run 2, fwd+bwd medians, the
Triton panel kernel against the eager reference in the same run):

* half precision (bf16) at M = 4096, d = 4096: 3.70× faster; at M = 256, d = 100352: 0.43×;
* tf32 at M = 16384, d = 1280: 1.62× faster; at M = 4096, d = 4096: 0.83×;
* IEEE fp32: slower at every measured shape (0.08×–0.71×);
* the reference's fwd+bwd peak memory is ~11 float32 M×M matrices per problem (688 MiB at
  M = 4096, 11.0 GiB at M = 16384): beyond the device's free memory only a fused backend runs
  (M = 65536: the reference cannot allocate, Triton runs in 1.3 GiB).

Between measured points the rule takes the reference (known to run, and measured faster below
the win thresholds). The rule compares full passes: it is not applied to the kept-statistics
queue path (docs/DESIGN.md §3.6), which does O(N·q·d) work instead of O((N+q)²·d). A new GPU run (benchmarks/gpu_check.sh) that moves a threshold updates the
constants here and BENCHMARKS.md together.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

# Smallest sample-set size M measured faster than the reference, per GPU precision.
HALF_MIN_ROWS = 4096
TF32_MIN_ROWS = 16384
# The reference's fwd+bwd peak, in float32 M×M matrices per problem (H100 run 2).
REFERENCE_MATRICES = 11
# Share of the free device memory the reference may be expected to use.
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


def reference_peak_bytes(p: Problem) -> int:
    return REFERENCE_MATRICES * p.batch * p.rows * p.rows * 4


@torch.compiler.assume_constant_result
def free_device_bytes(device_index: int) -> int:
    """Bytes the reference could allocate on the device: the driver's free memory plus what
    PyTorch's caching allocator holds reserved but unused (memory_reserved − memory_allocated),
    which mem_get_info counts as used. Opaque to torch.compile (assume_constant_result: read once
    while tracing, a constant of the graph; no graph break in a compiled caller)."""
    free, _ = torch.cuda.mem_get_info(device_index)
    cached = torch.cuda.memory_reserved(device_index) - torch.cuda.memory_allocated(device_index)
    return int(free + max(cached, 0))


def _reference_fits(p: Problem) -> bool:
    need = reference_peak_bytes(p)
    if need < 2 ** 30:  # small: no device query needed
        return True
    index = p.device.index if p.device.index is not None else torch.cuda.current_device()
    return need <= MEMORY_HEADROOM * free_device_bytes(index)


def gpu_fused_reason(p: Problem) -> Optional[str]:
    """Why "auto" should not take a fused GPU backend for this problem (None: take it)."""
    if not _reference_fits(p):
        return None  # the reference would not fit in memory: the fused backend is the one that runs
    if p.dtype in (torch.float16, torch.bfloat16) and p.rows >= HALF_MIN_ROWS:
        return None
    if p.dtype == torch.float32 and p.tf32 and p.rows >= TF32_MIN_ROWS:
        return None
    precision = "tf32" if p.dtype == torch.float32 and p.tf32 else str(p.dtype).replace("torch.", "")
    return (f"measured slower than the reference at M={p.rows} in {precision} on the GPU "
            f"(d2sm_ext/auto_rules.py, BENCHMARKS.md)")
