// d2sm_ext C++ extension: op schemas (TORCH_LIBRARY) and the fused CPU kernel.
//
// The math is DESIGN §2; the scheme is the one of the Triton backend (d2sm_ext/triton_backend.py):
//   1. O(M·d): inverse norms r, s = Σ_j x̂_j, closed-form normalisers A_i, B_i.
//   2. Panels of R rows against all M columns: two Gram panels (x and y) with BLAS (at::mm on the
//      raw rows; r_i r_j is applied in the epilogue, so no normalised copy and no copy of the
//      memory rows), then one parallel pass over the panel that accumulates the row sums
//      F_i, ū_i = Σ_j p_ij u_ij, v̄_i = Σ_j q_ij v_ij and, for live rows that need a gradient,
//      overwrites the Gram panel with W'_ij = (α_i u_ij + α_j u_ji)·r_j; a third BLAS product
//      W'·X gives the pairwise gradient sums of the panel's rows.
//   3. O(M·d): the remaining gradient terms and the normalisation backward.
// Extra memory: O(M) statistics, the R×M panels (R bounded so they stay ≤ 64 MiB), and O(N·d)
// gradient temporaries. Deterministic for a given thread count: every output element has one
// writer and a fixed summation order (BLAS included, for a fixed thread count).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>

extern "C" {
// `import d2sm_ext._C` loads this library (and with it the TORCH_LIBRARY registrations below).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace d2sm_ext {

using at::Tensor;

enum Divergence { KL = 0, REVERSE_KL = 1, SYMMETRIC_KL = 2, JS = 3 };

static int divergence_code(const std::string& name) {
  if (name == "kl") return KL;
  if (name == "reverse_kl") return REVERSE_KL;
  if (name == "symmetric_kl") return SYMMETRIC_KL;
  if (name == "js") return JS;
  TORCH_CHECK(false, "divergence must be kl, reverse_kl, symmetric_kl or js, got ", name);
}

// Inputs as (B, rows, d) tensors in the compute dtype (float32 for half types).
struct Problem {
  Tensor x, y, xm, ym;  // xm/ym undefined when there are no memory rows
  int64_t B, N, Q, M, D;
  at::ScalarType dtype;
};

static Tensor as3d(const Tensor& t, at::ScalarType dtype) {
  Tensor u = t.dim() == 2 ? t.unsqueeze(0) : t;
  return u.to(dtype).contiguous();
}

static Problem prepare(const Tensor& x, const Tensor& y, const std::optional<Tensor>& xm,
                       const std::optional<Tensor>& ym) {
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, "x must be (M, d) or (B, M, d), got ", x.sizes());
  TORCH_CHECK(x.sizes() == y.sizes(), "x and y must have the same shape, got ", x.sizes(), " and ", y.sizes());
  TORCH_CHECK(x.is_floating_point() && x.scalar_type() == y.scalar_type(), "x and y: same floating dtype");
  TORCH_CHECK(xm.has_value() == ym.has_value(), "x_memory and y_memory must be given together");
  Problem p;
  p.dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  p.x = as3d(x, p.dtype);
  p.y = as3d(y, p.dtype);
  p.B = p.x.size(0);
  p.N = p.x.size(1);
  p.D = p.x.size(2);
  p.Q = 0;
  if (xm.has_value() && xm->numel() > 0) {
    p.xm = as3d(*xm, p.dtype);
    p.ym = as3d(*ym, p.dtype);
    TORCH_CHECK(p.xm.size(0) == p.B && p.xm.size(2) == p.D && p.xm.sizes() == p.ym.sizes(),
                "memory rows must be (Q, d) or (B, Q, d) matching x");
    p.Q = p.xm.size(1);
  }
  p.M = p.N + p.Q;
  return p;
}

// Rows of the sample set: live rows then memory rows (views, no copy).
static Tensor segment(const Problem& p, bool is_y, bool memory) {
  if (memory) return is_y ? p.ym : p.xm;
  return is_y ? p.y : p.x;
}

static Tensor inv_norms(const Problem& p, bool is_y) {
  auto one = [](const Tensor& t) {
    Tensor n = at::linalg_vector_norm(t, 2, {-1});
    return at::where(n > 0, 1.0 / at::where(n > 0, n, at::ones_like(n)), at::zeros_like(n));
  };
  Tensor r = one(segment(p, is_y, false));
  if (p.Q) r = at::cat({r, one(segment(p, is_y, true))}, 1);
  return r.contiguous();
}

