// d2sm_ext C++ extension: op schemas (TORCH_LIBRARY), the device-generic driver of the fused
// pass, and its CPU kernels (the CUDA kernels are in d2sm_cuda.cu; the per-pair math both share
// is csrc/pair_math.h).
//
// The math is DESIGN §2. Two passes share the steps before and after the pairwise work:
//   1. O(M·d): inverse norms r, s = Σ_j x̂_j, closed-form normalisers A_i, B_i.
//   2a. CPU, M > 512: symmetric blocks. Each pair (i, j) is visited once, in Gram blocks of
//      normalised rows for block pairs I ≤ J; one vectorised pass per block accumulates row i's
//      and row j's sums F, ū = Σ p·u, v̄ = Σ q·v and leaves the symmetric weights S_ij, and two
//      BLAS products G_I += S·X̂_J, G_J += Sᵀ·X̂_I give the pairwise gradient sums
//      (see symmetric_pass_cpu).
//   2b. CUDA, and CPU with M ≤ 512 (one block; see use_symmetric_pass): the
//      Triton backend's panel scheme. Panels of R rows against all M columns: two Gram panels
//      with cuBLAS/BLAS (at::bmm on the raw rows; r_i r_j is applied in the epilogue, so no
//      normalised copy and no copy of the memory rows), then one parallel pass over the panel
//      that accumulates the row sums and, for live rows that need a gradient, overwrites the
//      panel with W'_ij = (α_i u_ij + α_j u_ji)·r_j; a third product W'·X gives the pairwise
//      gradient sums of the panel's rows.
//   3. O(M·d): the remaining gradient terms and the normalisation backward.
// Extra memory: O(M) statistics; CPU: normalised copies of the rows (O(M·d)) and two block
// buffers (512² per problem, batched problems within 64 MiB); CUDA: the R×M panels (≤ 256 MiB)
// plus, with fp16/bf16 inputs, an fp32 copy of the rows for the O(M·d) steps; and the O(N·d)
// gradients. Deterministic for a given thread count: every output element has a fixed
// summation order (BLAS included, for a fixed thread count; per-thread column sums are combined
// in thread order; on CUDA, cuBLAS is deterministic for a fixed stream and workspace config, and
// our reductions are fixed trees).
//
// Precision: the Gram and gradient GEMMs run in the input dtype — fp64, fp32 (TF32 tensor cores
// on CUDA only when the op's `tf32` flag says so), fp16/bf16 with fp32 output on CUDA (tensor
// cores, fp32 accumulation); on CPU half inputs are computed in fp32. Everything else is in the
// compute dtype (fp32 for fp32/half inputs, fp64 for fp64); row sums in fp64 on CPU (from fp32
// partial sums of at most 512 terms) and in the compute dtype's accumulate type on CUDA
// (fixed-order tree).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "d2sm.h"

