"""Every sizing rule of the Python-side kernels in one place: tiles, panel rows, column splits,
chunk budgets, with their defaults and the environment variables that override them
(docs/DESIGN.md §7). The C++ driver's own panel rule (csrc/driver.cpp: 64 MiB panels on CPU,
256 MiB on CUDA, the same D2SM_PANEL_MB / D2SM_PANEL_ROWS) is stated there, next to its loop.

Why these numbers: the Triton tiles are the configurations measured on an H100
(benchmarks/tune_triton.py, BENCHMARKS.md); the interpreter's are larger and fewer because each
interpreted program is a batch of NumPy calls. Panel budgets bound the scratch W' panels so that
memory stays O(M) for a fixed budget while the GEMMs stay large enough to run at their rate.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import env

MIB = 2 ** 20

# ---------------------------------------------------------------------------------------------
# Triton (d2sm_ext/backends/triton_backend.py)
# ---------------------------------------------------------------------------------------------
MAX_GRID_Y = 65535  # CUDA's limit on the second and third grid dimensions
TRITON_PANEL_MB = 512.0  # default budget of the (B, R, M) fp32 W' panels


# The CUDA tiles are chosen so that no variant spills registers when compiled for sm_90
# (tests/test_triton_compile.py compiles every launched variant ahead of time and fails on any
# spill; the registers and spills per variant are in its report). The H100 measurements of
# 128×64×32 (BENCHMARKS.md) predate that check: that tile hit 255 registers and spilled
# 150–2450 bytes per thread in every variant. fp32 IEEE dots are FMA loops that keep a BK-deep
# slice of both operands in registers, hence the short BK — 16, the least `tl.dot` takes under
# Triton 3.6 (3.8 also accepted 8; the AOT test compiles under both). TF32 and half dots run on
# tensor cores.
def _precision_key(dtype: torch.dtype, tf32: bool) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        return "half"
    return "tf32" if tf32 else "ieee"


PAIR_TILES = {
    "ieee": dict(BM=32, BN=32, BK=16, num_warps=8, num_stages=2),
    "tf32": dict(BM=64, BN=32, BK=16, num_warps=8, num_stages=2),
    "half": dict(BM=64, BN=32, BK=32, num_warps=8, num_stages=3),
}
GRAD_TILES = {
    "ieee": dict(BM=128, BN=64, BK=32, num_warps=8, num_stages=3),  # 128×128 with the row split: 8 B
    "tf32": dict(BM=128, BN=128, BK=32, num_warps=8, num_stages=3),
    "half": dict(BM=128, BN=64, BK=32, num_warps=8, num_stages=3),  # 128×128: fp16 180 B, bf16 28 B of spills
}
CROSS_TILES = dict(BM=64, BN=64, BK=32, num_warps=8, num_stages=3)  # 64×128: fp32 spilled 336 B


def triton_pair_tiles(device: torch.device, dtype: torch.dtype = torch.float32, tf32: bool = False) -> dict:
    """Tiles of the Gram+epilogue kernel (D2SM_TRITON_CONFIG overrides)."""
    override = env.tiles("D2SM_TRITON_CONFIG")
    if override:
        return override
    if device.type == "cpu":  # interpreter: fewer, larger numpy ops are faster
        return dict(BM=64, BN=64, BK=128, num_warps=1, num_stages=1)
    return dict(PAIR_TILES[_precision_key(dtype, tf32)])


def triton_given_gram_tiles(pair_tiles: dict) -> dict:
    """Tiles of the pair kernel's launch over memory tiles whose Gram is handed over (TILES=2):
    no dot loop to pipeline (one stage), and at most 32 rows per program — the loaded Gram
    tiles keep a layout the epilogue of both gradients cannot fit in 255 registers at 64 rows
    (bf16 64×32 spilled 36 B on sm_90)."""
    return dict(pair_tiles, BM=min(pair_tiles["BM"], 32), num_stages=1)


def triton_grad_tiles(device: torch.device, dtype: torch.dtype = torch.float32, tf32: bool = False) -> dict:
    """Tiles of the panel GEMM W'·X (D2SM_TRITON_GRAD_CONFIG overrides)."""
    override = env.tiles("D2SM_TRITON_GRAD_CONFIG")
    if override:
        return override
    if device.type == "cpu":
        return dict(BM=64, BN=128, BK=64, num_warps=1, num_stages=1)
    return dict(GRAD_TILES[_precision_key(dtype, tf32)])


def triton_cross_tiles(device: torch.device) -> dict:
    """Tiles of the queue statistics' cross-sums kernel."""
    if device.type == "cpu":  # interpreter
        return dict(BM=32, BN=64, BK=64, num_warps=1, num_stages=1)
    return dict(CROSS_TILES)