// Σ_j weights[b, j] · row_j over both segments: (B, d).
static Tensor weighted_rows(const Problem& p, bool is_y, const Tensor& weights) {
  Tensor out = at::bmm(weights.narrow(1, 0, p.N).unsqueeze(1), segment(p, is_y, false)).squeeze(1);
  if (p.Q) out = out + at::bmm(weights.narrow(1, p.N, p.Q).unsqueeze(1), segment(p, is_y, true)).squeeze(1);
  return out;
}

// Closed-form A_i (DESIGN §2 fact 1); eps added last so it is not rounded away (see Triton code).
static Tensor normalisers(const Problem& p, bool is_y, const Tensor& r, const Tensor& s, bool exclude_self, double eps) {
  Tensor dots = at::bmm(segment(p, is_y, false), s.unsqueeze(2)).squeeze(2);
  if (p.Q) dots = at::cat({dots, at::bmm(segment(p, is_y, true), s.unsqueeze(2)).squeeze(2)}, 1);
  const double n_neigh = exclude_self ? double(p.M - 1) : double(p.M);
  Tensor half_sum = 0.5 * n_neigh + 0.5 * dots * r;
  if (exclude_self) half_sum = half_sum - 0.5 * (r > 0).to(half_sum.scalar_type());
  return (half_sum.clamp_min(0.0) + n_neigh * eps).contiguous();
}

struct RowStats {
  Tensor rx, ry, a, b, s_x, s_y;
};

static RowStats row_statistics(const Problem& p, bool exclude_self, double eps) {
  RowStats st;
  st.rx = inv_norms(p, false);
  st.ry = inv_norms(p, true);
  st.s_x = weighted_rows(p, false, st.rx);
  st.s_y = weighted_rows(p, true, st.ry);
  st.a = normalisers(p, false, st.rx, st.s_x, exclude_self, eps);
  st.b = normalisers(p, true, st.ry, st.s_y, exclude_self, eps);
  return st;
}