extern "C" {
// `import d2sm_ext._C` loads this library (and with it the TORCH_LIBRARY registrations below).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace d2sm_ext {

using at::Tensor;

static int divergence_code(const std::string& name) {
  if (name == "kl") return KL;
  if (name == "reverse_kl") return REVERSE_KL;
  if (name == "symmetric_kl") return SYMMETRIC_KL;
  if (name == "js") return JS;
  TORCH_CHECK(false, "divergence must be kl, reverse_kl, symmetric_kl or js, got ", name);
}

// Inputs as (B, rows, d) tensors. x/y/xm/ym are in the compute dtype (fp32 for fp32 and half
// inputs, fp64 for fp64) and feed the O(M·d) steps; the *_mm tensors feed the GEMMs: the same
// tensors, except for fp16/bf16 on CUDA, where they keep the input dtype (tensor cores).
struct Problem {
  Tensor x, y, xm, ym;  // xm/ym undefined when there are no memory rows
  Tensor x_mm, y_mm, xm_mm, ym_mm;
  int64_t B, N, Q, M, D;
  at::ScalarType dtype;     // compute dtype
  at::ScalarType mm_dtype;  // GEMM operand dtype
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
  TORCH_CHECK(x.device() == y.device(), "x and y must be on the same device");
  TORCH_CHECK(xm.has_value() == ym.has_value(), "x_memory and y_memory must be given together");
  Problem p;
  const at::ScalarType in = x.scalar_type();
  p.dtype = in == at::kDouble ? at::kDouble : at::kFloat;
  const bool half_mm = x.is_cuda() && (in == at::kHalf || in == at::kBFloat16);
  p.mm_dtype = half_mm ? in : p.dtype;
  auto load = [&](const Tensor& t, Tensor& compute, Tensor& mm) {
    mm = as3d(t, p.mm_dtype);
    compute = half_mm ? mm.to(p.dtype) : mm;
  };
  load(x, p.x, p.x_mm);
  load(y, p.y, p.y_mm);
  p.B = p.x.size(0);
  p.N = p.x.size(1);
  p.D = p.x.size(2);
  p.Q = 0;
  if (xm.has_value() && xm->numel() > 0) {
    TORCH_CHECK(xm->device() == x.device() && ym->device() == x.device(), "memory rows must be on x's device");
    load(*xm, p.xm, p.xm_mm);
    load(*ym, p.ym, p.ym_mm);
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

// The same rows as GEMM operands.
static Tensor mm_segment(const Problem& p, bool is_y, bool memory) {
  if (memory) return is_y ? p.ym_mm : p.xm_mm;
  return is_y ? p.y_mm : p.x_mm;
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

// log for the CPU epilogue: Cephes' single-precision polynomial (≈1 ulp on normal positive
// inputs) written without branches or library calls so that the compiler vectorises the pair
// loop; std::log for double (the float64 path is for gradcheck, not speed).
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

struct VectorLog {
  template <typename T>
  T operator()(T x) const { return log_t(x); }
};

// CPU epilogue: one task per panel row, the columns in chunks of kSumChunk. The pair loop is
// branch-free (selects; -fno-trapping-math in setup.py lets GCC if-convert them) and writes each
// pair's terms of the row sums to small buffers; a separate loop adds them up in double. GCC does
// not vectorise the pair loop when the reduction sits inside it, and it is most of the work.
constexpr int64_t kSumChunk = 256;

template <typename T, int DIV, typename Kind>
static void panel_epilogue_rows(T* sx, T* sy, int64_t bc, int64_t nr, int64_t b0, int64_t row0, int64_t M,
                                const Columns<T>& all, bool exclude_self, double eps_d, T* f_all, T* pu_all,
                                T* qv_all) {
  const T eps = T(eps_d);
  at::parallel_for(0, bc * nr, 8, [&](int64_t begin, int64_t end) {
    alignas(64) T terms_f[kSumChunk], terms_pu[kSumChunk], terms_qv[kSumChunk];
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = b0 + row / nr, gi = row0 + row % nr;
      const Columns<T> c = all.shifted(b * M);  // a local copy: loop-invariant bases, plain vector loads
      const RowConstants<T> ri = RowConstants<T>::load(c, gi);
      const int64_t skip = exclude_self ? gi : -1;
      T* __restrict__ row_x = sx + row * M;
      T* __restrict__ row_y = sy + row * M;
      double f = 0, pu = 0, qv = 0;
      for (int64_t j0 = 0; j0 < M; j0 += kSumChunk) {
        const int64_t n = std::min(kSumChunk, M - j0);
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) {
          const int64_t j = j0 + k;
          const RowSums<T> t = epilogue_pair<DIV, Kind>(row_x[j], row_y[j], ri, c, j, j != skip, eps, VectorLog{});
          if constexpr (Kind::stats) {
            terms_f[k] = t.f;
            terms_pu[k] = t.pu;
            terms_qv[k] = t.qv;
          }
        }
        if constexpr (Kind::stats) {
          for (int64_t k = 0; k < n; ++k) {
            f += double(terms_f[k]);
            pu += double(terms_pu[k]);
            qv += double(terms_qv[k]);
          }
        }
      }
      if constexpr (Kind::stats) {
        f_all[b * M + gi] = T(f);
        pu_all[b * M + gi] = T(pu);
        qv_all[b * M + gi] = T(qv);
      }
    }
  });
}

void panel_epilogue_cpu(int div, const Tensor& px, const Tensor& py, int64_t b0, int64_t row0, const Tensor& rx,
                        const Tensor& ry, const Tensor& cols, bool exclude_self, double eps, bool grad_x, bool grad_y,
                        const Tensor& stats) {
  const int64_t bc = px.size(0), nr = px.size(1), M = px.size(2);
  AT_DISPATCH_FLOATING_TYPES(px.scalar_type(), "d2sm_panel_epilogue_cpu", [&] {
    using T = scalar_t;
    const auto ptr = PanelPointers<T>::of(px, py, rx, ry, cols, stats);
    dispatch_pass(div, stats.defined(), grad_x, grad_y, [&](auto div_tag, auto kind) {
      panel_epilogue_rows<T, decltype(div_tag)::value, decltype(kind)>(
          ptr.gram_x, ptr.gram_y, bc, nr, b0, row0, M, ptr.columns, exclude_self, eps, ptr.f, ptr.pu, ptr.qv);
    });
  });
}

// C = A·Bᵀ-style products of GEMM operands into fp32/fp64 `out` (a strided view is fine: BLAS
// and cuBLAS write it with ldc = M). Half operands (CUDA only) produce fp32 directly.
static void mm_into(Tensor out, const Tensor& a, const Tensor& b, const Problem& p) {
  if (p.mm_dtype != p.dtype) at::bmm_out(out, a, b, p.dtype);
  else at::bmm_out(out, a, b);
}

// Raw Gram panel (bc, nr, M) of `rows` (bc, nr, d) against both segments of problems b0…b0+bc.
static void gram_panel(const Problem& p, bool is_y, int64_t b0, int64_t bc, const Tensor& rows, const Tensor& out) {
  mm_into(out.narrow(2, 0, p.N), rows, mm_segment(p, is_y, false).narrow(0, b0, bc).transpose(1, 2), p);
  if (p.Q) mm_into(out.narrow(2, p.N, p.Q), rows, mm_segment(p, is_y, true).narrow(0, b0, bc).transpose(1, 2), p);
}

// Powers of two (bc, nr) that bring each row's largest |W'| into [2^13, 2^14) (1 for a zero or
// non-finite row): far below fp16's maximum, and exact to multiply and divide by in fp32.
// The Triton backend's pow2_row_scale is the same rule.
static Tensor pow2_row_scale(const Tensor& w_panel) {
  const Tensor peak = w_panel.abs().amax({2});
  const Tensor exponent = std::get<1>(at::frexp(peak));  // peak = m·2^e, m in [0.5, 1)
  const Tensor shift = (14 - exponent).clamp(-126, 126);
  const Tensor scale = at::ldexp(at::ones_like(peak), shift);
  return at::where((peak > 0).logical_and(at::isfinite(peak)), scale, at::ones_like(scale));
}

// g_rows = W'·X over both segments. For half inputs (CUDA) W' is rounded to the operand dtype;
// for fp16 each row is first scaled by a power of two (pow2_row_scale) and the product unscaled
// exactly, so the small gradient weights (~1/(B·M²) for "mean") never flush to zero.
static void grad_panel(const Problem& p, bool is_y, int64_t b0, int64_t bc, const Tensor& w_panel, Tensor g_rows) {
  const bool scaled = p.mm_dtype == at::kHalf;
  const Tensor scale = scaled ? pow2_row_scale(w_panel).unsqueeze(2) : Tensor();
  const Tensor w = (scaled ? w_panel * scale : w_panel).to(p.mm_dtype);
  mm_into(g_rows, w.narrow(2, 0, p.N), mm_segment(p, is_y, false).narrow(0, b0, bc), p);
  if (p.Q) {
    Tensor tail = at::empty_like(g_rows);
    mm_into(tail, w.narrow(2, p.N, p.Q), mm_segment(p, is_y, true).narrow(0, b0, bc), p);
    g_rows.add_(tail);
  }
  if (scaled) g_rows.div_(scale);
}

// Panel rows: the two (rows × M) panels stay within a budget (64 MiB on CPU, where they should
// stay in cache-friendly sizes; 256 MiB on CUDA, where larger GEMMs fill the device); small
// problems are batched so that a panel holds several whole problems (one bmm per chunk). The
// Triton backend's environment knobs apply here too: D2SM_PANEL_MB sets the budget, and
// D2SM_PANEL_ROWS forces the row count (tests use it to run several panels at small M).
static std::optional<int64_t> forced_panel_rows() {
  const char* forced = std::getenv("D2SM_PANEL_ROWS");
  if (!forced || !*forced) return std::nullopt;
  return std::max<int64_t>(1, std::atoll(forced));
}

static int64_t panel_budget_bytes(bool cuda) {
  double mb = cuda ? 256.0 : 64.0;
  if (const char* env = std::getenv("D2SM_PANEL_MB"); env && *env) mb = std::atof(env);
  return static_cast<int64_t>(mb * double(1 << 20));
}

static int64_t panel_rows(int64_t M, int64_t element_size, bool cuda) {
  if (const auto forced = forced_panel_rows()) return *forced;
  return std::max<int64_t>(panel_budget_bytes(cuda) / std::max<int64_t>(2 * M * element_size, 1), 16);
}

// The epilogues' per-row arrays (5, B, M): 1/A, 1/B, log(B/A) (in double: a per-row constant that
// must not cancel), w/A, w/B.
static Tensor column_arrays(const RowStats& st, const Tensor& w, at::ScalarType dtype) {
  Tensor log_ba = (st.b.to(at::kDouble) / st.a.to(at::kDouble)).log().to(dtype);
  return at::stack({st.a.reciprocal(), st.b.reciprocal(), log_ba, w / st.a, w / st.b}).contiguous();
}

// Pairwise pass over all problems. Returns stats (3, B, M) [F, ū, v̄] when want_stats; writes the
// pairwise gradient sums of the live rows into gx/gy (B, N, d) when they are defined.
static Tensor pair_pass(const Problem& p, const RowStats& st, const Tensor& w, int div, bool exclude_self, double eps,
                        bool want_stats, Tensor gx, Tensor gy) {
  const auto opts = p.x.options();
  const bool cuda = p.x.is_cuda();
  Tensor stats = want_stats ? at::zeros({3, p.B, p.M}, opts) : Tensor();
  const int64_t R = panel_rows(p.M, p.x.element_size(), cuda);
  const Tensor cols = column_arrays(st, w, p.dtype);
#ifdef D2SM_WITH_CUDA
  const PanelEpilogueFn epilogue = cuda ? panel_epilogue_cuda : panel_epilogue_cpu;
#else
  const PanelEpilogueFn epilogue = panel_epilogue_cpu;
#endif
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
        // contiguous (bc, nr, M) views of the buffers' start
        Tensor px = sx.view(-1).narrow(0, 0, bc * nr * p.M).view({bc, nr, p.M});
        Tensor py = sy.view(-1).narrow(0, 0, bc * nr * p.M).view({bc, nr, p.M});
        gram_panel(p, false, b0, bc, mm_segment(p, false, memory).narrow(0, b0, bc).narrow(1, r0, nr), px);
        gram_panel(p, true, b0, bc, mm_segment(p, true, memory).narrow(0, b0, bc).narrow(1, r0, nr), py);
        epilogue(div, px, py, b0, offset + r0, st.rx, st.ry, cols, exclude_self, eps, gx_here, gy_here, stats);
        if (gx_here) grad_panel(p, false, b0, bc, px, gx.narrow(0, b0, bc).narrow(1, r0, nr));
        if (gy_here) grad_panel(p, true, b0, bc, py, gy.narrow(0, b0, bc).narrow(1, r0, nr));
      }
    }
  }
  return stats;
}

