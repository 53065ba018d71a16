"""Triton kernels of the fused D2SM backend (launched by ``d2sm_ext.backends.triton_backend``).

Notation (docs/DESIGN.md §2): rows i, columns j of the sample set (M = N live + Q memory rows),
r_i = 1/‖x_i‖ (0 for a zero row), a_ij = K'_ij = max((1 + r_i r_j x_i·x_j)/2, 0) + eps and
b_ij = K_ij likewise from y, p_ij = a_ij/A_i, q_ij = b_ij/B_i with the closed-form normalisers
A_i, B_i computed before the pairwise pass.

Gradient (derived in ``triton_backend``'s docstring): for L = Σ_i w_i F_i with the per-row
divergence F_i = Σ_j f(p_ij, q_ij), write u = ∂f/∂p and v = ∂f/∂q (constants dropped) and
ū_i = Σ_j p_ij u_ij, v̄_i = Σ_j q_ij v_ij. Then

    ∂L/∂x̂_k = ½ Σ_{j∈S_k} (α_k u_kj + α_j u_jk) x̂_j − ½ α_k ū_k Σ_{j∈S_k} x̂_j − ½ Σ_{j∈S_k} α_j ū_j x̂_j

with α = w/A (and the same for y with v, v̄, β = w/B). Only the first sum is pairwise:
``pair_panel_kernel`` forms W'_kj = (α_k u_kj + α_j u_jk)·r_j for a panel of rows in the same
tile loop that produces F, ū, v̄, and ``panel_grad_kernel`` multiplies the panel by the rows.

Divergence codes: 0 kl, 1 reverse_kl, 2 symmetric_kl, 3 js.
"""
import triton
import triton.language as tl

DIVERGENCE_CODES = {"kl": 0, "reverse_kl": 1, "symmetric_kl": 2, "js": 3}


