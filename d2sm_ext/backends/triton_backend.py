"""Fused Triton backend: Gram tiles with a fused epilogue give the per-row divergences and, for
"mean"/"sum", the gradient weights in the same pass; never an M×M matrix in memory.

Scheme (docs/DESIGN.md §3):

1. O(M·d) pre-pass: inverse norms r_i, s = Σ_j x̂_j, and the closed-form normalisers A_i, B_i
   (§3.1).
2. Pairwise pass over panels of R rows (``triton_kernels.pair_panel_kernel``): a program owns BM
   rows of the panel and a range of BN-column tiles (the column "split" gives the grid enough
   programs for small M); per tile it forms both Gram tiles (x and y) over d in BK-chunks with
   tensor-core dots, the kernel values, and accumulates per row F_i, ū_i, v̄_i (§3.2; partial per
   split, summed in a fixed order after). For live rows that need a gradient it writes
   W'_ij = (α_i u_ij + α_j u_ji)·r_j (§3.3) into an R×M fp32 panel, and ``panel_grad_kernel``
   (a GEMM over the M sample rows, live and memory tensors read in place) gives the pairwise
   gradient sums of the panel's rows. For "mean"/"sum" the row weights w are known before the
   pass, so the gradient is formed in the forward and the backward only scales it (as in
   Liger-Kernel); for "none" w is grad_output and the pass runs again in the backward without
   statistics.
3. O(M·d) finish: ∂L/∂x̂_k from G_k, s and t = Σ_j α_j ū_j x̂_j, then through the normalisation
   (§3.3).

Why panels: both products stay GEMM-shaped with the whole grid busy, at the price of an R×M
fp32 scratch panel bounded by D2SM_PANEL_MB (default 512 MiB; R adapts to M, so memory stays
O(M) for a fixed budget). A single streamed pass that accumulated the gradient rows in place
was measured much slower (BENCHMARKS.md).

Cost per call (M = N + Q rows, N live, d features; FLOPs of the matmul-shaped work):
statistics 4·M²·d (two Gram matrices; the symmetric half is not reused — a tile (I, J) would
have to feed row J's statistics and W' column from another program: atomics or a second
pass); gradient 2·N·M·d for x and 2·N·M·d for y when y requires grad (no Gram recomputation in
the fused "mean"/"sum" path). Reduction "none" recomputes the live rows' Gram tiles in its
backward: +4·N·M·d. Bytes beyond the GEMM operand reads: the W' panel written once and read
once per (d/BN) column block of the gradient GEMM (R×M fp32 per panel and gradient), plus
O(M) statistics. Extra memory: O(M) fp32 row statistics, the W' panels, the (N, d) fp32
gradient buffers.

Precision: row statistics and all accumulations are fp32. float32 inputs use IEEE fp32 dots or
TF32 tensor-core dots (``precision``: "ieee", "tf32", or "auto" = follow PyTorch's float32
matmul setting, see ``fused_op.use_tf32``); float16/bfloat16 inputs use fp16/bf16 tensor-core
dots with fp32 accumulation. W' is rounded to the input dtype for the gradient GEMM; for
float16 each row of W' is first scaled by a power of two into fp16's range and the product is
unscaled exactly (``pow2_row_scale``), so the gradient weights (~1/(B·M²) for "mean") never flush
to zero; the gradient is accumulated and finished in fp32 and cast to the input dtype only after
the upstream gradient is applied.
Results are deterministic: every output element is written by one program with a fixed loop
order, the split partials are summed in a fixed order, no atomics.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional

import torch

from .. import fused_op, sizing
from . import triton_kernels as K

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_guard(device: torch.device):
    """The context every Triton launch runs in: the inputs' CUDA device made current (Triton
    launches on the current device and its current stream, like the C++ ops' OptionalDeviceGuard);
    nothing for CPU tensors (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _guarded(fn):
    """Runs an entry point (an op, the queue kernels) under ``device_guard`` of its first tensor
    argument: every launch below an entry point goes through one."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        first = next(a for a in args if isinstance(a, torch.Tensor))
        with device_guard(first.device):
            return fn(*args, **kwargs)
    return run


def check_batch(bsz: int) -> None:
    """Problems sit on grid axis 1 or 2 of every launch (CUDA's limit 65535): checked before the
    first launch, so that the message is this one and not a launch error."""
    if bsz > sizing.MAX_GRID_Y:
        raise ValueError(f"the triton backend handles at most {sizing.MAX_GRID_Y} problems per call, got B={bsz}; "
                         f"split the batch")


def _as3d(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else (t.unsqueeze(0) if t.ndim == 2 else t)


def _segments(live: torch.Tensor, memory: Optional[torch.Tensor]):
    """(tensor, row offset in the sample set) for the live rows and, if any, the memory rows."""
    segs = [(live, 0)]
    if memory is not None and memory.shape[1] > 0:
        segs.append((memory, live.shape[1]))
    return segs


def _launch_rowwise(kernel, segs, out, extra_args, bm=32, bd=128):
    for t, offset in segs:
        if t.shape[1] == 0:
            continue
        grid = (sizing.cdiv(t.shape[1], bm), t.shape[0])
        kernel[grid](t, t.stride(0), t.stride(1), t.stride(2), t.shape[1], t.shape[2], *extra_args(t),
                     out, out.stride(0), offset, BM=bm, BD=bd)


def _inv_norms(segs, bsz: int, m: int, device) -> torch.Tensor:
    out = torch.empty(bsz, m, dtype=torch.float32, device=device)
    _launch_rowwise(K.row_inv_norm_kernel, segs, out, lambda t: ())
    return out


def _colsum(segs, weights: torch.Tensor, d: int) -> torch.Tensor:
    """Σ_i weights[b, i] · row_i over both segments, (B, d) fp32, deterministic: each segment's
    rows are split (sizing.row_splits: the grid fills the GPU at q = 2^20 rows and d = 1280,
    where the column blocks alone give 10 programs), each split writes its partial, and the
    partials are added in a fixed order."""
    bsz = weights.shape[0]
    tiles = sizing.triton_prepass_tiles(weights.device)
    bm, bd = tiles["BM"], tiles["BD"]
    plan = []
    for t, offset in segs:
        if t.shape[1] == 0:
            continue
        col_blocks = sizing.cdiv(d, bd)
        splits = sizing.triton_row_splits(weights.device, t.shape[1], col_blocks * bsz, bsz * d,
                                          max(bm, sizing.ROW_SPLIT_MIN_ROWS if t.is_cuda else bm))
        plan.append((t, offset, col_blocks, splits))
    part = torch.empty(sum(p[3] for p in plan), bsz, d, dtype=torch.float32, device=weights.device)
    first = 0
    for t, offset, col_blocks, splits in plan:
        per_split = sizing.cdiv(sizing.cdiv(t.shape[1], splits), bm) * bm
        splits = sizing.cdiv(t.shape[1], per_split)
        K.weighted_colsum_kernel[(col_blocks, bsz, splits)](
            t, t.stride(0), t.stride(1), t.stride(2), t.shape[1], d, weights, weights.stride(0), offset,
            part[first:], per_split, BM=bm, BD=bd, num_warps=tiles["num_warps"], num_stages=tiles["num_stages"])
        first += splits
    if first == 0:
        return torch.zeros(bsz, d, dtype=torch.float32, device=weights.device)
    return part[:first].sum(dim=0)  # fixed-order reduction over the splits


def _row_dots(segs, vec: torch.Tensor, bsz: int, m: int) -> torch.Tensor:
    out = torch.empty(bsz, m, dtype=torch.float32, device=vec.device)
    _launch_rowwise(K.row_dot_kernel, segs, out, lambda t: (vec,))
    return out


def _normalisers(segs, inv_norm: torch.Tensor, exclude_self: bool, eps: float):
    """Closed-form A_i (docs/DESIGN.md §3.1) and s = Σ_j x̂_j."""
    bsz, m = inv_norm.shape
    d = segs[0][0].shape[2]
    s = _colsum(segs, inv_norm, d)
    xs = _row_dots(segs, s, bsz, m) * inv_norm  # x̂_i · s
    n_neigh = m - 1 if exclude_self else m
    half_sum = 0.5 * n_neigh + 0.5 * xs  # Σ_j (1 + x̂_i·x̂_j)/2 over S_i
    if exclude_self:
        half_sum = half_sum - 0.5 * (inv_norm > 0).to(half_sum.dtype)  # ‖x̂_i‖² is 1, or 0 for a zero row
    # eps is added last: when every neighbour is antipodal the first part cancels to ~0, and
    # 0.5·n + n·eps would round eps away in fp32 (then A = 0 and p = a/A blows up).
    return torch.clamp(half_sum, min=0.0) + n_neigh * eps, s


def _precision(dtype: torch.dtype, tf32: bool) -> str:
    if dtype != torch.float32:
        return "native"
    return "tf32" if tf32 else "ieee"


def _pair_pass(x, y, xm, ym, rx, ry, a, bn, w, div, exclude_self, eps, tf32,
               compute_stats: bool, gx: Optional[torch.Tensor], gy: Optional[torch.Tensor], grams=None):
    """Panels of rows against all columns: statistics (B, 3, M) and the pairwise gradient sums
    written into gx/gy (B, N, d) fp32. Returns the statistics when compute_stats, else None.

    Live rows are processed in panels of R rows (W' panels of R×M fp32 bounded by
    D2SM_PANEL_MB); memory rows, when statistics are needed, in one stats-only launch.
    ``grams``: the live rows' raw Gram blocks against the memory rows, (N, Q) fp32 each (the
    queue path's hand-over, one problem): the memory tiles read them instead of multiplying.
    """
    bsz, n, d = x.shape
    q = 0 if xm is None else xm.shape[1]
    m = n + q
    check_batch(bsz)
    cfg = sizing.triton_pair_tiles(x.device, x.dtype, tf32)
    gcfg = sizing.triton_grad_tiles(x.device, x.dtype, tf32)
    bm, bn_, bk = cfg["BM"], cfg["BN"], cfg["BK"]
    xm_, ym_ = (x, y) if xm is None else (xm, ym)  # Q = 0: the memory pointers are never read
    stats = torch.empty(3, bsz, m, dtype=torch.float32, device=x.device) if compute_stats else None
    precision = _precision(x.dtype, tf32)
    upcast = interpreter_active() and x.dtype == torch.bfloat16
    n_tiles = sizing.cdiv(n, bn_) + sizing.cdiv(q, bn_)
    n_panels = int(gx is not None) + int(gy is not None)
    dummy = rx.new_empty(1)
    if grams is not None and compute_stats:
        raise ValueError("the Gram hand-over serves the gradient pass only (no statistics)")
    gmx, gmy = (dummy, dummy) if grams is None else (g.to(torch.float32).contiguous() for g in grams)
    log_ba = (bn.double() / a.double()).log().float()  # log(B_i/A_i), a per-row constant that must not cancel

    segments = [(x, y, 0, n, True)]
    if compute_stats and q:
        segments.append((xm, ym, n, q, False))
    for seg_x, seg_y, offset, rows, live in segments:
        if rows == 0:  # no live rows (only memory rows): nothing to launch for this segment
            continue
        grads = live and n_panels > 0
        panel = sizing.triton_panel_rows(bsz, m, n_panels, bm, rows) if grads else rows
        wx = torch.empty(bsz, panel, m, dtype=torch.float32, device=x.device) if grads and gx is not None else None
        wy = torch.empty(bsz, panel, m, dtype=torch.float32, device=x.device) if grads and gy is not None else None
        for r0 in range(0, rows, panel):
            r1 = min(rows, r0 + panel)
            xi, yi = seg_x[:, r0:r1], seg_y[:, r0:r1]
            part = dummy
            # one launch over every column tile, or with the Gram handed over (live rows, no
            # statistics) the live tiles and the memory tiles (read from the Gram) in two launches
            n_live_tiles = sizing.cdiv(n, bn_)
            ranges = [(0, n_tiles)] if grams is None or not live else \
                [(1, n_live_tiles), (2, n_tiles - n_live_tiles)]
            for tiles, t_count in ranges:
                if t_count == 0:
                    continue
                launch = sizing.triton_given_gram_tiles(cfg) if tiles == 2 else cfg
                row_blocks = sizing.cdiv(r1 - r0, launch["BM"])
                splits = sizing.triton_column_splits(x.device, row_blocks, bsz, t_count)
                per_split = sizing.cdiv(t_count, splits)
                splits = sizing.cdiv(t_count, per_split)
                if compute_stats:
                    part = torch.empty(3, splits, bsz, panel, dtype=torch.float32, device=x.device)
                K.pair_panel_kernel[(row_blocks, splits, bsz)](
                    xi, yi, xi.stride(0), xi.stride(1), xi.stride(2), yi.stride(0), yi.stride(1), yi.stride(2),
                    r1 - r0, offset + r0,
                    x, y, x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
                    xm_, ym_, xm_.stride(0), xm_.stride(1), xm_.stride(2), ym_.stride(0), ym_.stride(1),
                    ym_.stride(2), n, q, d, rx, ry, a, bn, log_ba, w, part, splits, panel,
                    wx if wx is not None else dummy, wy if wy is not None else dummy, eps, per_split,
                    gmx, gmy, q,
                    DIV=K.DIVERGENCE_CODES[div], EXCL=exclude_self, COMPUTE_STATS=compute_stats,
                    COMPUTE_GX=wx is not None, COMPUTE_GY=wy is not None,
                    BM=launch["BM"], BN=bn_, BK=bk, PRECISION=precision, UPCAST=upcast, TILES=tiles,
                    num_warps=launch["num_warps"], num_stages=launch["num_stages"],
                )
            if compute_stats:  # fixed-order reduction over the splits: deterministic
                stats[:, :, offset + r0:offset + r1] = part[:, :, :, :r1 - r0].sum(dim=1)
            for w_panel, seg, mem, g in ((wx, x, xm_, gx), (wy, y, ym_, gy)):
                if w_panel is None:
                    continue
                g_rows = g[:, r0:r1]
                # fp16 operands: W' (~1/(B·M²) for "mean") would flush to zero in fp16; each row is
                # scaled by a power of two into fp16's range and the product unscaled exactly.
                scaled = x.dtype == torch.float16
                row_scale = pow2_row_scale(w_panel[:, :r1 - r0]) if scaled else dummy
                # split over the M sample rows when the (row, column) blocks alone leave the GPU
                # idle (q = 2^20, N = 256, d = 1280: 1×10 blocks), partials added in a fixed order
                row_blocks_g, col_blocks_g = sizing.cdiv(r1 - r0, gcfg["BM"]), sizing.cdiv(d, gcfg["BN"])
                splits = sizing.triton_row_splits(x.device, m, row_blocks_g * col_blocks_g * bsz,
                                                  bsz * (r1 - r0) * d,
                                                  sizing.ROW_SPLIT_MIN_ROWS if x.is_cuda else gcfg["BK"])
                k_per_split = sizing.cdiv(sizing.cdiv(m, splits), gcfg["BK"]) * gcfg["BK"]
                splits = sizing.cdiv(m, k_per_split)
                if splits == 1:
                    out, s_stride = g_rows, 0
                else:
                    out = torch.empty(splits, bsz, r1 - r0, d, dtype=torch.float32, device=x.device)
                    s_stride = out.stride(0)  # (splits, B, rows, d): split s at s·s_stride
                o_b, o_m = (out.stride(0), out.stride(1)) if splits == 1 else (out.stride(1), out.stride(2))
                K.panel_grad_kernel[(row_blocks_g * splits, col_blocks_g, bsz)](
                    w_panel, panel, r1 - r0,
                    seg, seg.stride(0), seg.stride(1), seg.stride(2), mem, mem.stride(0), mem.stride(1), mem.stride(2),
                    n, q, d, out, s_stride, o_b, o_m, row_scale, k_per_split,
                    BM=gcfg["BM"], BN=gcfg["BN"], BK=gcfg["BK"], PRECISION=precision, UPCAST=upcast,
                    SCALE_ROWS=scaled, num_warps=gcfg["num_warps"], num_stages=gcfg["num_stages"],
                )
                if splits > 1:
                    g_rows.copy_(out.sum(dim=0))  # fixed-order reduction over the splits
    return stats


# Scaled rows of W' peak in [2^13, 2^14): far below fp16's maximum (65504), so the scaled
# operand cannot overflow, and entries down to ~2^-10 of the row's peak stay normal numbers.
_FP16_ROW_PEAK_EXP = 14


def pow2_row_scale(w: torch.Tensor) -> torch.Tensor:
    """Per-row powers of two (…, R) that bring max_j |w[…, r, j]| into [2^13, 2^14) (1 for a zero
    or non-finite row). Multiplying and dividing by them is exact in fp32. The row peaks come
    from one reduction (the inf-norm: max |w|, NaN-propagating like abs().amax, without an |w|
    panel as a temporary)."""
    peak = torch.linalg.vector_norm(w, float("inf"), dim=-1)
    _, exponent = torch.frexp(peak)  # peak = m·2^e, m in [0.5, 1)
    shift = torch.clamp(_FP16_ROW_PEAK_EXP - exponent, min=-126, max=126)
    scale = torch.ldexp(torch.ones_like(peak), shift)
    ok = (peak > 0) & torch.isfinite(peak)
    return torch.where(ok, scale, torch.ones_like(scale)).contiguous()


def _finish_grad(pairwise, live, segs, inv_norm, norm, weights, bar, s, exclude_self):
    """Step 3: add the O(M·d) terms and back-propagate through the row normalisation."""
    n = live.shape[1]
    coef = weights / norm * bar                  # α_j ū_j for every row j (B, M)
    t = _colsum(segs, coef * inv_norm, live.shape[2])  # Σ_j α_j ū_j x̂_j
    r = inv_norm[:, :n, None]
    xh = live.float() * r
    c = coef[:, :n, None]
    g = 0.5 * pairwise - 0.5 * c * s[:, None, :] - 0.5 * t[:, None, :]
    if exclude_self:
        g = g + c * xh
    return r * (g - xh * (xh * g).sum(-1, keepdim=True))


def _row_statistics(x, y, xm, ym, exclude_self, eps):
    bsz, n, _ = x.shape
    m = n + (0 if xm is None else xm.shape[1])
    xsegs, ysegs = _segments(x, xm), _segments(y, ym)
    rx = _inv_norms(xsegs, bsz, m, x.device)
    ry = _inv_norms(ysegs, bsz, m, x.device)
    a, sx = _normalisers(xsegs, rx, exclude_self, eps)
    bn, sy = _normalisers(ysegs, ry, exclude_self, eps)
    return xsegs, ysegs, rx, ry, a, bn, sx, sy


def _grads(x, y, xm, ym, div, exclude_self, eps, tf32, weights, need_gx, need_gy, stats_needed, row_stats,
           saved_bars=None, grams=None):
    """Run the pass (with stats if asked) and finish the gradients. Returns (stats, gx, gy)."""
    xsegs, ysegs, rx, ry, a, bn, sx, sy = row_stats
    gx = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if need_gx else None
    gy = torch.zeros(y.shape, dtype=torch.float32, device=y.device) if need_gy else None
    stats = _pair_pass(x, y, xm, ym, rx, ry, a, bn, weights, div, exclude_self, eps, tf32, stats_needed, gx, gy,
                       grams)
    pu, qv = (stats[1], stats[2]) if stats_needed else saved_bars
    if need_gx:
        gx = _finish_grad(gx, x, xsegs, rx, a, weights, pu, sx, exclude_self)
    if need_gy:
        gy = _finish_grad(gy, y, ysegs, ry, bn, weights, qv, sy, exclude_self)
    return stats, gx, gy


# ----------------------------------------------------------------------------------------------
# Queue statistics: the cross block's row and column sums (docs/DESIGN.md §3.6)
# ----------------------------------------------------------------------------------------------
def _cross_sums_block(xr, yr, rxr, ryr, xc, yc, rxc, ryc, eps: float, row_weight=None, col_weight=None,
                      grams=None):
    """Row sums (4, R) and column sums (4, C) of one row group: one Triton kernel over BM×BN tiles of the cross block
    (both Gram tiles with fp32 accumulation; fp32 inputs with IEEE dots, so that a row's terms
    added on enqueue and subtracted on eviction are the same numbers; fp16/bf16 on tensor
    cores), fp32 partial sums per tile, added in float64 in a fixed order: deterministic, no
    atomics. Memory: the partials, (C/BN)·4·R + (R/BM)·4·C floats — never an R×C matrix, unless
    ``grams`` ((R, C) fp32 each) asks for the raw Gram blocks."""
    n_rows, n_cols, d = xr.shape[0], xc.shape[0], xr.shape[1]
    row_sums = torch.zeros(4, n_rows, dtype=torch.float64, device=xr.device)
    col_sums = torch.zeros(4, n_cols, dtype=torch.float64, device=xr.device)
    if n_rows == 0 or n_cols == 0:
        return row_sums, col_sums
    dtype = torch.promote_types(xr.dtype, xc.dtype)
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"cross_sums on Triton needs float32, float16 or bfloat16 rows, got {dtype}")
    xr, yr, xc, yc = (t.to(dtype) for t in (xr, yr, xc, yc))
    norms = [t.to(torch.float32).contiguous() for t in (rxr, ryr, rxc, ryc)]
    weights = [None if w is None else w.to(torch.float32).contiguous() for w in (row_weight, col_weight)]
    cfg = sizing.triton_cross_tiles(xr.device)
    n_rb, n_cb = sizing.cdiv(n_rows, cfg["BM"]), sizing.cdiv(n_cols, cfg["BN"])
    if n_cb > sizing.MAX_GRID_Y:
        raise ValueError(f"cross_sums on Triton handles at most {sizing.MAX_GRID_Y * cfg['BN']} columns per call")
    row_part = torch.empty(n_cb, 4, n_rows, dtype=torch.float32, device=xr.device)
    col_part = torch.empty(n_rb, 4, n_cols, dtype=torch.float32, device=xr.device)
    dummy = norms[0]
    K.cross_sums_kernel[(n_rb, n_cb)](
        xr, yr, xr.stride(0), xr.stride(1), yr.stride(0), yr.stride(1), n_rows,
        xc, yc, xc.stride(0), xc.stride(1), yc.stride(0), yc.stride(1), n_cols, d,
        *norms, weights[0] if weights[0] is not None else dummy, weights[1] if weights[1] is not None else dummy,
        row_part, col_part, float(eps), *(grams if grams is not None else (dummy, dummy)),
        HAS_WR=weights[0] is not None, HAS_WC=weights[1] is not None,
        BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], PRECISION=_precision(dtype, False),
        UPCAST=interpreter_active() and dtype == torch.bfloat16, KEEP_GRAM=grams is not None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    row_sums += row_part.sum(dim=0, dtype=torch.float64)  # fixed-order reductions: deterministic
    col_sums += col_part.sum(dim=0, dtype=torch.float64)
    return row_sums, col_sums


@_guarded
def cross_sums(xr, yr, rxr, ryr, xc, yc, rxc, ryc, eps, row_weight, col_weight, row_split, keep_gram):
    """``QueueKernels.cross_sums`` (registry): the kernel above once per row group (the rows before
    ``row_split`` and the rest; the same work as one launch over all rows); with keep_gram the
    raw Gram blocks (R, C) fp32, each group's tiles stored by its launch."""
    grams = None
    if keep_gram:
        grams = tuple(torch.zeros(xr.shape[0], xc.shape[0], dtype=torch.float32, device=xr.device) for _ in range(2))
    groups = []
    for r0, r1 in ((0, row_split), (row_split, xr.shape[0])):
        w = None if row_weight is None else row_weight[r0:r1]
        groups.append(_cross_sums_block(xr[r0:r1], yr[r0:r1], rxr[r0:r1], ryr[r0:r1], xc, yc, rxc, ryc, eps, w,
                                        col_weight, None if grams is None else (grams[0][r0:r1], grams[1][r0:r1])))
    row_sums = torch.cat([groups[0][0], groups[1][0]], dim=1)
    return row_sums, torch.stack([groups[0][1], groups[1][1]]), *(grams or (None, None))


def queue_backward(x, y, xm, ym, saved, grad_rows, divergence, exclude_self, eps, tf32, need_gx, need_gy,
                   gram_x=None, gram_y=None):
    """``QueueKernels.backward``: the queue backward op (below), with the loss's Gram blocks when
    given."""
    empty = x.new_empty(0, dtype=torch.float32)
    return torch.ops.d2sm_ext.triton_queue_backward(
        x, y, xm, ym, saved, grad_rows, divergence, exclude_self, float(eps), tf32, need_gx, need_gy,
        empty if gram_x is None else gram_x, empty if gram_y is None else gram_y)


# ----------------------------------------------------------------------------------------------
# Custom ops (torch.library): opaque to torch.compile; fake shapes and autograd in fused_op.
# ----------------------------------------------------------------------------------------------
def _nonfinite_problems(a: torch.Tensor, bn: torch.Tensor) -> torch.Tensor:
    """(B,) flags: a non-finite value in any row of the problem (live or memory, x or y). Their
    values and gradients are NaN (docs/DESIGN.md §2.6); the kernels' selects would hide some NaNs.
    Read off the normalisers, O(M): such a value makes s, hence every A_i (or B_i), NaN."""
    return ~(torch.isfinite(a).all(1) & torch.isfinite(bn).all(1))


def _nan_where(bad: torch.Tensor, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """NaN in the rows (B, …) of flagged problems, no host sync."""
    if t is None:
        return None
    return torch.where(bad.view(-1, *([1] * (t.ndim - 1))), float("nan"), t)


def _grad_or_empty(grad: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """A custom op's outputs may not alias each other: a fresh empty tensor for "not computed"."""
    if grad is None:
        return like.new_empty(fused_op.EMPTY, dtype=torch.float32)
    return grad.reshape(like.shape)


@torch.library.custom_op("d2sm_ext::triton_d2sm", mutates_args=())
@_guarded
def triton_d2sm(x: torch.Tensor, y: torch.Tensor, x_memory: Optional[torch.Tensor],
                y_memory: Optional[torch.Tensor], divergence: str, exclude_self: bool, eps: float,
                tf32: bool, reduction: str, need_gx: bool, need_gy: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward op of ``fused_op`` (value, saved (6, B, M) fp32, ∂value/∂x, ∂value/∂y)."""
    x3, y3, xm3, ym3 = _as3d(x), _as3d(y), _as3d(x_memory), _as3d(y_memory)
    bsz, n, _ = x3.shape
    check_batch(bsz)
    m = n + (0 if xm3 is None else xm3.shape[1])
    row_stats = _row_statistics(x3, y3, xm3, ym3, exclude_self, eps)
    fused = reduction != "none" and (need_gx or need_gy)
    scale = 1.0 / (bsz * m) if reduction == "mean" else 1.0
    weights = torch.full((bsz, m), scale, dtype=torch.float32, device=x.device)
    stats, gx, gy = _grads(x3, y3, xm3, ym3, divergence, exclude_self, eps, tf32, weights,
                           need_gx and fused, need_gy and fused, True, row_stats)
    bad = _nonfinite_problems(row_stats[4], row_stats[5])
    # Divergences are >= 0: a rounding of an exactly-zero one below 0 is returned as 0 (docs/DESIGN.md §2.5).
    rows = _nan_where(bad, stats[0].clamp_min(0.0))
    gx, gy = _nan_where(bad, gx), _nan_where(bad, gy)
    if reduction == "mean":
        value = rows.mean()
    elif reduction == "sum":
        value = rows.sum()
    else:
        value = rows if x.ndim == 3 else rows[0]
    _, _, rx, ry, a, bn, _, _ = row_stats
    saved = torch.stack([rx, ry, a, bn, stats[1], stats[2]])
    return value, saved, _grad_or_empty(gx, x), _grad_or_empty(gy, y)


@torch.library.custom_op("d2sm_ext::triton_d2sm_backward", mutates_args=())
@_guarded
def triton_d2sm_backward(x: torch.Tensor, y: torch.Tensor, x_memory: Optional[torch.Tensor],
                         y_memory: Optional[torch.Tensor], saved: torch.Tensor, grad_rows: torch.Tensor,
                         divergence: str, exclude_self: bool, eps: float, tf32: bool,
                         need_gx: bool, need_gy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward op of ``fused_op`` (reduction "none": row weights w = grad_rows)."""
    return _backward(x, y, x_memory, y_memory, saved, grad_rows, divergence, exclude_self, eps, tf32, need_gx, need_gy)


def _backward(x, y, x_memory, y_memory, saved, grad_rows, divergence, exclude_self, eps, tf32, need_gx, need_gy,
              grams=None):
    x3, y3, xm3, ym3 = _as3d(x), _as3d(y), _as3d(x_memory), _as3d(y_memory)
    check_batch(x3.shape[0])
    rx, ry, a, bn, pu, qv = saved.unbind(0)
    xsegs, ysegs = _segments(x3, xm3), _segments(y3, ym3)
    sx = _colsum(xsegs, rx, x3.shape[2])
    sy = _colsum(ysegs, ry, y3.shape[2])
    weights = grad_rows.reshape(rx.shape).to(torch.float32).contiguous()
    _, gx, gy = _grads(x3, y3, xm3, ym3, divergence, exclude_self, eps, tf32, weights, need_gx, need_gy,
                       False, (xsegs, ysegs, rx, ry, a, bn, sx, sy), saved_bars=(pu, qv), grams=grams)
    bad = _nonfinite_problems(a, bn)
    gx, gy = _nan_where(bad, gx), _nan_where(bad, gy)
    return _grad_or_empty(gx, x), _grad_or_empty(gy, y)


@torch.library.custom_op("d2sm_ext::triton_queue_backward", mutates_args=())
@_guarded
def triton_queue_backward(x: torch.Tensor, y: torch.Tensor, x_memory: torch.Tensor, y_memory: torch.Tensor,
                          saved: torch.Tensor, grad_rows: torch.Tensor, divergence: str, exclude_self: bool,
                          eps: float, tf32: bool, need_gx: bool, need_gy: bool, gram_x: torch.Tensor,
                          gram_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The C++ ``queue_backward`` schema on Triton: the backward over (live rows, memory rows) of
    one sample set, the memory tiles' Gram read from gram_x/gram_y (N, Q) when they are given
    (empty: recomputed)."""
    grams = (gram_x, gram_y) if gram_x.numel() or gram_y.numel() else None
    return _backward(x, y, x_memory, y_memory, saved, grad_rows, divergence, exclude_self, eps, tf32, need_gx,
                     need_gy, grams)


@triton_queue_backward.register_fake
def _(x, y, x_memory, y_memory, saved, grad_rows, divergence, exclude_self, eps, tf32, need_gx, need_gy, gram_x,
      gram_y):
    return fused_op.fake_backward(x, y, x_memory, y_memory, saved, grad_rows, divergence, exclude_self, eps, tf32,
                                  need_gx, need_gy)


fused_op.register("d2sm_ext::triton_d2sm", "d2sm_ext::triton_d2sm_backward")


# ----------------------------------------------------------------------------------------------
# Backend entry point
# ----------------------------------------------------------------------------------------------
def d2sm_triton(x, y, divergence="kl", exclude_self=True, reduction="mean", eps=1e-8,
                x_memory=None, y_memory=None, precision="auto"):
    """Same contract as ``d2sm_reference`` (inputs validated by ``d2sm_divergence``)."""
    return fused_op.call(torch.ops.d2sm_ext.triton_d2sm, x, y, divergence, exclude_self, reduction, eps,
                        x_memory, y_memory, fused_op.use_tf32(precision))


def usable() -> Optional[str]:
    """Why the backend cannot run on this machine (None with a CUDA device or the interpreter)."""
    if torch.cuda.is_available() or interpreter_active():
        return None
    return "no CUDA device is visible, and TRITON_INTERPRET=1 (Triton's CPU interpreter, for tests) is not set"


def supports(device_type: str, dtype: torch.dtype) -> Optional[str]:
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype} not supported (float32, float16, bfloat16 only; use backend='reference' for float64)"
    if device_type == "cuda":
        return None
    if device_type == "cpu" and interpreter_active():
        return None
    return ("needs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1, Triton's slow interpreter, "
            "for tests)")