// ---------------------------------------------------------------------------------------------
// CPU pass over symmetric blocks (on CPU whenever the sample set spans several blocks; see
// use_symmetric_pass). The panel pass above is the CUDA pass and the CPU pass for one block;
// D2SM_CPU_PASS=panel|symmetric forces either, which the tests use to run both on CPU.
//
// Both kernels are symmetric, so every pair (i, j) is visited once: the sample set is cut into
// blocks of rows and only block pairs I ≤ J are processed. One Gram block gives row i's terms
// (summed along the row) and row j's terms (summed down the column, per thread, then in a fixed
// order), and the symmetric weights S_ij; the gradient then takes G_I += S_IJ·X̂_J and
// G_J += S_IJᵀ·X̂_I from normalised copies X̂ of the rows (O(M·d) extra). Against the panel
// pass this halves the Gram FLOPs and the pair work: M²·d + 2·N·M·d FLOPs per side (Gram +
// gradient) instead of 2·M²·d + 2·N·M·d. Diagonal blocks visit j ≥ i and mirror S into the
// lower triangle.
// ---------------------------------------------------------------------------------------------

template <typename T, int DIV, typename Kind>
static void symmetric_block_epilogue(T* sx, T* sy, int64_t bc, int64_t nI, int64_t nJ, int64_t b0, int64_t I0,
                                     int64_t J0, int64_t M, const Columns<T>& all, bool exclude_self, double eps_d,
                                     double* f_all, double* pu_all, double* qv_all) {
  const T eps = T(eps_d);
  const bool diagonal = I0 == J0;
  // column sums (row j's terms), one set per thread: [thread][problem][3][nJ]
  const int64_t per_thread = bc * 3 * nJ;
  std::vector<T> columns(Kind::stats ? at::get_num_threads() * per_thread : 0, T(0));
  at::parallel_for(0, bc * nI, 8, [&](int64_t begin, int64_t end) {
    alignas(64) T terms_f[kSumChunk], terms_pu[kSumChunk], terms_qv[kSumChunk];
    T* mine = Kind::stats ? columns.data() + at::get_thread_num() * per_thread : nullptr;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t k = row / nI, i = row % nI, b = b0 + k, gi = I0 + i;
      const Columns<T> c = all.shifted(b * M);  // a local copy: loop-invariant bases
      const RowConstants<T> ri = RowConstants<T>::load(c, gi);
      T* __restrict__ row_x = sx + row * nJ;
      T* __restrict__ row_y = sy + row * nJ;
      T* __restrict__ col_f = Kind::stats ? mine + k * 3 * nJ : nullptr;
      T* __restrict__ col_pu = Kind::stats ? col_f + nJ : nullptr;
      T* __restrict__ col_qv = Kind::stats ? col_f + 2 * nJ : nullptr;
      const int64_t self_j = gi - J0;   // column of the pair (i, i), if it is in this block
      const bool excl = exclude_self;    // locals, not captures: the simd loop must see invariants
      double f = 0, pu = 0, qv = 0;
      for (int64_t j0 = diagonal ? i : 0; j0 < nJ; j0 += kSumChunk) {
        const int64_t n = std::min(kSumChunk, nJ - j0);
#pragma omp simd
        for (int64_t t = 0; t < n; ++t) {
          const int64_t j = j0 + t;
          const RowConstants<T> rj = RowConstants<T>::load(c, J0 + j);
          const bool self = j == self_j;
          const bool keep = !(self && excl);
          const PairSums<T> s = symmetric_pair<DIV, Kind>(row_x[j], row_y[j], ri, rj, keep, !self, keep, eps,
                                                          VectorLog{});
          if constexpr (Kind::stats) {
            terms_f[t] = s.i.f;
            terms_pu[t] = s.i.pu;
            terms_qv[t] = s.i.qv;
            col_f[j] += s.j.f;
            col_pu[j] += s.j.pu;
            col_qv[j] += s.j.qv;
          }
        }
        if constexpr (Kind::stats) {
          for (int64_t t = 0; t < n; ++t) {
            f += double(terms_f[t]);
            pu += double(terms_pu[t]);
            qv += double(terms_qv[t]);
          }
        }
      }
      if constexpr (Kind::stats) {  // row gi has one writer here; column sums are added below
        f_all[b * M + gi] += f;
        pu_all[b * M + gi] += pu;
        qv_all[b * M + gi] += qv;
      }
    }
  });
  if constexpr (Kind::stats) {
    for (size_t t = 0; t < columns.size() / per_thread; ++t) {  // fixed order: deterministic
      const T* sums = columns.data() + t * per_thread;
      for (int64_t k = 0; k < bc; ++k) {
        const int64_t base = (b0 + k) * M + J0;
        for (int64_t j = 0; j < nJ; ++j) {
          f_all[base + j] += double(sums[k * 3 * nJ + j]);
          pu_all[base + j] += double(sums[k * 3 * nJ + nJ + j]);
          qv_all[base + j] += double(sums[k * 3 * nJ + 2 * nJ + j]);
        }
      }
    }
  }
  if (diagonal && (Kind::grad_x || Kind::grad_y)) {  // S is symmetric: lower triangle from the upper
    at::parallel_for(0, bc * nI, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t k = row / nI, i = row % nI;
        for (int64_t j = 0; j < i; ++j) {
          if constexpr (Kind::grad_x) sx[row * nJ + j] = sx[(k * nI + j) * nJ + i];
          if constexpr (Kind::grad_y) sy[row * nJ + j] = sy[(k * nI + j) * nJ + i];
        }
      }
    });
  }
}