// log for the epilogue: Cephes' single-precision polynomial (≈1 ulp on normal positive inputs)
// written without branches or library calls so that the compiler vectorises the pair loop;
// std::log for double (the float64 path is for gradcheck, not speed).
static inline float log_t(float x) {
  int32_t ix;
  std::memcpy(&ix, &x, sizeof ix);
  float e = float(((ix >> 23) & 0xff) - 126);
  ix = (ix & 0x007fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  float m;
  std::memcpy(&m, &ix, sizeof m);
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  const float f = small ? m + m - 1.0f : m - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return f + y + 0.693359375f * e;
}
static inline double log_t(double x) { return std::log(x); }

// Per-row arrays (B, M), row-major, used by the panel epilogue, in the compute type.
template <typename T>
struct Columns {
  const T *rx, *ry, *inv_a, *inv_b, *log_ba, *w_a, *w_b;  // log_ba = log(B/A), w_a = w/A, w_b = w/B
  Columns shifted(int64_t by) const {
    return {rx + by, ry + by, inv_a + by, inv_b + by, log_ba + by, w_a + by, w_b + by};
  }
};

// The epilogue over a panel of bc problems × nr rows: panel row (k, i) is sample row row0 + i of
// problem b0 + k; sx/sy hold the raw Gram panel (bc·nr × M, live columns then memory columns)
// and are overwritten with W' when gradients are wanted. Pair terms in T (fp32 for float inputs, like the Triton kernel),
// row sums in double; the j loop is branch-free (selects) so that it vectorises.
// Logs are taken of well-conditioned quantities: log(p/q) = log(K'/K) + log(B_i/A_i) (both
// terms small or exact per row) instead of log p − log q (two ~log M numbers that cancel).
template <typename T, int DIV>
static void panel_epilogue(T* sx, T* sy, int64_t bc, int64_t nr, int64_t b0, int64_t row0, int64_t M,
                           const Columns<T>& all, bool exclude_self, double eps_d, bool want_stats, bool grad_x,
                           bool grad_y, T* f_all, T* pu_all, T* qv_all) {
  const T eps = T(eps_d), half = T(0.5), zero = T(0), one = T(1), two = T(2);
  at::parallel_for(0, bc * nr, 8, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = b0 + row / nr, i = row % nr;
      const Columns<T> c = all.shifted(b * M);
      T* f_out = want_stats ? f_all + b * M : nullptr;
      T* pu_out = want_stats ? pu_all + b * M : nullptr;
      T* qv_out = want_stats ? qv_all + b * M : nullptr;
      const int64_t gi = row0 + i;
      const int64_t skip = exclude_self ? gi : -1;
      const T rxi = c.rx[gi], ryi = c.ry[gi], log_ba_i = c.log_ba[gi];
      const T inv_ai = c.inv_a[gi], inv_bi = c.inv_b[gi], alpha_i = c.w_a[gi], beta_i = c.w_b[gi];
      T* __restrict__ row_x = sx + row * M;
      T* __restrict__ row_y = sy + row * M;
      double f = 0, pu = 0, qv = 0;
#pragma omp simd reduction(+ : f, pu, qv)
      for (int64_t j = 0; j < M; ++j) {
        const bool keep = j != skip;
        const T ka = std::max(half + half * (row_x[j] * rxi * c.rx[j]), zero) + eps;
        const T kb = std::max(half + half * (row_y[j] * ryi * c.ry[j]), zero) + eps;
        const bool pos = ka > zero && kb > zero;  // false only with eps = 0 and antipodal rows
        const T lab = pos ? log_t(pos ? ka / kb : one) : zero;  // log(K'/K)
        const T p = ka * inv_ai, q = kb * inv_bi;
        const T lpq = lab + log_ba_i;  // log(p_ij / q_ij)
        if (want_stats) {
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
            const T lpm = p > zero ? log_t(p > zero ? two * p / s : one) : zero;  // log(p/m)
            const T lqm = q > zero ? log_t(q > zero ? two * q / s : one) : zero;  // log(q/m)
            tpu = half * p * lpm;
            tqv = half * q * lqm;
            tf = tpu + tqv;
          }
          f += keep ? double(tf) : 0.0;
          pu += keep ? double(tpu) : 0.0;
          qv += keep ? double(tqv) : 0.0;
        }
        if (grad_x || grad_y) {
          // Row i's weights (u_ij, v_ij) and, as K' and K are symmetric, column j's (u_ji, v_ji).
          const T pj = ka * c.inv_a[j], qj = kb * c.inv_b[j];
          const T lpq_j = lab + c.log_ba[j];
          T u_ij, v_ij, u_ji, v_ji;
          if constexpr (DIV == KL) {
            u_ij = lpq; v_ij = -p / q; u_ji = lpq_j; v_ji = -pj / qj;
          } else if constexpr (DIV == REVERSE_KL) {
            u_ij = -q / p; v_ij = -lpq; u_ji = -qj / pj; v_ji = -lpq_j;
          } else if constexpr (DIV == SYMMETRIC_KL) {
            u_ij = half * (lpq - q / p); v_ij = half * (-lpq - p / q);
            u_ji = half * (lpq_j - qj / pj); v_ji = half * (-lpq_j - pj / qj);
          } else {
            u_ij = half * log_t(two * p / (p + q)); v_ij = half * log_t(two * q / (p + q));
            u_ji = half * log_t(two * pj / (pj + qj)); v_ji = half * log_t(two * qj / (pj + qj));
          }
          if (grad_x) row_x[j] = keep ? (alpha_i * u_ij + c.w_a[j] * u_ji) * c.rx[j] : zero;
          if (grad_y) row_y[j] = keep ? (beta_i * v_ij + c.w_b[j] * v_ji) * c.ry[j] : zero;
        }
      }
      if (want_stats) {
        f_out[gi] = T(f);
        pu_out[gi] = T(pu);
        qv_out[gi] = T(qv);
      }
    }
  });
}

template <typename T>
static void dispatch_epilogue(int div, T* sx, T* sy, int64_t bc, int64_t nr, int64_t b0, int64_t row0, int64_t M,
                              const Columns<T>& c, bool excl, double eps, bool stats, bool gx, bool gy, T* f, T* pu,
                              T* qv) {
  switch (div) {
    case KL: return panel_epilogue<T, KL>(sx, sy, bc, nr, b0, row0, M, c, excl, eps, stats, gx, gy, f, pu, qv);
    case REVERSE_KL:
      return panel_epilogue<T, REVERSE_KL>(sx, sy, bc, nr, b0, row0, M, c, excl, eps, stats, gx, gy, f, pu, qv);
    case SYMMETRIC_KL:
      return panel_epilogue<T, SYMMETRIC_KL>(sx, sy, bc, nr, b0, row0, M, c, excl, eps, stats, gx, gy, f, pu, qv);
    default: return panel_epilogue<T, JS>(sx, sy, bc, nr, b0, row0, M, c, excl, eps, stats, gx, gy, f, pu, qv);
  }
}

