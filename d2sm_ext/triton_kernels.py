"""Triton kernels of the fused D2SM backend (launched by ``d2sm_ext.triton_backend``).

Notation (DESIGN §2): rows i, columns j of the sample set (M = N live + Q memory rows),
r_i = 1/‖x_i‖ (0 for a zero row), a_ij = K'_ij = max((1 + r_i r_j x_i·x_j)/2, 0) + eps and
b_ij = K_ij likewise from y, p_ij = a_ij/A_i, q_ij = b_ij/B_i with the closed-form normalisers
A_i, B_i computed before the pairwise pass.

Gradient (derived in ``triton_backend``'s docstring): for L = Σ_i w_i F_i with the per-row
divergence F_i = Σ_j f(p_ij, q_ij), write u = ∂f/∂p and v = ∂f/∂q (constants dropped) and
ū_i = Σ_j p_ij u_ij, v̄_i = Σ_j q_ij v_ij. Then

    ∂L/∂x̂_k = ½ Σ_{j∈S_k} (α_k u_kj + α_j u_jk) x̂_j − ½ α_k ū_k Σ_{j∈S_k} x̂_j − ½ Σ_{j∈S_k} α_j ū_j x̂_j

with α = w/A (and the same for y with v, v̄, β = w/B). Only the first sum is pairwise; the
kernel here accumulates it (as Σ_j W_kj r_j x_j) in the same tile loop that produces F, ū, v̄.

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
    """out[b, out_offset + i] = 1/‖x[b, i]‖ (0 for a zero row), sum of squares in fp32."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid.to(tl.int64) * BM + tl.arange(0, BM)
    row_ok = rows < M
    base = x_ptr + b * s_b + rows[:, None] * s_m
    acc = tl.zeros((BM,), dtype=tl.float32)
    for k in range(0, D, BD):
        cols = k + tl.arange(0, BD)
        v = tl.load(base + cols[None, :].to(tl.int64) * s_d, mask=row_ok[:, None] & (cols[None, :] < D),
                    other=0.0).to(tl.float32)
        acc += tl.sum(v * v, axis=1)
    inv = tl.where(acc > 0, 1.0 / tl.sqrt(tl.where(acc > 0, acc, 1.0)), 0.0)
    tl.store(out_ptr + b * out_stride_b + out_offset + rows, inv, mask=row_ok)


@triton.jit
def weighted_colsum_kernel(x_ptr, s_b, s_m, s_d, M, D, w_ptr, w_stride_b, w_offset, out_ptr,
                           ACCUMULATE: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr):
    """out[b, :] (+)= Σ_i w[b, w_offset + i] x[b, i, :] in fp32 (rows looped in a fixed order)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = pid.to(tl.int64) * BD + tl.arange(0, BD)
    col_ok = cols < D
    acc = tl.zeros((BD,), dtype=tl.float32)
    for m0 in range(0, M, BM):
        rows = m0 + tl.arange(0, BM)
        row_ok = rows < M
        w = tl.load(w_ptr + b * w_stride_b + w_offset + rows, mask=row_ok, other=0.0)
        v = tl.load(x_ptr + b * s_b + rows[:, None].to(tl.int64) * s_m + cols[None, :] * s_d,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(v * w[:, None], axis=0)
    out = out_ptr + b * D + cols
    if ACCUMULATE:
        acc += tl.load(out, mask=col_ok, other=0.0)
    tl.store(out, acc, mask=col_ok)


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
def _gram_tile(ai_base, si_d, aj_base, sj_d, rows_ok, cols_ok, D,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Raw inner products of a BM-row block and a BN-row block, accumulated in fp32 over d."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, D, BK):
        cols = k + tl.arange(0, BK)
        col_ok = cols < D
        cols64 = cols.to(tl.int64)
        ai = tl.load(ai_base + cols64[None, :] * si_d, mask=rows_ok[:, None] & col_ok[None, :], other=0.0)
        aj = tl.load(aj_base + cols64[None, :] * sj_d, mask=cols_ok[:, None] & col_ok[None, :], other=0.0)
        acc += _dot(ai, tl.trans(aj), PRECISION, UPCAST)
    return acc


@triton.jit
def _pair_terms(p, q, DIV: tl.constexpr):
    """(f, p·u, q·v) of one row's pair terms; zero-probability terms contribute 0."""
    pos_p = p > 0
    pos_q = q > 0
    lp = tl.log(tl.where(pos_p, p, 1.0))
    lq = tl.log(tl.where(pos_q, q, 1.0))
    if DIV == 0:    # kl: f = p log(p/q); u = log(p/q); v = -p/q
        f = tl.where(pos_p, p * (lp - lq), 0.0)
        pu = f
        qv = -p
    elif DIV == 1:  # reverse_kl: f = q log(q/p); u = -q/p; v = log(q/p)
        f = tl.where(pos_q, q * (lq - lp), 0.0)
        pu = -q
        qv = f
    elif DIV == 2:  # symmetric_kl: ½ of both
        f = 0.5 * (p - q) * (lp - lq)
        pu = 0.5 * (tl.where(pos_p, p * (lp - lq), 0.0) - q)
        qv = 0.5 * (tl.where(pos_q, q * (lq - lp), 0.0) - p)
    else:           # js: m = (p+q)/2; f = ½ p log(p/m) + ½ q log(q/m); u = ½ log(p/m); v = ½ log(q/m)
        mid = 0.5 * (p + q)
        lm = tl.log(tl.where(mid > 0, mid, 1.0))
        pu = tl.where(pos_p, 0.5 * p * (lp - lm), 0.0)
        qv = tl.where(pos_q, 0.5 * q * (lq - lm), 0.0)
        f = pu + qv
    return f, pu, qv