// Rows per symmetric block (D2SM_PANEL_ROWS overrides): GEMMs of 512×512×d run near BLAS's peak,
// and the two block buffers take 2 MiB per problem in fp32.
constexpr int64_t kSymmetricBlockRows = 512;

// CPU pass choice: D2SM_CPU_PASS = "symmetric" | "panel" | "auto" (default). "auto" takes the
// symmetric pass when the sample set spans more than one block: with a single block it saves no
// Gram FLOPs (the block's GEMM is square anyway) and its normalised copies of the rows cost more
// than half an epilogue saves (measured: B=64 × M=36, d=4096 ran 53 ms with panels, 86 ms with
// one symmetric block).
static bool use_symmetric_pass(const Problem& p) {
  if (p.x.is_cuda()) return false;
  const char* choice = std::getenv("D2SM_CPU_PASS");
  const std::string pass = choice && *choice ? choice : "auto";
  TORCH_CHECK(pass == "auto" || pass == "symmetric" || pass == "panel",
              "D2SM_CPU_PASS must be auto, symmetric or panel, got ", pass);
  if (pass != "auto") return pass == "symmetric";
  return p.M > forced_panel_rows().value_or(kSymmetricBlockRows);
}

static Tensor symmetric_pass_cpu(const Problem& p, const RowStats& st, const Tensor& w, int div, bool exclude_self,
                                 double eps, bool want_stats, Tensor gx, Tensor gy) {
  const auto opts = p.x.options();
  // Row sums in double across blocks; returned in the compute dtype.
  Tensor sums = want_stats ? at::zeros({3, p.B, p.M}, opts.dtype(at::kDouble)) : Tensor();
  auto normalised = [&](bool is_y) {  // X̂: live rows then memory rows, (B, M, d)
    Tensor rows = p.Q ? at::cat({segment(p, is_y, false), segment(p, is_y, true)}, 1) : segment(p, is_y, false);
    return (rows * (is_y ? st.ry : st.rx).unsqueeze(2)).contiguous();
  };
  const Tensor xh = normalised(false), yh = normalised(true);
  const Tensor cols = column_arrays(st, w, p.dtype);
  const int64_t nb = std::min(forced_panel_rows().value_or(kSymmetricBlockRows), p.M);
  const int64_t block_bytes = 2 * nb * nb * p.x.element_size();
  const int64_t bc_max = std::max<int64_t>(1, std::min<int64_t>(p.B, panel_budget_bytes(false) / block_bytes));
  Tensor bx = at::empty({bc_max * nb * nb}, opts), by = at::empty({bc_max * nb * nb}, opts);
  const bool grad_x = gx.defined(), grad_y = gy.defined();
  for (int64_t b0 = 0; b0 < p.B; b0 += bc_max) {
    const int64_t bc = std::min(bc_max, p.B - b0);
    auto rows_of = [&](const Tensor& t, int64_t start, int64_t n) { return t.narrow(0, b0, bc).narrow(1, start, n); };
    for (int64_t I0 = 0; I0 < p.M; I0 += nb) {
      const int64_t nI = std::min(nb, p.M - I0), live_I = std::clamp<int64_t>(p.N - I0, 0, nI);
      for (int64_t J0 = I0; J0 < p.M; J0 += nb) {
        const int64_t nJ = std::min(nb, p.M - J0), live_J = std::clamp<int64_t>(p.N - J0, 0, nJ);
        if (!want_stats && live_I == 0 && live_J == 0) continue;  // memory × memory: statistics only
        Tensor px = bx.narrow(0, 0, bc * nI * nJ).view({bc, nI, nJ});
        Tensor py = by.narrow(0, 0, bc * nI * nJ).view({bc, nI, nJ});
        at::bmm_out(px, rows_of(xh, I0, nI), rows_of(xh, J0, nJ).transpose(1, 2));
        at::bmm_out(py, rows_of(yh, I0, nI), rows_of(yh, J0, nJ).transpose(1, 2));
        const bool gx_here = grad_x && (live_I || live_J), gy_here = grad_y && (live_I || live_J);
        AT_DISPATCH_FLOATING_TYPES(p.dtype, "d2sm_symmetric_block", [&] {
          using T = scalar_t;
          const auto ptr = PanelPointers<T>::of(px, py, st.rx, st.ry, cols, Tensor());  // sums are double here
          double* f = want_stats ? sums[0].data_ptr<double>() : nullptr;
          double* pu = want_stats ? sums[1].data_ptr<double>() : nullptr;
          double* qv = want_stats ? sums[2].data_ptr<double>() : nullptr;
          dispatch_pass(div, want_stats, gx_here, gy_here, [&](auto div_tag, auto kind) {
            symmetric_block_epilogue<T, decltype(div_tag)::value, decltype(kind)>(
                ptr.gram_x, ptr.gram_y, bc, nI, nJ, b0, I0, J0, p.M, ptr.columns, exclude_self, eps, f, pu, qv);
          });
        });
        for (const auto& [here, s, rows, g] : {std::tuple{gx_here, px, xh, gx}, std::tuple{gy_here, py, yh, gy}}) {
          if (!here) continue;
          if (live_I) rows_of(g, I0, live_I).baddbmm_(s.narrow(1, 0, live_I), rows_of(rows, J0, nJ));
          if (I0 != J0 && live_J) rows_of(g, J0, live_J).baddbmm_(s.narrow(2, 0, live_J).transpose(1, 2),
                                                                  rows_of(rows, I0, nI));
        }
      }
    }
  }
  return want_stats ? sums.to(p.dtype) : Tensor();
}