// Raw Gram panel (bc, nr, M) of `rows_x` (bc, nr, d) against both segments of problems b0…b0+bc.
static void gram_panel(const Problem& p, bool is_y, int64_t b0, int64_t bc, const Tensor& rows_x, const Tensor& out) {
  // bmm into column slices of the panel: BLAS writes the strided views directly (ldc = M).
  Tensor head = out.narrow(2, 0, p.N);
  at::bmm_out(head, rows_x, segment(p, is_y, false).narrow(0, b0, bc).transpose(1, 2));
  if (p.Q) {
    Tensor tail = out.narrow(2, p.N, p.Q);
    at::bmm_out(tail, rows_x, segment(p, is_y, true).narrow(0, b0, bc).transpose(1, 2));
  }
}

static void grad_panel(const Problem& p, bool is_y, int64_t b0, int64_t bc, const Tensor& w_panel, Tensor g_rows) {
  at::bmm_out(g_rows, w_panel.narrow(2, 0, p.N), segment(p, is_y, false).narrow(0, b0, bc));
  if (p.Q) g_rows.add_(at::bmm(w_panel.narrow(2, p.N, p.Q), segment(p, is_y, true).narrow(0, b0, bc)));
}

// Panel rows: the two (rows × M) panels stay within 64 MiB; small problems are batched so that a
// panel holds several whole problems (one bmm per chunk instead of a GEMM call per problem).
static int64_t panel_rows(int64_t M, int64_t element_size) {
  const int64_t budget = int64_t(64) << 20;
  return std::max<int64_t>(budget / std::max<int64_t>(2 * M * element_size, 1), 16);
}

// Pairwise pass over all problems. Returns stats (3, B, M) [F, ū, v̄] when want_stats; writes the
// pairwise gradient sums of the live rows into gx/gy (B, N, d) when they are defined.
static Tensor pair_pass(const Problem& p, const RowStats& st, const Tensor& w, int div, bool exclude_self, double eps,
                        bool want_stats, Tensor gx, Tensor gy) {
  const auto opts = p.x.options();
  Tensor stats = want_stats ? at::zeros({3, p.B, p.M}, opts) : Tensor();
  const int64_t R = panel_rows(p.M, p.x.element_size());
  // 1/A, 1/B, log(B/A) (in double: a per-row constant that must not cancel), w/A, w/B (B, M each).
  Tensor log_ba = (st.b.to(at::kDouble) / st.a.to(at::kDouble)).log().to(p.dtype);
  Tensor cols = at::stack({st.a.reciprocal(), st.b.reciprocal(), log_ba, w / st.a, w / st.b}).contiguous();
  for (int seg = 0; seg < (want_stats && p.Q ? 2 : 1); ++seg) {
    const bool memory = seg == 1;
    const int64_t rows = memory ? p.Q : p.N, offset = memory ? p.N : 0;
    if (rows == 0) continue;
    const int64_t nr_max = std::min(R, rows);
    const int64_t bc_max = std::max<int64_t>(1, std::min(p.B, R / nr_max));
    Tensor sx = at::empty({bc_max, nr_max, p.M}, opts), sy = at::empty({bc_max, nr_max, p.M}, opts);
    const bool gx_here = !memory && gx.defined(), gy_here = !memory && gy.defined();
    for (int64_t b0 = 0; b0 < p.B; b0 += bc_max) {
      const int64_t bc = std::min(bc_max, p.B - b0);
      for (int64_t r0 = 0; r0 < rows; r0 += nr_max) {
        const int64_t nr = std::min(nr_max, rows - r0);
        Tensor px = sx.narrow(0, 0, bc).narrow(1, 0, nr), py = sy.narrow(0, 0, bc).narrow(1, 0, nr);
        if (nr < nr_max) {  // keep the panel contiguous: (bc, nr, M) views of the buffer's start
          px = sx.view(-1).narrow(0, 0, bc * nr * p.M).view({bc, nr, p.M});
          py = sy.view(-1).narrow(0, 0, bc * nr * p.M).view({bc, nr, p.M});
        }
        gram_panel(p, false, b0, bc, segment(p, false, memory).narrow(0, b0, bc).narrow(1, r0, nr), px);
        gram_panel(p, true, b0, bc, segment(p, true, memory).narrow(0, b0, bc).narrow(1, r0, nr), py);
        AT_DISPATCH_FLOATING_TYPES(p.dtype, "d2sm_panel_epilogue", [&] {
          Columns<scalar_t> c{st.rx.data_ptr<scalar_t>(), st.ry.data_ptr<scalar_t>(), cols[0].data_ptr<scalar_t>(),
                              cols[1].data_ptr<scalar_t>(), cols[2].data_ptr<scalar_t>(), cols[3].data_ptr<scalar_t>(),
                              cols[4].data_ptr<scalar_t>()};
          scalar_t* f = want_stats ? stats[0].data_ptr<scalar_t>() : nullptr;
          scalar_t* pu = want_stats ? stats[1].data_ptr<scalar_t>() : nullptr;
          scalar_t* qv = want_stats ? stats[2].data_ptr<scalar_t>() : nullptr;
          dispatch_epilogue<scalar_t>(div, px.data_ptr<scalar_t>(), py.data_ptr<scalar_t>(), bc, nr, b0, offset + r0,
                                      p.M, c, exclude_self, eps, want_stats, gx_here, gy_here, f, pu, qv);
        });
        if (gx_here) grad_panel(p, false, b0, bc, px, gx.narrow(0, b0, bc).narrow(1, r0, nr));
        if (gy_here) grad_panel(p, true, b0, bc, py, gy.narrow(0, b0, bc).narrow(1, r0, nr));
      }
    }
  }
  return stats;
}