@triton.jit
def _grad_weights(p, q, DIV: tl.constexpr):
    """(u, v) = (∂f/∂p, ∂f/∂q) of the pair terms with constants dropped."""
    lp = tl.log(tl.where(p > 0, p, 1.0))
    lq = tl.log(tl.where(q > 0, q, 1.0))
    if DIV == 0:
        u = lp - lq
        v = -p / q
    elif DIV == 1:
        u = -q / p
        v = lq - lp
    elif DIV == 2:
        u = 0.5 * (lp - lq - q / p)
        v = 0.5 * (lq - lp - p / q)
    else:
        lm = tl.log(0.5 * (p + q))
        u = 0.5 * (lp - lm)
        v = 0.5 * (lq - lm)
    return u, v


@triton.jit
def _accumulate_grad(w_tile, cj_base, s_d, cols_ok, g_base, rows_ok, D,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """g[I, :] += w_tile @ c[J, :], streamed over d (this program owns rows I of g)."""
    for k in range(0, D, BK):
        cols = k + tl.arange(0, BK)
        col_ok = cols < D
        cj = tl.load(cj_base + cols[None, :].to(tl.int64) * s_d, mask=cols_ok[:, None] & col_ok[None, :],
                     other=0.0)
        part = _dot(w_tile.to(cj.dtype), cj, PRECISION, UPCAST)
        g_ptrs = g_base + cols[None, :]
        g_mask = rows_ok[:, None] & col_ok[None, :]
        tl.store(g_ptrs, tl.load(g_ptrs, mask=g_mask, other=0.0) + part, mask=g_mask)


@triton.jit
def _column_segment(
    xi_base, sxi_d, yi_base, syi_d, rows_ok, gi,
    rxi, ryi, inv_ai, inv_bi, alpha_i, beta_i,
    x_ptr, y_ptr, sx_b, sx_m, sx_d, sy_b, sy_m, sy_d, b, n_cols, col_offset, D,
    rx_ptr, ry_ptr, a_ptr, bn_ptr, w_ptr, stats_stride_b,
    gx_base, gy_base, eps,
    f_acc, pu_acc, qv_acc,
    DIV: tl.constexpr, EXCL: tl.constexpr, COMPUTE_STATS: tl.constexpr,
    DO_GRAD, COMPUTE_GX: tl.constexpr, COMPUTE_GY: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """All column blocks of one segment (live or memory rows) against row block I.

    DO_GRAD (runtime): row block I is live, so its gradient rows exist and are accumulated."""
    for j0 in range(0, n_cols, BN):
        cols = j0 + tl.arange(0, BN)
        cols_ok = cols < n_cols
        gj = col_offset + cols
        cols64 = cols.to(tl.int64)
        xj_base = x_ptr + b * sx_b + cols64[:, None] * sx_m
        yj_base = y_ptr + b * sy_b + cols64[:, None] * sy_m
        stat_j = b * stats_stride_b + gj
        rxj = tl.load(rx_ptr + stat_j, mask=cols_ok, other=0.0)
        ryj = tl.load(ry_ptr + stat_j, mask=cols_ok, other=0.0)

        cx = _gram_tile(xi_base, sxi_d, xj_base, sx_d, rows_ok, cols_ok, D, BM, BN, BK, PRECISION, UPCAST)
        cy = _gram_tile(yi_base, syi_d, yj_base, sy_d, rows_ok, cols_ok, D, BM, BN, BK, PRECISION, UPCAST)
        ka = tl.maximum(0.5 + 0.5 * (cx * rxi[:, None] * rxj[None, :]), 0.0) + eps
        kb = tl.maximum(0.5 + 0.5 * (cy * ryi[:, None] * ryj[None, :]), 0.0) + eps
        valid = rows_ok[:, None] & cols_ok[None, :]
        if EXCL:
            valid = valid & (gi[:, None] != gj[None, :])

        if COMPUTE_STATS:
            f, pu, qv = _pair_terms(ka * inv_ai[:, None], kb * inv_bi[:, None], DIV)
            f_acc += tl.sum(tl.where(valid, f, 0.0), axis=1)
            pu_acc += tl.sum(tl.where(valid, pu, 0.0), axis=1)
            qv_acc += tl.sum(tl.where(valid, qv, 0.0), axis=1)

        if COMPUTE_GX or COMPUTE_GY:  # constexpr
            if DO_GRAD:
                a_j = tl.load(a_ptr + stat_j, mask=cols_ok, other=1.0)
                b_j = tl.load(bn_ptr + stat_j, mask=cols_ok, other=1.0)
                w_j = tl.load(w_ptr + stat_j, mask=cols_ok, other=0.0)
                # Row i's weights (u_ij, v_ij) and, by symmetry of a and b, column j's (u_ji, v_ji).
                u_ij, v_ij = _grad_weights(ka * inv_ai[:, None], kb * inv_bi[:, None], DIV)
                u_ji, v_ji = _grad_weights(ka / a_j[None, :], kb / b_j[None, :], DIV)
                if COMPUTE_GX:
                    wx = alpha_i[:, None] * u_ij + (w_j / a_j)[None, :] * u_ji
                    wx = tl.where(valid, wx * rxj[None, :], 0.0)
                    _accumulate_grad(wx, xj_base, sx_d, cols_ok, gx_base, rows_ok, D,
                                     BM, BN, BK, PRECISION, UPCAST)
                if COMPUTE_GY:
                    wy = beta_i[:, None] * v_ij + (w_j / b_j)[None, :] * v_ji
                    wy = tl.where(valid, wy * ryj[None, :], 0.0)
                    _accumulate_grad(wy, yj_base, sy_d, cols_ok, gy_base, rows_ok, D,
                                     BM, BN, BK, PRECISION, UPCAST)
    return f_acc, pu_acc, qv_acc


@triton.jit
def pair_kernel(
    xl_ptr, yl_ptr, xm_ptr, ym_ptr,
    sxl_b, sxl_m, sxl_d, syl_b, syl_m, syl_d,
    sxm_b, sxm_m, sxm_d, sym_b, sym_m, sym_d,
    N, Q, D,
    rx_ptr, ry_ptr, a_ptr, bn_ptr, w_ptr,
    f_ptr, pu_ptr, qv_ptr,
    gx_ptr, gy_ptr,
    eps,
    DIV: tl.constexpr, EXCL: tl.constexpr, COMPUTE_STATS: tl.constexpr,
    COMPUTE_GX: tl.constexpr, COMPUTE_GY: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One program = one block of BM rows (live blocks first, then memory blocks) of problem b.

    It streams every column block of both segments, accumulating its rows' F, Σp·u, Σq·v
    (COMPUTE_STATS) and, for live row blocks, the pairwise gradient sums into gx/gy rows it owns
    (COMPUTE_GX/GY). Stats arrays are (B, M=N+Q) fp32; gx/gy are (B, N, D) fp32 contiguous.
    """
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    M = N + Q
    n_live_blocks = tl.cdiv(N, BM)
    is_live = pid < n_live_blocks
    if is_live:
        rows_i = pid.to(tl.int64) * BM + tl.arange(0, BM)
        rows_ok = rows_i < N
        gi = rows_i
        xi_base = xl_ptr + b * sxl_b + rows_i[:, None] * sxl_m
        yi_base = yl_ptr + b * syl_b + rows_i[:, None] * syl_m
        s_xd = sxl_d
        s_yd = syl_d
    else:
        rows_i = (pid - n_live_blocks).to(tl.int64) * BM + tl.arange(0, BM)
        rows_ok = rows_i < Q
        gi = N + rows_i
        xi_base = xm_ptr + b * sxm_b + rows_i[:, None] * sxm_m
        yi_base = ym_ptr + b * sym_b + rows_i[:, None] * sym_m
        s_xd = sxm_d
        s_yd = sym_d
    stat_i = b * M + gi
    rxi = tl.load(rx_ptr + stat_i, mask=rows_ok, other=0.0)
    ryi = tl.load(ry_ptr + stat_i, mask=rows_ok, other=0.0)
    a_i = tl.load(a_ptr + stat_i, mask=rows_ok, other=1.0)
    b_i = tl.load(bn_ptr + stat_i, mask=rows_ok, other=1.0)
    w_i = tl.load(w_ptr + stat_i, mask=rows_ok, other=0.0)
    inv_ai = 1.0 / a_i
    inv_bi = 1.0 / b_i
    alpha_i = w_i * inv_ai
    beta_i = w_i * inv_bi

    g_rows = b * N * D + rows_i[:, None] * D
    gx_base = gx_ptr + g_rows
    gy_base = gy_ptr + g_rows
    f_acc = tl.zeros((BM,), dtype=tl.float32)
    pu_acc = tl.zeros((BM,), dtype=tl.float32)
    qv_acc = tl.zeros((BM,), dtype=tl.float32)
    f_acc, pu_acc, qv_acc = _column_segment(
        xi_base, s_xd, yi_base, s_yd, rows_ok, gi, rxi, ryi, inv_ai, inv_bi, alpha_i, beta_i,
        xl_ptr, yl_ptr, sxl_b, sxl_m, sxl_d, syl_b, syl_m, syl_d, b, N, 0, D,
        rx_ptr, ry_ptr, a_ptr, bn_ptr, w_ptr, M, gx_base, gy_base, eps,
        f_acc, pu_acc, qv_acc, DIV, EXCL, COMPUTE_STATS, is_live, COMPUTE_GX, COMPUTE_GY,
        BM, BN, BK, PRECISION, UPCAST)
    f_acc, pu_acc, qv_acc = _column_segment(
        xi_base, s_xd, yi_base, s_yd, rows_ok, gi, rxi, ryi, inv_ai, inv_bi, alpha_i, beta_i,
        xm_ptr, ym_ptr, sxm_b, sxm_m, sxm_d, sym_b, sym_m, sym_d, b, Q, N, D,
        rx_ptr, ry_ptr, a_ptr, bn_ptr, w_ptr, M, gx_base, gy_base, eps,
        f_acc, pu_acc, qv_acc, DIV, EXCL, COMPUTE_STATS, is_live, COMPUTE_GX, COMPUTE_GY,
        BM, BN, BK, PRECISION, UPCAST)
    if COMPUTE_STATS:
        tl.store(f_ptr + stat_i, f_acc, mask=rows_ok)
        tl.store(pu_ptr + stat_i, pu_acc, mask=rows_ok)
        tl.store(qv_ptr + stat_i, qv_acc, mask=rows_ok)