void finish_rows_cpu(const Tensor& pairwise, const Tensor& live, const Tensor& r, const Tensor& coef, const Tensor& s,
                     const Tensor& t, bool exclude_self) {
  const int64_t B = pairwise.size(0), N = pairwise.size(1), D = pairwise.size(2), M = r.size(1);
  AT_DISPATCH_FLOATING_TYPES(pairwise.scalar_type(), "d2sm_finish_rows_cpu", [&] {
    scalar_t* g_all = pairwise.data_ptr<scalar_t>();
    const scalar_t* x_all = live.data_ptr<scalar_t>();
    const scalar_t *r_all = r.data_ptr<scalar_t>(), *c_all = coef.data_ptr<scalar_t>();
    const scalar_t *s_all = s.data_ptr<scalar_t>(), *t_all = t.data_ptr<scalar_t>();
    at::parallel_for(0, B * N, 4, [&](int64_t begin, int64_t end) {
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
          const scalar_t v = xhat_grad(g[j], x[j], sb[j], tb[j], ck, self);
          g[j] = v;
          dot += double(v) * double(x[j] * rk);
        }
        const scalar_t dk = scalar_t(dot);
        _Pragma("omp simd")
        for (int64_t j = 0; j < D; ++j) g[j] = project_out(g[j], x[j], rk, dk);
      }
    });
  });
}