// Step 3: ∂L/∂x from the pairwise sums (see d2sm_ext/triton_backend.py for the derivation), in
// place and in one pass per row: g = ½G − ½c·s − ½t (+ c·x̂ with exclude_self), c = α ū, then
// ∂L/∂x = r (g − x̂ (x̂·g)). `pairwise` (B, N, d) is overwritten with the result.
static Tensor finish_grad(const Problem& p, bool is_y, Tensor pairwise, const Tensor& r, const Tensor& norm,
                          const Tensor& w, const Tensor& bar, const Tensor& s, bool exclude_self) {
  Tensor coef = (w / norm * bar).contiguous();                      // α_j ū_j (B, M)
  Tensor t = weighted_rows(p, is_y, coef * r).contiguous();         // Σ_j α_j ū_j x̂_j (B, d)
  Tensor live = segment(p, is_y, false);
  Tensor s_c = s.contiguous();
  const int64_t N = p.N, D = p.D, M = p.M;
  AT_DISPATCH_FLOATING_TYPES(p.dtype, "d2sm_finish_grad", [&] {
    scalar_t* g_all = pairwise.data_ptr<scalar_t>();
    const scalar_t* x_all = live.data_ptr<scalar_t>();
    const scalar_t *r_all = r.data_ptr<scalar_t>(), *c_all = coef.data_ptr<scalar_t>();
    const scalar_t *s_all = s_c.data_ptr<scalar_t>(), *t_all = t.data_ptr<scalar_t>();
    at::parallel_for(0, p.B * N, 4, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / N, k = row % N;
        scalar_t* g = g_all + row * D;
        const scalar_t* x = x_all + row * D;
        const scalar_t* sb = s_all + b * D;
        const scalar_t* tb = t_all + b * D;
        const scalar_t rk = r_all[b * M + k], ck = c_all[b * M + k];
        const scalar_t self = exclude_self ? ck * rk : scalar_t(0);
        double dot = 0;  // x̂·g
        _Pragma("omp simd reduction(+ : dot)")  // _Pragma: this code sits inside a macro argument
        for (int64_t j = 0; j < D; ++j) {
          const scalar_t v = scalar_t(0.5) * (g[j] - ck * sb[j] - tb[j]) + self * x[j];
          g[j] = v;
          dot += double(v) * double(x[j] * rk);
        }
        const scalar_t dk = scalar_t(dot);
        _Pragma("omp simd")
        for (int64_t j = 0; j < D; ++j) g[j] = rk * (g[j] - (x[j] * rk) * dk);
      }
    });
  });
  return pairwise;
}

static Tensor grad_or_empty(const Tensor& g, const Tensor& like, at::ScalarType dtype) {
  if (!g.defined()) return at::empty({0}, like.options().dtype(dtype));
  return g.reshape(like.sizes());
}

