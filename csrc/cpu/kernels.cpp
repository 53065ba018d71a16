// CPU kernels of the fused pass (docs/DESIGN.md §3), registered as the CPU entries of the
// driver's DeviceKernels table (csrc/driver.h) together with the CPU dispatch key of the ops:
//   * the panel epilogue (one task per panel row, vectorised pair loop),
//   * the symmetric-block pass, the CPU's own pairwise pass when the sample set spans several
//     blocks (each pair visited once: half the Gram FLOPs and half the pair work),
//   * the gradient finish.
// The per-pair arithmetic is csrc/pair_math.h, compiled here and into the CUDA kernels.
// Row sums: fp32 partial sums of at most 256 (panel) / 512 (block) terms, added in double.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <type_traits>
#include <vector>

#include "../driver.h"
#include "../env.h"

namespace d2sm_ext {
namespace {

// log for the CPU epilogue: Cephes' single-precision polynomial (≈1 ulp on normal positive
// inputs) written without branches or library calls so that the compiler vectorises the pair
// loop; std::log for double (the float64 path is for gradcheck, not speed).
inline float log_t(float x) {
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
inline double log_t(double x) { return std::log(x); }

struct VectorLog {
  template <typename T>
  T operator()(T x) const { return log_t(x); }
};

// CPU epilogue: one task per panel row, the columns in chunks of kSumChunk. The pair loop is
// branch-free (selects; -fno-trapping-math in setup.py lets GCC if-convert them) and writes each
// pair's terms of the row sums to small buffers; a separate loop adds them up in double, in SIMD
// lanes (omp simd reduction: ~4x faster than the scalar chain, measured on the cross sums; the
// lane order is fixed at compile time, so results stay deterministic). GCC does not vectorise the
// pair loop when the reduction sits inside it, and it is most of the work.
constexpr int64_t kSumChunk = 256;

template <typename T, int DIV, typename Kind>
void panel_epilogue_rows(T* sx, T* sy, int64_t bc, int64_t nr, int64_t b0, int64_t row0, int64_t M,
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
          // each term exact in double; the lanes' order is fixed at compile time: deterministic
#pragma omp simd reduction(+ : f, pu, qv)
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
void symmetric_block_epilogue(T* sx, T* sy, int64_t bc, int64_t nI, int64_t nJ, int64_t b0, int64_t I0,
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
#pragma omp simd reduction(+ : f, pu, qv)  // as in panel_epilogue_rows
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
// symmetric pass for a pass that forms the statistics when the sample set spans more than one
// block: with a single block it saves no Gram FLOPs (the block's GEMM is square anyway) and its
// normalised copies of the rows cost more than half an epilogue saves (B=64 × M=36, d=4096 ran
// 53 ms with panels, 86 ms with one symmetric block). A gradient-only pass (the backward of
// "none", the queue statistics path) takes panels of the live rows: the symmetric blocks would
// also pair memory rows that share a block with live rows (O(block·M·d) instead of O(N·M·d)).
bool use_symmetric_pass(const Problem& p, bool want_stats) {
  const std::string pass = env::choice("D2SM_CPU_PASS", {"auto", "symmetric", "panel"}, "auto");
  if (pass != "auto") return pass == "symmetric";
  return want_stats && p.M > forced_panel_rows().value_or(kSymmetricBlockRows);
}

Tensor symmetric_pass_cpu(const Problem& p, const RowStats& st, const Tensor& w, int div, bool exclude_self,
                                 double eps, bool want_stats, Tensor gx, Tensor gy) {
  const auto opts = p.x.options();
  // The blocks accumulate into the gradient sums: they start at zero.
  if (gx.defined()) gx.zero_();
  if (gy.defined()) gy.zero_();
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

// ---------------------------------------------------------------------------------------------
// Cross-sums epilogue of the queue statistics (docs/DESIGN.md §3.6; driver.h's CrossEpilogueFn):
// the weighted row and column sums of the four pair terms K', K, K'·log(K'/K), K·log(K/K') of
// one Gram panel (the driver's cross_sums makes the panels with BLAS), one vectorised pass. Row
// sums: fp32 partial sums of at most kSumChunk terms, added in double; column sums: per-thread
// fp32 partials of one panel, combined in thread order in double. Deterministic for a thread count.
// ---------------------------------------------------------------------------------------------
// One panel row's pass over a chunk of n columns: its terms (weighted by wc) into t_* for the
// row sums and (weighted by wi) into the column partials. HAS_WC and WITH_COLS are template
// parameters so that the loop has neither a conditional load nor a row-invariant select in it
// (measured: the generic loop ran ~10x slower than the panel epilogue's per pair).
template <typename T, bool HAS_WC, bool WITH_COLS>
inline void cross_chunk(const T* __restrict__ row_x, const T* __restrict__ row_y, const T* __restrict__ rxc,
                        const T* __restrict__ ryc, const T* __restrict__ wc, T rxi, T ryi, T wi, T eps, int64_t n,
                        T* __restrict__ t_a, T* __restrict__ t_b, T* __restrict__ t_c, T* __restrict__ t_d,
                        T* __restrict__ col_a, T* __restrict__ col_b, T* __restrict__ col_c, T* __restrict__ col_d) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    const PairKernel<T> pk = pair_kernel(row_x[k] * rxi * rxc[k], row_y[k] * ryi * ryc[k], eps, VectorLog{});
    const T ta = pk.ka, tb = pk.kb, tc = pk.ka * pk.lab, td = -pk.kb * pk.lab;
    if constexpr (HAS_WC) {
      // a zero weight leaves its column out, even where its terms are NaN
      const T wj = wc[k];
      const bool use_j = wj != T(0);
      t_a[k] = use_j ? wj * ta : T(0);
      t_b[k] = use_j ? wj * tb : T(0);
      t_c[k] = use_j ? wj * tc : T(0);
      t_d[k] = use_j ? wj * td : T(0);
    } else {
      t_a[k] = ta;
      t_b[k] = tb;
      t_c[k] = tc;
      t_d[k] = td;
    }
    if constexpr (WITH_COLS) {
      col_a[k] += wi * ta;
      col_b[k] += wi * tb;
      col_c[k] += wi * tc;
      col_d[k] += wi * td;
    }
  }
}

template <typename T>
void cross_sums_panel(const T* gx, const T* gy, int64_t nr, int64_t nc, const T* rxr, const T* ryr, const T* rxc,
                      const T* ryc, const T* wr, const T* wc, T eps, double* row_sums, int64_t n_rows,
                      double* col_sums, int64_t n_cols, int64_t c0) {
  const int threads = at::get_num_threads();
  std::vector<T> partial(size_t(threads) * 4 * nc, T(0));
  at::parallel_for(0, nr, 4, [&](int64_t begin, int64_t end) {
    alignas(64) T t_a[kSumChunk], t_b[kSumChunk], t_c[kSumChunk], t_d[kSumChunk];
    T* mine = partial.data() + size_t(at::get_thread_num()) * 4 * nc;
    for (int64_t i = begin; i < end; ++i) {
      const T rxi = rxr[i], ryi = ryr[i], wi = wr ? wr[i] : T(1);
      const bool use_i = wi != T(0);  // a zero weight leaves the row out of the column sums
      const T* row_x = gx + i * nc;
      const T* row_y = gy + i * nc;
      double sa = 0, sb = 0, sc = 0, sd = 0;
      for (int64_t j0 = 0; j0 < nc; j0 += kSumChunk) {
        const int64_t n = std::min(kSumChunk, nc - j0);
        T* cols[4] = {mine + j0, mine + nc + j0, mine + 2 * nc + j0, mine + 3 * nc + j0};
        const T* w = wc ? wc + j0 : nullptr;
        auto run = [&](auto has_wc, auto with_cols) {
          cross_chunk<T, decltype(has_wc)::value, decltype(with_cols)::value>(
              row_x + j0, row_y + j0, rxc + j0, ryc + j0, w, rxi, ryi, wi, eps, n, t_a, t_b, t_c, t_d, cols[0],
              cols[1], cols[2], cols[3]);
        };
        using yes = std::true_type;
        using no = std::false_type;
        if (w) use_i ? run(yes{}, yes{}) : run(yes{}, no{});
        else use_i ? run(no{}, yes{}) : run(no{}, no{});
        // each term exact in double; the lanes' order is fixed at compile time: deterministic
#pragma omp simd reduction(+ : sa, sb, sc, sd)
        for (int64_t k = 0; k < n; ++k) {
          sa += double(t_a[k]);
          sb += double(t_b[k]);
          sc += double(t_c[k]);
          sd += double(t_d[k]);
        }
      }
      row_sums[i] += sa;  // one writer per row: the rows of a panel are split between threads
      row_sums[n_rows + i] += sb;
      row_sums[2 * n_rows + i] += sc;
      row_sums[3 * n_rows + i] += sd;
    }
  });
  for (int t = 0; t < threads; ++t) {  // fixed order: deterministic
    const T* sums = partial.data() + size_t(t) * 4 * nc;
    for (int s = 0; s < 4; ++s) {
      for (int64_t j = 0; j < nc; ++j) col_sums[s * n_cols + c0 + j] += double(sums[s * nc + j]);
    }
  }
}

void cross_epilogue_cpu(const Tensor& gx, const Tensor& gy, int64_t r0, int64_t c0, const CrossArgs& args,
                        Tensor& row_sums, Tensor& col_sums) {
  const int64_t nr = gx.size(0), nc = gx.size(1), R = row_sums.size(1), C = col_sums.size(1);
  AT_DISPATCH_FLOATING_TYPES(gx.scalar_type(), "d2sm_cross_epilogue_cpu", [&] {
    using T = scalar_t;
    cross_sums_panel<T>(gx.data_ptr<T>(), gy.data_ptr<T>(), nr, nc, args.rxr.data_ptr<T>() + r0,
                        args.ryr.data_ptr<T>() + r0, args.rxc.data_ptr<T>() + c0, args.ryc.data_ptr<T>() + c0,
                        args.wr.defined() ? args.wr.data_ptr<T>() + r0 : nullptr,
                        args.wc.defined() ? args.wc.data_ptr<T>() + c0 : nullptr, T(args.eps),
                        row_sums.data_ptr<double>() + r0, R, col_sums.data_ptr<double>(), C, c0);
  });
}

}  // namespace

const bool cpu_kernels_registered = register_device_kernels(
    c10::DeviceType::CPU,
    DeviceKernels{panel_epilogue_cpu, finish_rows_cpu, symmetric_pass_cpu, use_symmetric_pass, cross_epilogue_cpu});

// The driver is device-generic: the same functions serve every device's dispatch key.
TORCH_LIBRARY_IMPL(d2sm_ext, CPU, m) {
  m.impl("fused_forward", &fused_forward);
  m.impl("fused_backward", &fused_backward);
  m.impl("cross_sums", &cross_sums);
  m.impl("queue_backward", &queue_backward);
}

}  // namespace d2sm_ext