// Step 3: ∂L/∂x from the pairwise sums (see d2sm_ext/triton_backend.py for the derivation), in
// place and in one pass per row: g = ½G − ½c·s − ½t (+ c·x̂ with exclude_self), c = α ū, then
// ∂L/∂x = r (g − x̂ (x̂·g)). `pairwise` (B, N, d) is overwritten with the result.
static Tensor finish_grad(const Problem& p, bool is_y, Tensor pairwise, const Tensor& r, const Tensor& norm,
                          const Tensor& w, const Tensor& bar, const Tensor& s, bool exclude_self) {
  Tensor coef = (w / norm * bar).contiguous();               // α_j ū_j (B, M)
  Tensor t = weighted_rows(p, is_y, coef * r).contiguous();  // Σ_j α_j ū_j x̂_j (B, d)
#ifdef D2SM_WITH_CUDA
  const FinishRowsFn finish = pairwise.is_cuda() ? finish_rows_cuda : finish_rows_cpu;
#else
  const FinishRowsFn finish = finish_rows_cpu;
#endif
  finish(pairwise, segment(p, is_y, false), r, coef, s.contiguous(), t, exclude_self);
  return pairwise;
}

static Tensor grad_or_empty(const Tensor& g, const Tensor& like, at::ScalarType dtype) {
  if (!g.defined()) return at::empty({0}, like.options().dtype(dtype));
  return g.reshape(like.sizes());
}