def triton_prepass_tiles(device: torch.device) -> dict:
    """Tiles of the O(M·d) pre-pass kernels (inverse norms, row dots, weighted column sums): BM
    rows × BD features per step (Triton's default 4 warps, 3 stages)."""
    return dict(BM=32, BD=128, num_warps=4, num_stages=3)


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def triton_panel_rows(bsz: int, m: int, n_panels: int, bm: int, rows: int) -> int:
    """Rows per gradient panel: the (B, R, M) fp32 W' panels fit D2SM_PANEL_MB (default 512);
    D2SM_PANEL_ROWS forces the count (tests use it to run several panels at small M)."""
    forced = env.integer("D2SM_PANEL_ROWS", 1)
    if forced is not None:
        return forced
    budget = (env.positive_number("D2SM_PANEL_MB") or TRITON_PANEL_MB) * MIB
    r = int(budget // (bsz * m * 4 * max(n_panels, 1)))
    r = max(bm, (r // bm) * bm)
    return min(r, rows)


def triton_column_splits(device: torch.device, row_blocks: int, bsz: int, n_tiles: int) -> int:
    """Column splits per row block so that the grid fills the GPU (>= 4 programs per SM); two
    under the interpreter, so that the split reduction is exercised."""
    if device.type != "cuda":
        return min(2, n_tiles)
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_tiles, cdiv(target, max(row_blocks * bsz, 1))))


ROW_SPLIT_MIN_ROWS = 2048  # a row split streams at least this many rows (the partials stay small beside them)
ROW_SPLIT_PARTIAL_BYTES = 256 * MIB  # bound on the fp32 partials of one split launch


def row_splits(rows: int, programs: int, sm_count: Optional[int], out_elements: int, min_rows: int) -> int:
    """Splits over the summed rows of a launch whose other grid axes give ``programs`` programs,
    as a function of the shape: enough for >= 4 programs per SM (``sm_count`` SMs), each split
    streaming >= ``min_rows`` rows, the (splits × ``out_elements``) fp32 partials within
    ROW_SPLIT_PARTIAL_BYTES. ``sm_count`` None (the interpreter): 2 when there are two splits'
    worth of rows, so that the partials' reduction is exercised.
    Example: q = 2^20 rows, d = 1280 (10 column blocks of the weighted column sums), 132 SMs:
    53 splits of 19 785 rows, 530 programs instead of 10."""
    if rows <= min_rows:
        return 1
    most = cdiv(rows, min_rows)
    if sm_count is None:
        return min(2, most)
    want = cdiv(4 * sm_count, max(programs, 1))
    memory = max(1, ROW_SPLIT_PARTIAL_BYTES // (4 * max(out_elements, 1)))
    return max(1, min(want, most, memory))


def triton_row_splits(device: torch.device, rows: int, programs: int, out_elements: int, min_rows: int) -> int:
    """``row_splits`` with this device's SM count (None under the interpreter)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None
    return row_splits(rows, programs, sms, out_elements, min_rows)


# ---------------------------------------------------------------------------------------------
# Queue statistics (d2sm_ext/queue/statistics.py)
# ---------------------------------------------------------------------------------------------
QUEUE_CHUNK_MB = 64.0  # default budget of one chunk of the PyTorch cross/block sums
# The loss keeps the cross block's Gram blocks for the gradient and the enqueue when both sides'
# blocks fit in this many bytes (else it recomputes them chunk by chunk).
KEEP_GRAM_BYTES = 1 << 30


def queue_chunk_columns(rows: int, element_size: int, budget_mb: Optional[float] = None) -> int:
    """Columns per chunk of the PyTorch pair-term sums over ``rows`` rows: the two Gram blocks and
    the (4, rows, C) terms with their temporaries (~12 values per pair) within D2SM_PANEL_MB
    (default ``budget_mb`` or 64 MiB)."""
    budget = (env.positive_number("D2SM_PANEL_MB") or budget_mb or QUEUE_CHUNK_MB) * MIB
    return max(1, int(budget // (12 * element_size * max(rows, 1))))


def keep_gram(rows: int, cols: int, dtype: torch.dtype) -> bool:
    """Whether the (rows × cols) Gram blocks of both sides fit KEEP_GRAM_BYTES."""
    return 2 * rows * cols * dtype.itemsize <= KEEP_GRAM_BYTES


def refresh_chunk_mb(device: torch.device) -> float:
    """Chunk budget of ``refresh_statistics`` (O(q²·d) in row chunks against all q rows): 64 MiB on
    CPU (cache-sized), 1 GiB on a GPU, so that a chunk is a GEMM that fills the device (at
    q = 2^20 the CPU budget would give one-row chunks: a million vector-matrix products)."""
    return QUEUE_CHUNK_MB if device.type == "cpu" else 1024.0
