// The per-pair and per-row arithmetic of the fused D2SM pass (DESIGN §2), written once and
// compiled twice: into the CPU loops of d2sm.cpp (vectorised by the compiler) and into the CUDA
// kernels of d2sm_cuda.cu. Only the iteration and the reductions differ between the two, so the
// CPU tests (parity with the reference, gradcheck) exercise every formula the GPU runs.
//
// Notation (d2sm.cpp's header comment has the scheme): for row i and column j of a panel,
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

// u_ij = ∂f_i/∂p_ij and v_ij = ∂f_i/∂q_ij for row i's divergence f_i (see triton_backend.py).
template <int DIV, typename T, typename Log>
D2SM_INLINE void pair_weights(T p, T q, T lpq, Log log_fn, T& u, T& v) {
  const T half = T(0.5), two = T(2);
  if constexpr (DIV == KL) {
    u = lpq; v = -p / q;
  } else if constexpr (DIV == REVERSE_KL) {
    u = -q / p; v = -lpq;
  } else if constexpr (DIV == SYMMETRIC_KL) {
    u = half * (lpq - q / p); v = half * (-lpq - p / q);
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

// The pair (i, j) of a panel: returns its terms of row i's sums (zeros unless Kind::stats) and
// overwrites the raw Gram entries with W'_ij = (α_i u_ij + α_j u_ji)·r_j (x side) and
// (β_i v_ij + β_j v_ji)·r_j (y side) for the sides in Kind::grad_x / grad_y; u_ji comes from the
// same K'_ij, K_ij, as both kernels are symmetric. `keep` is false for the excluded diagonal (its
// W' is 0 and it adds nothing). Branch-free (selects only) so that the CPU loop vectorises;
// `0·log 0 = 0` is kept by the selects.
template <int DIV, typename Kind, typename T, typename Log>
D2SM_INLINE RowSums<T> epilogue_pair(T& gram_x, T& gram_y, const RowConstants<T>& ri, const Columns<T>& c, int64_t j,
                                     bool keep, T eps, Log log_fn) {
  RowSums<T> sums{T(0), T(0), T(0)};
  const T half = T(0.5), zero = T(0), one = T(1), two = T(2);
  const T rxj = c.rx[j], ryj = c.ry[j];
  T ka = half + half * (gram_x * ri.rx * rxj);
  T kb = half + half * (gram_y * ri.ry * ryj);
  ka = (ka > zero ? ka : zero) + eps;
  kb = (kb > zero ? kb : zero) + eps;
  const bool pos = ka > zero && kb > zero;  // false only with eps = 0 and antipodal rows
  const T lab = pos ? log_fn(pos ? ka / kb : one) : zero;  // log(K'/K)
  const T p = ka * ri.inv_a, q = kb * ri.inv_b;
  const T lpq = lab + ri.log_ba;  // log(p_ij / q_ij)
  if constexpr (Kind::stats) {
    T tf, tpu, tqv;
    if constexpr (DIV == KL) {
      tf = p > zero ? p * lpq : zero; tpu = tf; tqv = -p;
    } else if constexpr (DIV == REVERSE_KL) {
      tf = q > zero ? -q * lpq : zero; tpu = -q; tqv = tf;
    } else if constexpr (DIV == SYMMETRIC_KL) {
      tf = half * (p - q) * lpq;
      tpu = half * ((p > zero ? p * lpq : zero) - q);
      tqv = half * ((q > zero ? -q * lpq : zero) - p);
    } else {
      const T s = p + q;
      const T lpm = p > zero ? log_fn(p > zero ? two * p / s : one) : zero;  // log(p/m)
      const T lqm = q > zero ? log_fn(q > zero ? two * q / s : one) : zero;  // log(q/m)
      tpu = half * p * lpm;
      tqv = half * q * lqm;
      tf = tpu + tqv;
    }
    sums.f = keep ? tf : zero;
    sums.pu = keep ? tpu : zero;
    sums.qv = keep ? tqv : zero;
  }
  if constexpr (Kind::grad_x || Kind::grad_y) {
    const T pj = ka * c.inv_a[j], qj = kb * c.inv_b[j];
    const T lpq_j = lab + c.log_ba[j];
    T u_ij, v_ij, u_ji, v_ji;
    pair_weights<DIV>(p, q, lpq, log_fn, u_ij, v_ij);
    pair_weights<DIV>(pj, qj, lpq_j, log_fn, u_ji, v_ji);
    if constexpr (Kind::grad_x) gram_x = keep ? (ri.alpha * u_ij + c.w_a[j] * u_ji) * rxj : zero;
    if constexpr (Kind::grad_y) gram_y = keep ? (ri.beta * v_ij + c.w_b[j] * v_ji) * ryj : zero;
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