static std::tuple<Tensor, Tensor> gradients(const Problem& p, const RowStats& st, const Tensor& w, int div,
                                            bool exclude_self, double eps, bool need_gx, bool need_gy,
                                            bool want_stats, const Tensor& pu, const Tensor& qv, Tensor* stats_out) {
  // The symmetric pass accumulates into the gradients; the panel pass writes every row once.
  const bool symmetric = use_symmetric_pass(p);
  auto buffer = [&](bool needed) {
    if (!needed) return Tensor();
    return symmetric ? at::zeros({p.B, p.N, p.D}, p.x.options()) : at::empty({p.B, p.N, p.D}, p.x.options());
  };
  Tensor gx = buffer(need_gx), gy = buffer(need_gy);
  Tensor stats = symmetric ? symmetric_pass_cpu(p, st, w, div, exclude_self, eps, want_stats, gx, gy)
                           : pair_pass(p, st, w, div, exclude_self, eps, want_stats, gx, gy);
  if (stats_out) *stats_out = stats;
  Tensor ubar = want_stats ? stats[1] : pu, vbar = want_stats ? stats[2] : qv;
  if (need_gx) gx = finish_grad(p, false, gx, st.rx, st.a, w, ubar, st.s_x, exclude_self);
  if (need_gy) gy = finish_grad(p, true, gy, st.ry, st.b, w, vbar, st.s_y, exclude_self);
  return {gx, gy};
}

// cuBLAS TF32 for fp32 GEMMs follows the op's `tf32` flag (the Python side resolves precision
// "auto" to the global matmul setting, so the flag usually equals it and nothing is changed);
// restored on exit. Process-global, like the setting itself: a concurrent fp32 matmul on another
// thread may see the flag while an op that overrides it runs. When the user set TF32 only through
// torch.backends.cuda.matmul.fp32_precision (torch >= 2.9), the legacy query below raises and
// cannot be restored faithfully: cuBLAS then keeps the user's setting (what "auto" resolves to).
class CublasTf32Scope {
 public:
  CublasTf32Scope(bool cuda, bool tf32) {
    if (!cuda) return;
    auto& ctx = at::globalContext();
    try {
      previous_ = ctx.allowTF32CuBLAS();
    } catch (const c10::Error&) {
      return;
    }
    changed_ = previous_ != tf32;
    if (changed_) ctx.setAllowTF32CuBLAS(tf32);
  }
  ~CublasTf32Scope() {
    if (changed_) at::globalContext().setAllowTF32CuBLAS(previous_);
  }
  CublasTf32Scope(const CublasTf32Scope&) = delete;
  CublasTf32Scope& operator=(const CublasTf32Scope&) = delete;

 private:
  bool previous_ = false, changed_ = false;
};

