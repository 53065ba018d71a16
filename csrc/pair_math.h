// The per-pair and per-row arithmetic of the fused D2SM pass (docs/DESIGN.md §3), written once
// and compiled twice: into the CPU loops of csrc/cpu/kernels.cpp (vectorised by the compiler)
// and into the CUDA kernels of csrc/cuda/kernels.cu. Only the iteration and the reductions differ
// between the two, so the CPU tests (parity with the reference, gradcheck) exercise every
// formula the GPU runs.
//
// Notation (csrc/driver.cpp's header comment has the scheme): for row i and column j of a panel,
// gram_x = x_i·x_j and gram_y = y_i·y_j are raw (unnormalised) inner products; r = 1/‖row‖
// (0 for a zero row); K'_ij = max(½ + ½ r_i r_j gram_x, 0) + eps, K likewise from y;
// p = K'/A_i, q = K/B_i; log(p/q) = log(K'/K) + log(B_i/A_i) (well conditioned: both terms are
// small or exact, instead of two ~log M numbers that cancel).
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define D2SM_INLINE __host__ __device__ __forceinline__
#else
#define D2SM_INLINE inline __attribute__((always_inline))
#endif

namespace d2sm_ext {

enum Divergence { KL = 0, REVERSE_KL = 1, SYMMETRIC_KL = 2, JS = 3 };

// Per-row arrays (B, M), row-major, in the compute type.
template <typename T>
struct Columns {
  const T *rx, *ry, *inv_a, *inv_b, *log_ba, *w_a, *w_b;  // log_ba = log(B/A), w_a = w/A, w_b = w/B
  D2SM_INLINE Columns shifted(int64_t by) const {
    return {rx + by, ry + by, inv_a + by, inv_b + by, log_ba + by, w_a + by, w_b + by};
  }
};

// Row i's entries of those arrays, loaded once per row.
template <typename T>
struct RowConstants {
  T rx, ry, inv_a, inv_b, log_ba, alpha, beta;  // alpha = w_i/A_i, beta = w_i/B_i
  D2SM_INLINE static RowConstants load(const Columns<T>& c, int64_t i) {
    return {c.rx[i], c.ry[i], c.inv_a[i], c.inv_b[i], c.log_ba[i], c.w_a[i], c.w_b[i]};
  }
};

// What one pair adds to row i's sums: F_i, ū_i = Σ_j p_ij u_ij and v̄_i = Σ_j q_ij v_ij.
template <typename T>
struct RowSums {
  T f, pu, qv;
};

// u_ij = ∂f_i/∂p_ij and v_ij = ∂f_i/∂q_ij for row i's divergence f_i, each shifted by the
// constant that centres it (docs/DESIGN.md §3.3: a constant added to a row's u cancels; the
// shifted ū, v̄ are divergence-sized instead of ~-1, so the W' that the gradient GEMM rounds to
// TF32 or half holds the small centred weights, not -2·β plus them).
template <int DIV, typename T, typename Log>
D2SM_INLINE void pair_weights(T p, T q, T lpq, Log log_fn, T& u, T& v) {
  const T half = T(0.5), one = T(1), two = T(2);
  if constexpr (DIV == KL) {
    u = lpq; v = one - p / q;
  } else if constexpr (DIV == REVERSE_KL) {
    u = one - q / p; v = -lpq;
  } else if constexpr (DIV == SYMMETRIC_KL) {
    u = half * (lpq + one - q / p); v = half * (one - lpq - p / q);
  } else {
    u = half * log_fn(two * p / (p + q)); v = half * log_fn(two * q / (p + q));
  }
}

// What a pass computes, as compile-time flags: with runtime flags the loop keeps branches (and
// conditional stores) that stop the CPU compiler from vectorising it.
template <bool STATS, bool GRAD_X, bool GRAD_Y>
struct PassKind {
  static constexpr bool stats = STATS, grad_x = GRAD_X, grad_y = GRAD_Y;
};

// The kernel values of a pair from its cosines (x side, y side): K' ("ka"), K ("kb") and
// log(K'/K), the pair's part of every log(p/q) (the row's part is log(B/A)).
template <typename T>
struct PairKernel {
  T ka, kb, lab;
};

template <typename T, typename Log>
D2SM_INLINE PairKernel<T> pair_kernel(T cos_x, T cos_y, T eps, Log log_fn) {
  const T half = T(0.5), zero = T(0), one = T(1);
  T ka = half + half * cos_x;
  T kb = half + half * cos_y;
  ka = (ka > zero ? ka : zero) + eps;
  kb = (kb > zero ? kb : zero) + eps;
  const bool pos = ka > zero && kb > zero;  // false only with eps = 0 and antipodal rows
  return {ka, kb, pos ? log_fn(pos ? ka / kb : one) : zero};
}

// One pair's terms of a row's sums, from p, q and lpq = log(p/q); zero when !keep. p·u and q·v
// with pair_weights' centred u, v.
template <int DIV, typename T, typename Log>
D2SM_INLINE RowSums<T> stat_terms(T p, T q, T lpq, bool keep, Log log_fn) {
  const T half = T(0.5), zero = T(0), one = T(1), two = T(2);
  T tf, tpu, tqv;
  if constexpr (DIV == KL) {
    tf = p > zero ? p * lpq : zero; tpu = tf; tqv = q - p;
  } else if constexpr (DIV == REVERSE_KL) {
    tf = q > zero ? -q * lpq : zero; tpu = p - q; tqv = tf;
  } else if constexpr (DIV == SYMMETRIC_KL) {
    tf = half * (p - q) * lpq;
    tpu = half * ((p > zero ? p * lpq : zero) + p - q);
    tqv = half * ((q > zero ? -q * lpq : zero) + q - p);
  } else {
    const T s = p + q;
    const T lpm = p > zero ? log_fn(p > zero ? two * p / s : one) : zero;  // log(p/m)
    const T lqm = q > zero ? log_fn(q > zero ? two * q / s : one) : zero;  // log(q/m)
    tpu = half * p * lpm;
    tqv = half * q * lqm;
    tf = tpu + tqv;
  }
  return {keep ? tf : zero, keep ? tpu : zero, keep ? tqv : zero};
}

// The pair (i, j) of a panel (raw Gram entries, row i against every column j): returns its terms
// of row i's sums (zeros unless Kind::stats) and overwrites the raw Gram entries with
// W'_ij = (α_i u_ij + α_j u_ji)·r_j (x side) and (β_i v_ij + β_j v_ji)·r_j (y side) for the sides
// in Kind::grad_x / grad_y; u_ji comes from the same K'_ij, K_ij, as both kernels are symmetric.
// `keep` is false for the excluded diagonal (its W' is 0 and it adds nothing). Branch-free
// (selects only) so that the CPU loop vectorises; `0·log 0 = 0` is kept by the selects.
template <int DIV, typename Kind, typename T, typename Log>
D2SM_INLINE RowSums<T> epilogue_pair(T& gram_x, T& gram_y, const RowConstants<T>& ri, const Columns<T>& c, int64_t j,
                                     bool keep, T eps, Log log_fn) {
  const T zero = T(0);
  const T rxj = c.rx[j], ryj = c.ry[j];
  const PairKernel<T> k = pair_kernel(gram_x * ri.rx * rxj, gram_y * ri.ry * ryj, eps, log_fn);
  const T p = k.ka * ri.inv_a, q = k.kb * ri.inv_b;
  const T lpq = k.lab + ri.log_ba;  // log(p_ij / q_ij)
  RowSums<T> sums{zero, zero, zero};
  if constexpr (Kind::stats) sums = stat_terms<DIV>(p, q, lpq, keep, log_fn);
  if constexpr (Kind::grad_x || Kind::grad_y) {
    const T pj = k.ka * c.inv_a[j], qj = k.kb * c.inv_b[j];
    const T lpq_j = k.lab + c.log_ba[j];
    T u_ij, v_ij, u_ji, v_ji;
    pair_weights<DIV>(p, q, lpq, log_fn, u_ij, v_ij);
    pair_weights<DIV>(pj, qj, lpq_j, log_fn, u_ji, v_ji);
    if constexpr (Kind::grad_x) gram_x = keep ? (ri.alpha * u_ij + c.w_a[j] * u_ji) * rxj : zero;
    if constexpr (Kind::grad_y) gram_y = keep ? (ri.beta * v_ij + c.w_b[j] * v_ji) * ryj : zero;
  }
  return sums;
}

// The pair (i, j) of a symmetric block (cosines of normalised rows, each pair visited once):
// returns row i's terms and row j's terms (the same K'_ij, K_ij with j's normaliser) and
// overwrites the cosines with the symmetric weights S_ij = α_i u_ij + α_j u_ji (x side) and
// β_i v_ij + β_j v_ji (y side): W' without its column factor r_j, which the gradient GEMM takes
// from the normalised rows. keep_i / keep_j mask the two rows' terms, keep_pair the weights.
// Results are returned, not written through references: GCC does not vectorise an `omp simd`
// loop whose locals have their address taken.
template <typename T>
struct PairSums {
  RowSums<T> i, j;
};

template <int DIV, typename Kind, typename T, typename Log>
D2SM_INLINE PairSums<T> symmetric_pair(T& cos_x, T& cos_y, const RowConstants<T>& ri, const RowConstants<T>& rj,
                                       bool keep_i, bool keep_j, bool keep_pair, T eps, Log log_fn) {
  const T zero = T(0);
  const PairKernel<T> k = pair_kernel(cos_x, cos_y, eps, log_fn);
  const T p_ij = k.ka * ri.inv_a, q_ij = k.kb * ri.inv_b, lpq_i = k.lab + ri.log_ba;
  const T p_ji = k.ka * rj.inv_a, q_ji = k.kb * rj.inv_b, lpq_j = k.lab + rj.log_ba;
  PairSums<T> sums{{zero, zero, zero}, {zero, zero, zero}};
  if constexpr (Kind::stats) {
    sums.i = stat_terms<DIV>(p_ij, q_ij, lpq_i, keep_i, log_fn);
    sums.j = stat_terms<DIV>(p_ji, q_ji, lpq_j, keep_j, log_fn);
  }
  if constexpr (Kind::grad_x || Kind::grad_y) {
    T u_ij, v_ij, u_ji, v_ji;
    pair_weights<DIV>(p_ij, q_ij, lpq_i, log_fn, u_ij, v_ij);
    pair_weights<DIV>(p_ji, q_ji, lpq_j, log_fn, u_ji, v_ji);
    if constexpr (Kind::grad_x) cos_x = keep_pair ? ri.alpha * u_ij + rj.alpha * u_ji : zero;
    if constexpr (Kind::grad_y) cos_y = keep_pair ? ri.beta * v_ij + rj.beta * v_ji : zero;
  }
  return sums;
}

// Calls fn(std::integral_constant<int, DIV>{}, PassKind<...>{}) for runtime values (host code);
// nothing when neither statistics nor a gradient is asked.
template <typename Fn>
void dispatch_pass(int div, bool stats, bool grad_x, bool grad_y, Fn&& fn) {
  auto with_div = [&](auto kind) {
    switch (div) {
      case KL: return fn(std::integral_constant<int, KL>{}, kind);
      case REVERSE_KL: return fn(std::integral_constant<int, REVERSE_KL>{}, kind);
      case SYMMETRIC_KL: return fn(std::integral_constant<int, SYMMETRIC_KL>{}, kind);
      default: return fn(std::integral_constant<int, JS>{}, kind);
    }
  };
  const int code = (stats ? 4 : 0) | (grad_x ? 2 : 0) | (grad_y ? 1 : 0);
  switch (code) {
    case 0: return;  // nothing asked
    case 1: return with_div(PassKind<false, false, true>{});
    case 2: return with_div(PassKind<false, true, false>{});
    case 3: return with_div(PassKind<false, true, true>{});
    case 4: return with_div(PassKind<true, false, false>{});
    case 5: return with_div(PassKind<true, false, true>{});
    case 6: return with_div(PassKind<true, true, false>{});
    default: return with_div(PassKind<true, true, true>{});
  }
}

// Normalisation backward, step 1 of a live row: the gradient with respect to x̂ from the
// pairwise sum G (panel GEMM), c = α_k ū_k, s = Σ_j x̂_j, t = Σ_j α_j ū_j x̂_j:
//   g = ½G − ½c·s − ½t (+ c·x̂ with exclude_self, passed as self = c·r_k).
template <typename T>
D2SM_INLINE T xhat_grad(T pairwise, T x, T s, T t, T c, T self) {
  return T(0.5) * (pairwise - c * s - t) + self * x;
}

// Step 2: ∂L/∂x = r (g − x̂ (x̂·g)), with x̂ = r·x and dot = x̂·g.
template <typename T>
D2SM_INLINE T project_out(T g, T x, T r, T dot) {
  return r * (g - (x * r) * dot);
}

}  // namespace d2sm_ext