# ----------------------------------------------------------------------------------------------
# O(M·d) pre-pass kernels: inverse norms, weighted column sums, row dot products.
# Each program owns its outputs (no atomics): results are deterministic.
# ----------------------------------------------------------------------------------------------
@triton.jit
def row_inv_norm_kernel(x_ptr, s_b, s_m, s_d, M, D, out_ptr, out_stride_b, out_offset,
                        BM: tl.constexpr, BD: tl.constexpr):
    """out[b, out_offset + i] = 1/‖x[b, i]‖ (0 for a zero row, NaN for a non-finite one) in fp32,
    overflow-safe: a first sweep finds each row's largest |entry|, a second sums the squares of
    the row times 2^-e (e its exponent: exact, entries then in [-2, 2]) and the result is scaled
    back, so rows whose squared norm overflows (entries ≳ 2e19) or underflows get their true
    value, and every other row the unscaled one (reference.inverse_norms is the same rule)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid.to(tl.int64) * BM + tl.arange(0, BM)
    row_ok = rows < M
    base = x_ptr + b * s_b + rows[:, None] * s_m
    peak = tl.zeros((BM,), dtype=tl.float32)
    for k in range(0, D, BD):
        cols = k + tl.arange(0, BD)
        v = tl.load(base + cols[None, :].to(tl.int64) * s_d, mask=row_ok[:, None] & (cols[None, :] < D),
                    other=0.0).to(tl.float32)
        peak = tl.maximum(peak, tl.max(tl.abs(v), axis=1))
    # 2^-e from the exponent bits of the peak (exact; no division): 1 for a zero or subnormal
    # peak, 0 for inf/NaN (the row's squares are then NaN, as they should be).
    e = (peak.to(tl.int32, bitcast=True) >> 23) & 0xFF
    inv_scale = ((254 - tl.minimum(e, 253)) << 23).to(tl.float32, bitcast=True)
    inv_scale = tl.where(e == 0, 1.0, tl.where(e == 255, 0.0, inv_scale))
    acc = tl.zeros((BM,), dtype=tl.float32)
    for k in range(0, D, BD):
        cols = k + tl.arange(0, BD)
        v = tl.load(base + cols[None, :].to(tl.int64) * s_d, mask=row_ok[:, None] & (cols[None, :] < D),
                    other=0.0).to(tl.float32) * inv_scale[:, None]
        acc += tl.sum(v * v, axis=1)
    inv = tl.where(acc == 0, 0.0, 1.0 / tl.sqrt(tl.where(acc == 0, 1.0, acc))) * inv_scale
    inv = tl.where(e == 255, float("nan"), inv)
    tl.store(out_ptr + b * out_stride_b + out_offset + rows, inv, mask=row_ok)


@triton.jit
def weighted_colsum_kernel(x_ptr, s_b, s_m, s_d, M, D, w_ptr, w_stride_b, w_offset, out_ptr, rows_per_split,
                           BM: tl.constexpr, BD: tl.constexpr):
    """Partial weighted column sums: program (column block, b, split s) writes
    out[s, b, :] = Σ_{i in split s} w[b, w_offset + i] x[b, i, :] in fp32, its rows looped in a
    fixed order; the caller adds the splits' partials in a fixed order (deterministic)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    n_batch = tl.num_programs(1).to(tl.int64)
    cols = pid.to(tl.int64) * BD + tl.arange(0, BD)
    col_ok = cols < D
    acc = tl.zeros((BD,), dtype=tl.float32)
    r_begin = split * rows_per_split
    r_end = tl.minimum(r_begin + rows_per_split, M)
    for m0 in range(r_begin, r_end, BM):
        rows = m0 + tl.arange(0, BM)
        row_ok = rows < r_end
        w = tl.load(w_ptr + b * w_stride_b + w_offset + rows, mask=row_ok, other=0.0)
        v = tl.load(x_ptr + b * s_b + rows[:, None].to(tl.int64) * s_m + cols[None, :] * s_d,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(v * w[:, None], axis=0)
    tl.store(out_ptr + (split * n_batch + b) * D + cols, acc, mask=col_ok)


@triton.jit
def row_dot_kernel(x_ptr, s_b, s_m, s_d, M, D, vec_ptr, out_ptr, out_stride_b, out_offset,
                   BM: tl.constexpr, BD: tl.constexpr):
    """out[b, out_offset + i] = x[b, i, :] · vec[b, :] in fp32."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid.to(tl.int64) * BM + tl.arange(0, BM)
    row_ok = rows < M
    acc = tl.zeros((BM,), dtype=tl.float32)
    for k in range(0, D, BD):
        cols = k + tl.arange(0, BD)
        col_ok = cols < D
        v = tl.load(x_ptr + b * s_b + rows[:, None] * s_m + cols[None, :].to(tl.int64) * s_d,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        s = tl.load(vec_ptr + b * D + cols, mask=col_ok, other=0.0)
        acc += tl.sum(v * s[None, :], axis=1)
    tl.store(out_ptr + b * out_stride_b + out_offset + rows, acc, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# The pairwise pass.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # One return at the end: the compiler does not prune code after an early return in a
    # constexpr branch.
    if UPCAST:  # Triton's CPU interpreter computes bfloat16 dots wrongly; it gets fp32 operands
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif PRECISION == "native":  # float16/bfloat16 operands: tensor cores, fp32 accumulation
        out = tl.dot(a, b)
    else:  # float32 operands: "ieee" or "tf32"
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


@triton.jit
def _pair_terms(p, q, lpq, DIV: tl.constexpr):
    """(f, p·u, q·v) of one row's pair terms with _grad_weights' centred u, v; lpq = log(p/q);
    zero-probability terms give 0."""
    pos_p = p > 0
    pos_q = q > 0
    if DIV == 0:    # kl: f = p log(p/q); u = log(p/q); v = 1 - p/q
        f = tl.where(pos_p, p * lpq, 0.0)
        pu = f
        qv = q - p
    elif DIV == 1:  # reverse_kl: f = q log(q/p); u = 1 - q/p; v = log(q/p)
        f = tl.where(pos_q, -q * lpq, 0.0)
        pu = p - q
        qv = f
    elif DIV == 2:  # symmetric_kl: ½ of both
        f = 0.5 * (p - q) * lpq
        pu = 0.5 * (tl.where(pos_p, p * lpq, 0.0) + p - q)
        qv = 0.5 * (tl.where(pos_q, -q * lpq, 0.0) + q - p)
    else:           # js: m = (p+q)/2; f = ½ p log(p/m) + ½ q log(q/m); u = ½ log(p/m); v = ½ log(q/m)
        s = p + q
        pu = tl.where(pos_p, 0.5 * p * tl.log(tl.where(pos_p, 2.0 * p / s, 1.0)), 0.0)
        qv = tl.where(pos_q, 0.5 * q * tl.log(tl.where(pos_q, 2.0 * q / s, 1.0)), 0.0)
        f = pu + qv
    return f, pu, qv


@triton.jit
def _grad_weights(p, q, lpq, DIV: tl.constexpr, WANT_U: tl.constexpr, WANT_V: tl.constexpr):
    """(u, v) = (∂f/∂p, ∂f/∂q) of the pair terms, each shifted by the constant that centres it
    (docs/DESIGN.md §3.3: ū, v̄ divergence-sized, so W' rounded to TF32 or half keeps the small
    centred weights); lpq = log(p/q). Only the asked ones are formed (the other is 0)."""
    u = 0.0
    v = 0.0
    if DIV == 0:
        if WANT_U:
            u = lpq
        if WANT_V:
            v = 1.0 - p / q
    elif DIV == 1:
        if WANT_U:
            u = 1.0 - q / p
        if WANT_V:
            v = -lpq
    elif DIV == 2:
        if WANT_U:
            u = 0.5 * (lpq + 1.0 - q / p)
        if WANT_V:
            v = 0.5 * (1.0 - lpq - p / q)
    else:
        if WANT_U:
            u = 0.5 * tl.log(2.0 * p / (p + q))
        if WANT_V:
            v = 0.5 * tl.log(2.0 * q / (p + q))
    return u, v


@triton.jit
def pair_panel_kernel(
    xi_ptr, yi_ptr, sxi_b, sxi_m, sxi_d, syi_b, syi_m, syi_d, n_rows, row_offset,
    xl_ptr, yl_ptr, sxl_b, sxl_m, sxl_d, syl_b, syl_m, syl_d,
    xm_ptr, ym_ptr, sxm_b, sxm_m, sxm_d, sym_b, sym_m, sym_d,
    N, Q, D,
    rx_ptr, ry_ptr, a_ptr, bn_ptr, lba_ptr, w_ptr,
    part_ptr, n_splits, panel_rows,
    wx_ptr, wy_ptr,
    eps, tiles_per_split,
    gmx_ptr, gmy_ptr, s_gm,
    DIV: tl.constexpr, EXCL: tl.constexpr, COMPUTE_STATS: tl.constexpr,
    COMPUTE_GX: tl.constexpr, COMPUTE_GY: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, TILES: tl.constexpr = 0,
):
    """Gram tiles + fused epilogue for one panel of rows against a range of column tiles.

    Program (row block r, split s, problem b): rows r·BM… of the panel (global sample indices
    row_offset + …), column tiles [s·tiles_per_split, (s+1)·tiles_per_split) of the sample set,
    live tiles first, then memory tiles (a tile never straddles the two tensors). Per tile it
    accumulates both Gram tiles over d (tensor-core dots, fp32 accumulation), then computes the
    kernel values, the row sums F, Σp·u, Σq·v (partial, per split: part[k, s, b, row]) and, for
    rows that need a gradient, the weights W'_ij = (α_i u_ij + α_j u_ji)·r_j into the panel
    wx (and W' for y into wy), both (B, panel_rows, M) fp32.

    TILES: 0 every column tile; with the Gram handed over (the queue path: one problem of live
    rows, no statistics, docs/DESIGN.md §3.6) two launches, 1 the live tiles only and 2 the memory
    tiles only, whose raw Gram tiles are read from gmx/gmy (N, Q) fp32 (row stride s_gm) — the
    loss's cross block — instead of being multiplied again (no dot loop in that variant). The
    splits (tiles_per_split) count within the launch's tiles.
    """
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    M = N + Q
    rows = pid_r.to(tl.int64) * BM + tl.arange(0, BM)
    rows_ok = rows < n_rows
    gi = row_offset + rows
    stat_i = b * M + gi
    rxi = tl.load(rx_ptr + stat_i, mask=rows_ok, other=0.0)
    ryi = tl.load(ry_ptr + stat_i, mask=rows_ok, other=0.0)
    inv_ai = 1.0 / tl.load(a_ptr + stat_i, mask=rows_ok, other=1.0)
    inv_bi = 1.0 / tl.load(bn_ptr + stat_i, mask=rows_ok, other=1.0)
    lba_i = tl.load(lba_ptr + stat_i, mask=rows_ok, other=0.0)
    w_i = tl.load(w_ptr + stat_i, mask=rows_ok, other=0.0)
    alpha_i = w_i * inv_ai
    beta_i = w_i * inv_bi
    xi_base = xi_ptr + b * sxi_b + rows[:, None] * sxi_m
    yi_base = yi_ptr + b * syi_b + rows[:, None] * syi_m

    n_live_tiles = tl.cdiv(N, BN)
    n_tiles = n_live_tiles + tl.cdiv(Q, BN)
    if TILES == 2:
        t_begin = n_live_tiles + pid_s * tiles_per_split
        t_end = tl.minimum(t_begin + tiles_per_split, n_tiles)
    elif TILES == 1:
        t_begin = pid_s * tiles_per_split
        t_end = tl.minimum(t_begin + tiles_per_split, n_live_tiles)
    else:
        t_begin = pid_s * tiles_per_split
        t_end = tl.minimum(t_begin + tiles_per_split, n_tiles)
    f_acc = tl.zeros((BM,), dtype=tl.float32)
    pu_acc = tl.zeros((BM,), dtype=tl.float32)
    qv_acc = tl.zeros((BM,), dtype=tl.float32)
    for t in range(t_begin, t_end):
        if t < n_live_tiles:
            cols = (t * BN + tl.arange(0, BN)).to(tl.int64)  # t·BN < M < 2^31
            cols_ok = cols < N
            gj = cols
            xj_base = xl_ptr + b * sxl_b + cols[:, None] * sxl_m
            yj_base = yl_ptr + b * syl_b + cols[:, None] * syl_m
            sxj_d = sxl_d
            syj_d = syl_d
        else:
            cols = ((t - n_live_tiles) * BN + tl.arange(0, BN)).to(tl.int64)
            cols_ok = cols < Q
            gj = N + cols
            xj_base = xm_ptr + b * sxm_b + cols[:, None] * sxm_m
            yj_base = ym_ptr + b * sym_b + cols[:, None] * sym_m
            sxj_d = sxm_d
            syj_d = sym_d
        cx = tl.zeros((BM, BN), dtype=tl.float32)
        cy = tl.zeros((BM, BN), dtype=tl.float32)
        if TILES == 2:  # memory tiles only, from the given Gram
            g_ok = rows_ok[:, None] & cols_ok[None, :]
            cx += tl.load(gmx_ptr + gi[:, None] * s_gm + cols[None, :], mask=g_ok, other=0.0)
            cy += tl.load(gmy_ptr + gi[:, None] * s_gm + cols[None, :], mask=g_ok, other=0.0)
        else:
            for k in range(0, D, BK):
                kk = (k + tl.arange(0, BK)).to(tl.int64)
                k_ok = kk < D
                xi = tl.load(xi_base + kk[None, :] * sxi_d, mask=rows_ok[:, None] & k_ok[None, :], other=0.0)
                xj = tl.load(xj_base + kk[None, :] * sxj_d, mask=cols_ok[:, None] & k_ok[None, :], other=0.0)
                cx += _dot(xi, tl.trans(xj), PRECISION, UPCAST)
                yi = tl.load(yi_base + kk[None, :] * syi_d, mask=rows_ok[:, None] & k_ok[None, :], other=0.0)
                yj = tl.load(yj_base + kk[None, :] * syj_d, mask=cols_ok[:, None] & k_ok[None, :], other=0.0)
                cy += _dot(yi, tl.trans(yj), PRECISION, UPCAST)

        stat_j = b * M + gj
        rxj = tl.load(rx_ptr + stat_j, mask=cols_ok, other=0.0)
        ryj = tl.load(ry_ptr + stat_j, mask=cols_ok, other=0.0)
        ka = tl.maximum(0.5 + 0.5 * (cx * rxi[:, None] * rxj[None, :]), 0.0) + eps
        kb = tl.maximum(0.5 + 0.5 * (cy * ryi[:, None] * ryj[None, :]), 0.0) + eps
        valid = rows_ok[:, None] & cols_ok[None, :]
        if EXCL:
            valid = valid & (gi[:, None] != gj[None, :])
        p_ij = ka * inv_ai[:, None]
        q_ij = kb * inv_bi[:, None]
        # log(p/q) = log(K'/K) + log(B_i/A_i): two small or exact terms, where log p − log q
        # would subtract two ~log M numbers (the C++ kernels' form, csrc/pair_math.h)
        pos = (ka > 0) & (kb > 0)  # false only with eps = 0 and antipodal rows
        lab = tl.where(pos, tl.log(tl.where(pos, ka / kb, 1.0)), 0.0)
        if COMPUTE_STATS:
            f, pu, qv = _pair_terms(p_ij, q_ij, lab + lba_i[:, None], DIV)
            f_acc += tl.sum(tl.where(valid, f, 0.0), axis=1)
            pu_acc += tl.sum(tl.where(valid, pu, 0.0), axis=1)
            qv_acc += tl.sum(tl.where(valid, qv, 0.0), axis=1)
        if COMPUTE_GX or COMPUTE_GY:
            a_j = tl.load(a_ptr + stat_j, mask=cols_ok, other=1.0)
            b_j = tl.load(bn_ptr + stat_j, mask=cols_ok, other=1.0)
            w_j = tl.load(w_ptr + stat_j, mask=cols_ok, other=0.0)
            lba_j = tl.load(lba_ptr + stat_j, mask=cols_ok, other=0.0)
            # Row i's weights (u_ij, v_ij) and, as a and b are symmetric, column j's (u_ji, v_ji).
            # One side at a time, each stored before the next is formed: the epilogue's live
            # values stay within the registers of the shipped tiles (no spills, sizing.py).
            panel = b * panel_rows * M + rows[:, None] * M + gj[None, :]
            store_ok = rows_ok[:, None] & cols_ok[None, :]
            p_ji = ka / a_j[None, :]
            q_ji = kb / b_j[None, :]
            if COMPUTE_GX:
                u_ij, _ = _grad_weights(p_ij, q_ij, lab + lba_i[:, None], DIV, True, False)
                u_ji, _ = _grad_weights(p_ji, q_ji, lab + lba_j[None, :], DIV, True, False)
                wx = alpha_i[:, None] * u_ij + (w_j / a_j)[None, :] * u_ji
                tl.store(wx_ptr + panel, tl.where(valid, wx * rxj[None, :], 0.0), mask=store_ok)
            if COMPUTE_GY:
                _, v_ij = _grad_weights(p_ij, q_ij, lab + lba_i[:, None], DIV, False, True)
                _, v_ji = _grad_weights(p_ji, q_ji, lab + lba_j[None, :], DIV, False, True)
                wy = beta_i[:, None] * v_ij + (w_j / b_j)[None, :] * v_ji
                tl.store(wy_ptr + panel, tl.where(valid, wy * ryj[None, :], 0.0), mask=store_ok)
    if COMPUTE_STATS:
        n_batch = tl.num_programs(2).to(tl.int64)
        part = (pid_s * n_batch + b) * panel_rows + rows
        plane = n_splits * n_batch * panel_rows
        tl.store(part_ptr + part, f_acc, mask=rows_ok)
        tl.store(part_ptr + plane + part, pu_acc, mask=rows_ok)
        tl.store(part_ptr + 2 * plane + part, qv_acc, mask=rows_ok)


@triton.jit
def panel_grad_kernel(
    w_ptr, panel_rows, n_rows,
    xl_ptr, sxl_b, sxl_m, sxl_d, xm_ptr, sxm_b, sxm_m, sxm_d, N, Q, D,
    g_ptr, sg_s, sg_b, sg_m, scale_ptr, k_per_split,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, SCALE_ROWS: tl.constexpr,
):
    """g[s, b, rows, cols] = W'[b, rows, K_s] @ [x_live; x_memory][b, K_s, cols] — a GEMM over
    the M sample rows (two tensors, never concatenated), fp32 accumulation, split over the
    sample rows: program axis 0 is (split s, row block), and split s takes the sample rows
    K_s = [s·k_per_split, (s+1)·k_per_split) (a multiple of BK); the caller adds the splits'
    partials in a fixed order (with one split g is the result). W' is rounded to the input dtype
    for the dot (tensor cores for fp16/bf16; ieee or tf32 for fp32). SCALE_ROWS: row r of W' is
    multiplied by the power of two scale[b, r] before the rounding and the product divided by it
    after (exact), so fp16 does not flush small weights to zero."""
    n_row_blocks = tl.cdiv(n_rows, BM)
    pid_s = tl.program_id(0) // n_row_blocks
    pid_r = tl.program_id(0) % n_row_blocks
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    M = N + Q
    k_begin = pid_s * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, M)
    rows = pid_r.to(tl.int64) * BM + tl.arange(0, BM)
    rows_ok = rows < n_rows
    cols = pid_c.to(tl.int64) * BN + tl.arange(0, BN)
    cols_ok = cols < D
    w_base = w_ptr + b * panel_rows * M + rows[:, None] * M
    if SCALE_ROWS:
        scale = tl.load(scale_ptr + b * n_rows + rows, mask=rows_ok, other=1.0)
    else:
        scale = tl.full((BM,), 1.0, dtype=tl.float32)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    live_end = tl.minimum(k_end, N)
    for k in range(k_begin, live_end, BK):
        kk = (k + tl.arange(0, BK)).to(tl.int64)
        k_ok = kk < live_end
        xk = tl.load(xl_ptr + b * sxl_b + kk[:, None] * sxl_m + cols[None, :] * sxl_d,
                     mask=k_ok[:, None] & cols_ok[None, :], other=0.0)
        wk = tl.load(w_base + kk[None, :], mask=rows_ok[:, None] & k_ok[None, :], other=0.0)
        if SCALE_ROWS:
            wk = wk * scale[:, None]
        acc += _dot(wk.to(xk.dtype), xk, PRECISION, UPCAST)
    mem_begin = tl.maximum(k_begin, N) - N
    mem_end = k_end - N
    for k in range(mem_begin, mem_end, BK):
        kk = (k + tl.arange(0, BK)).to(tl.int64)
        k_ok = kk < mem_end
        xk = tl.load(xm_ptr + b * sxm_b + kk[:, None] * sxm_m + cols[None, :] * sxm_d,
                     mask=k_ok[:, None] & cols_ok[None, :], other=0.0)
        wk = tl.load(w_base + N + kk[None, :], mask=rows_ok[:, None] & k_ok[None, :], other=0.0)
        if SCALE_ROWS:
            wk = wk * scale[:, None]
        acc += _dot(wk.to(xk.dtype), xk, PRECISION, UPCAST)
    if SCALE_ROWS:
        acc = acc / scale[:, None]
    g = g_ptr + pid_s.to(tl.int64) * sg_s + b * sg_b + rows[:, None] * sg_m + cols[None, :]
    tl.store(g, acc, mask=rows_ok[:, None] & cols_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Queue statistics (docs/DESIGN.md §3.6): the cross block's row and column sums of the pair terms.
# ----------------------------------------------------------------------------------------------
@triton.jit
def cross_sums_kernel(
    xr_ptr, yr_ptr, s_xr_m, s_xr_d, s_yr_m, s_yr_d, R,
    xc_ptr, yc_ptr, s_xc_m, s_xc_d, s_yc_m, s_yc_d, C, D,
    rxr_ptr, ryr_ptr, rxc_ptr, ryc_ptr, wr_ptr, wc_ptr,
    row_part_ptr, col_part_ptr, eps, gx_out_ptr, gy_out_ptr,
    HAS_WR: tl.constexpr, HAS_WC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, KEEP_GRAM: tl.constexpr = False,
):
    """One BM×BN tile of the cross block between row set R and column set C: both Gram tiles
    over d, the pair terms T = (K', K, K'·log(K'/K), K·log(K/K')), and their partial sums —
    along the tile's columns, weighted by wc, into row_part[col block, k, rows] (n_cblocks, 4, R)
    and down its rows, weighted by wr, into col_part[row block, k, cols] (n_rblocks, 4, C). A zero
    weight leaves its row or column out even where its terms are NaN. KEEP_GRAM: the raw Gram
    tiles are also stored into gx_out/gy_out (R, C) fp32, for the queue path's gradient.
    Every partial has one writer; the caller adds them up in a fixed order (no atomics)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r.to(tl.int64) * BM + tl.arange(0, BM)
    cols = pid_c.to(tl.int64) * BN + tl.arange(0, BN)
    rows_ok = rows < R
    cols_ok = cols < C
    gx = tl.zeros((BM, BN), dtype=tl.float32)
    gy = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, D, BK):
        kk = (k + tl.arange(0, BK)).to(tl.int64)
        k_ok = kk < D
        a = tl.load(xr_ptr + rows[:, None] * s_xr_m + kk[None, :] * s_xr_d, mask=rows_ok[:, None] & k_ok[None, :],
                    other=0.0)
        b = tl.load(xc_ptr + cols[:, None] * s_xc_m + kk[None, :] * s_xc_d, mask=cols_ok[:, None] & k_ok[None, :],
                    other=0.0)
        gx += _dot(a, tl.trans(b), PRECISION, UPCAST)
        a = tl.load(yr_ptr + rows[:, None] * s_yr_m + kk[None, :] * s_yr_d, mask=rows_ok[:, None] & k_ok[None, :],
                    other=0.0)
        b = tl.load(yc_ptr + cols[:, None] * s_yc_m + kk[None, :] * s_yc_d, mask=cols_ok[:, None] & k_ok[None, :],
                    other=0.0)
        gy += _dot(a, tl.trans(b), PRECISION, UPCAST)
    if KEEP_GRAM:
        g_off = rows[:, None] * C + cols[None, :]
        tl.store(gx_out_ptr + g_off, gx, mask=rows_ok[:, None] & cols_ok[None, :])
        tl.store(gy_out_ptr + g_off, gy, mask=rows_ok[:, None] & cols_ok[None, :])
    rxi = tl.load(rxr_ptr + rows, mask=rows_ok, other=0.0)
    ryi = tl.load(ryr_ptr + rows, mask=rows_ok, other=0.0)
    rxj = tl.load(rxc_ptr + cols, mask=cols_ok, other=0.0)
    ryj = tl.load(ryc_ptr + cols, mask=cols_ok, other=0.0)
    ka = tl.maximum(0.5 + 0.5 * (gx * rxi[:, None] * rxj[None, :]), 0.0) + eps
    kb = tl.maximum(0.5 + 0.5 * (gy * ryi[:, None] * ryj[None, :]), 0.0) + eps
    lab = tl.log(ka / kb)
    valid = rows_ok[:, None] & cols_ok[None, :]
    if HAS_WC:
        wc = tl.load(wc_ptr + cols, mask=cols_ok, other=0.0)
    else:
        wc = tl.where(cols_ok, 1.0, 0.0)
    if HAS_WR:
        wr = tl.load(wr_ptr + rows, mask=rows_ok, other=0.0)
    else:
        wr = tl.where(rows_ok, 1.0, 0.0)
    row_base = row_part_ptr + pid_c.to(tl.int64) * 4 * R + rows
    col_base = col_part_ptr + pid_r.to(tl.int64) * 4 * C + cols
    for s in tl.static_range(4):
        if s == 0:
            t = ka
        elif s == 1:
            t = kb
        elif s == 2:
            t = ka * lab
        else:
            t = -kb * lab
        t = tl.where(valid, t, 0.0)
        # a zero weight leaves its row or column out, even where its terms are NaN
        tl.store(row_base + s * R, tl.sum(tl.where(wc[None, :] != 0, t * wc[None, :], 0.0), axis=1), mask=rows_ok)
        tl.store(col_base + s * C, tl.sum(tl.where(wr[:, None] != 0, t * wr[:, None], 0.0), axis=0), mask=cols_ok)