// Problems (B,) with a non-finite value in any of their rows (live or memory, x or y). Their
// values and gradients are NaN (DESIGN §2.6: a loss never hides a NaN); the kernels' selects
// (0·log 0 = 0, zero rows) would otherwise turn some NaNs into plausible numbers.
static Tensor nonfinite_problems(const Problem& p) {
  auto any_bad = [](const Tensor& t) { return at::isfinite(t).logical_not().flatten(1).any(1); };
  Tensor bad = any_bad(p.x).logical_or(any_bad(p.y));
  if (p.Q) bad = bad.logical_or(any_bad(p.xm)).logical_or(any_bad(p.ym));
  return bad;
}

// NaN for the rows (B, …) of flagged problems, without a host sync.
static Tensor nan_where(const Tensor& bad, const Tensor& t) {
  if (!t.defined() || t.numel() == 0) return t;
  std::vector<int64_t> shape(t.dim(), 1);
  shape[0] = bad.size(0);
  return at::where(bad.view(shape), std::numeric_limits<double>::quiet_NaN(), t);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> fused_forward(
    const Tensor& x, const Tensor& y, const std::optional<Tensor>& x_memory, const std::optional<Tensor>& y_memory,
    std::string divergence, bool exclude_self, double eps, bool tf32, std::string reduction, bool need_gx,
    bool need_gy) {
  const int div = divergence_code(divergence);
  TORCH_CHECK(reduction == "mean" || reduction == "sum" || reduction == "none", "bad reduction ", reduction);
  const c10::OptionalDeviceGuard device_guard(x.device());
  const CublasTf32Scope tf32_scope(x.is_cuda(), tf32);
  Problem p = prepare(x, y, x_memory, y_memory);
  RowStats st = row_statistics(p, exclude_self, eps);
  const bool fused = reduction != "none" && (need_gx || need_gy);
  const double scale = reduction == "mean" ? 1.0 / double(p.B * p.M) : 1.0;
  Tensor w = at::full({p.B, p.M}, scale, p.x.options());
  Tensor stats;
  auto [gx, gy] = gradients(p, st, w, div, exclude_self, eps, need_gx && fused, need_gy && fused, true, Tensor(),
                            Tensor(), &stats);
  const Tensor bad = nonfinite_problems(p);
  // Divergences are >= 0: a rounding of an exactly-zero one below 0 is returned as 0 (DESIGN §2.5).
  Tensor rows = nan_where(bad, stats[0].clamp_min(0.0));
  if (gx.defined()) gx = nan_where(bad, gx);
  if (gy.defined()) gy = nan_where(bad, gy);
  Tensor value;
  if (reduction == "mean") value = rows.mean();
  else if (reduction == "sum") value = rows.sum();
  else value = x.dim() == 3 ? rows : rows[0];
  Tensor saved = at::stack({st.rx, st.ry, st.a, st.b, stats[1], stats[2]});
  return {value.clone(), saved, grad_or_empty(gx, x, p.dtype), grad_or_empty(gy, y, p.dtype)};
}

std::tuple<Tensor, Tensor> fused_backward(const Tensor& x, const Tensor& y, const std::optional<Tensor>& x_memory,
                                          const std::optional<Tensor>& y_memory, const Tensor& saved,
                                          const Tensor& grad_rows, std::string divergence, bool exclude_self,
                                          double eps, bool tf32, bool need_gx, bool need_gy) {
  const int div = divergence_code(divergence);
  const c10::OptionalDeviceGuard device_guard(x.device());
  const CublasTf32Scope tf32_scope(x.is_cuda(), tf32);
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
  const Tensor bad = nonfinite_problems(p);
  return {grad_or_empty(nan_where(bad, gx), x, p.dtype), grad_or_empty(nan_where(bad, gy), y, p.dtype)};
}

TORCH_LIBRARY(d2sm_ext, m) {
  m.def("fused_forward(Tensor x, Tensor y, Tensor? x_memory, Tensor? y_memory, str divergence, bool exclude_self, "
        "float eps, bool tf32, str reduction, bool need_gx, bool need_gy) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("fused_backward(Tensor x, Tensor y, Tensor? x_memory, Tensor? y_memory, Tensor saved, Tensor grad_rows, "
        "str divergence, bool exclude_self, float eps, bool tf32, bool need_gx, bool need_gy) -> (Tensor, Tensor)");
}

// The driver is device-generic (ATen ops + the device's epilogue and finish kernels), so the
// same functions serve both dispatch keys.
TORCH_LIBRARY_IMPL(d2sm_ext, CPU, m) {
  m.impl("fused_forward", &fused_forward);
  m.impl("fused_backward", &fused_backward);
}

#ifdef D2SM_WITH_CUDA
TORCH_LIBRARY_IMPL(d2sm_ext, CUDA, m) {
  m.impl("fused_forward", &fused_forward);
  m.impl("fused_backward", &fused_backward);
}
#endif

}  // namespace d2sm_ext