static std::tuple<Tensor, Tensor> gradients(const Problem& p, const RowStats& st, const Tensor& w, int div,
                                            bool exclude_self, double eps, bool need_gx, bool need_gy,
                                            bool want_stats, const Tensor& pu, const Tensor& qv, Tensor* stats_out) {
  // every row is written exactly once by its panel's bmm: no zero fill needed
  Tensor gx = need_gx ? at::empty({p.B, p.N, p.D}, p.x.options()) : Tensor();
  Tensor gy = need_gy ? at::empty({p.B, p.N, p.D}, p.x.options()) : Tensor();
  Tensor stats = pair_pass(p, st, w, div, exclude_self, eps, want_stats, gx, gy);
  if (stats_out) *stats_out = stats;
  Tensor ubar = want_stats ? stats[1] : pu, vbar = want_stats ? stats[2] : qv;
  if (need_gx) gx = finish_grad(p, false, gx, st.rx, st.a, w, ubar, st.s_x, exclude_self);
  if (need_gy) gy = finish_grad(p, true, gy, st.ry, st.b, w, vbar, st.s_y, exclude_self);
  return {gx, gy};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> fused_forward_cpu(
    const Tensor& x, const Tensor& y, const std::optional<Tensor>& x_memory, const std::optional<Tensor>& y_memory,
    std::string divergence, bool exclude_self, double eps, bool tf32, std::string reduction, bool need_gx,
    bool need_gy) {
  (void)tf32;  // CPU matmuls are full precision
  const int div = divergence_code(divergence);
  TORCH_CHECK(reduction == "mean" || reduction == "sum" || reduction == "none", "bad reduction ", reduction);
  Problem p = prepare(x, y, x_memory, y_memory);
  RowStats st = row_statistics(p, exclude_self, eps);
  const bool fused = reduction != "none" && (need_gx || need_gy);
  const double scale = reduction == "mean" ? 1.0 / double(p.B * p.M) : 1.0;
  Tensor w = at::full({p.B, p.M}, scale, p.x.options());
  Tensor stats;
  auto [gx, gy] = gradients(p, st, w, div, exclude_self, eps, need_gx && fused, need_gy && fused, true, Tensor(),
                            Tensor(), &stats);
  Tensor rows = stats[0];
  Tensor value;
  if (reduction == "mean") value = rows.mean();
  else if (reduction == "sum") value = rows.sum();
  else value = x.dim() == 3 ? rows : rows[0];
  Tensor saved = at::stack({st.rx, st.ry, st.a, st.b, stats[1], stats[2]});
  return {value.to(x.scalar_type()).clone(), saved, grad_or_empty(gx, x, p.dtype), grad_or_empty(gy, y, p.dtype)};
}

std::tuple<Tensor, Tensor> fused_backward_cpu(const Tensor& x, const Tensor& y, const std::optional<Tensor>& x_memory,
                                              const std::optional<Tensor>& y_memory, const Tensor& saved,
                                              const Tensor& grad_rows, std::string divergence, bool exclude_self,
                                              double eps, bool tf32, bool need_gx, bool need_gy) {
  (void)tf32;
  const int div = divergence_code(divergence);
  Problem p = prepare(x, y, x_memory, y_memory);
  TORCH_CHECK(saved.dim() == 3 && saved.size(0) == 6 && saved.size(1) == p.B && saved.size(2) == p.M,
              "saved statistics must be (6, B, M)");
  Tensor sv = saved.to(p.dtype).contiguous();
  RowStats st;
  st.rx = sv[0].contiguous();
  st.ry = sv[1].contiguous();
  st.a = sv[2].contiguous();
  st.b = sv[3].contiguous();
  st.s_x = weighted_rows(p, false, st.rx);
  st.s_y = weighted_rows(p, true, st.ry);
  Tensor w = grad_rows.reshape({p.B, p.M}).to(p.dtype).contiguous();
  auto [gx, gy] = gradients(p, st, w, div, exclude_self, eps, need_gx, need_gy, false, sv[4], sv[5], nullptr);
  return {grad_or_empty(gx, x, p.dtype), grad_or_empty(gy, y, p.dtype)};
}

TORCH_LIBRARY(d2sm_ext, m) {
  m.def("fused_forward(Tensor x, Tensor y, Tensor? x_memory, Tensor? y_memory, str divergence, bool exclude_self, "
        "float eps, bool tf32, str reduction, bool need_gx, bool need_gy) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("fused_backward(Tensor x, Tensor y, Tensor? x_memory, Tensor? y_memory, Tensor saved, Tensor grad_rows, "
        "str divergence, bool exclude_self, float eps, bool tf32, bool need_gx, bool need_gy) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(d2sm_ext, CPU, m) {
  m.impl("fused_forward", &fused_forward_cpu);
  m.impl("fused_backward", &fused_backward_cpu);
}

}  // namespace d2sm_ext
