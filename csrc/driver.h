// The device-generic fused pass (driver.cpp) and what a device provides to it: a table of
// kernels (DeviceKernels) that each device's sources register for their c10::DeviceType
// (csrc/cpu/kernels.cpp, csrc/cuda/kernels.cu). The driver runs the O(M·d) steps and the GEMMs
// with ATen (BLAS on CPU, cuBLAS on CUDA, on the current stream) and calls the table for the
// per-pair epilogue and the per-row gradient finish (docs/DESIGN.md §3).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

#include "pair_math.h"

namespace d2sm_ext {

using at::Tensor;

// Inputs as (B, rows, d) tensors. The *_mm tensors feed the GEMMs: in the compute dtype (fp32
// for fp32 and half inputs, fp64 for fp64), except for fp16/bf16 on CUDA (and on CPU under the
// test switch D2SM_CPU_HALF_GEMM=1), where they keep the input dtype (tensor cores, fp32 output).
// x/y/xm/ym feed the O(M·d) steps and the finish: x/y in the compute dtype (with half GEMMs, the
// live rows' one fp32 copy); xm/ym the same tensors as xm_mm/ym_mm, hence half with half GEMMs:
// the O(M·d) steps read them in fp32 chunks (driver.cpp for_each_chunk), never a whole copy.
struct Problem {
  Tensor x, y, xm, ym;  // xm/ym undefined when there are no memory rows
  Tensor x_mm, y_mm, xm_mm, ym_mm;
  int64_t B, N, Q, M, D;
  at::ScalarType dtype;     // compute dtype
  at::ScalarType mm_dtype;  // GEMM operand dtype
  // Optional raw Gram blocks of the live rows against the memory rows, (B, N, Q) in the compute
  // dtype, computed by the caller (the queue statistics' cross block): the panels copy them
  // instead of multiplying again (queue_backward).
  Tensor gram_x_memory, gram_y_memory;
  bool tf32 = false;  // TF32 for the fp32 Gram and gradient GEMMs (CUDA), the op's flag
};

// Per-row statistics before the pairwise pass (docs/DESIGN.md §3.1): inverse norms r, the
// closed-form normalisers A (x side) and B (y side), and s = Σ_j x̂_j per problem.
struct RowStats {
  Tensor rx, ry, a, b, s_x, s_y;
};

// Rows of the sample set: live rows or memory rows (views, no copy).
Tensor segment(const Problem& p, bool is_y, bool memory);

// The epilogues' per-row arrays (5, B, M): 1/A, 1/B, log(B/A) (in double: a per-row constant
// that must not cancel), w/A, w/B.
Tensor column_arrays(const RowStats& st, const Tensor& w, at::ScalarType dtype);

// Panel sizing shared by the passes: D2SM_PANEL_ROWS (forced rows) and D2SM_PANEL_MB (budget).
std::optional<int64_t> forced_panel_rows();
int64_t panel_budget_bytes(bool cuda);

// Panel epilogue. px/py: (bc, nr, M) contiguous raw Gram panels of sample rows row0…row0+nr−1 of
// problems b0…b0+bc−1 (compute dtype), overwritten with W' for the sides in grad_x/grad_y.
// rx/ry: (B, M) inverse norms; cols: (5, B, M) from column_arrays; stats: (3, B, M) = F, ū, v̄
// (rows row0… are written), or undefined when the statistics are not wanted.
using PanelEpilogueFn = void (*)(int div, const Tensor& px, const Tensor& py, int64_t b0, int64_t row0,
                                 const Tensor& rx, const Tensor& ry, const Tensor& cols, bool exclude_self,
                                 double eps, bool grad_x, bool grad_y, const Tensor& stats);

// Gradient finish of the live rows, in place: `pairwise` (B, N, d) holds Σ_j W'_kj x_j on entry
// and ∂L/∂x on exit. live: (B, N, d) rows; r, coef: (B, M) inverse norms and α ū;
// s, t: (B, d) Σ_j x̂_j and Σ_j α_j ū_j x̂_j.
using FinishRowsFn = void (*)(const Tensor& pairwise, const Tensor& live, const Tensor& r, const Tensor& coef,
                              const Tensor& s, const Tensor& t, bool exclude_self);

// A device's own pairwise pass, used instead of the panel pass when `use_own_pass(p, want_stats)`
// says so (CPU: symmetric blocks, each pair visited once, for passes that form the statistics). Same contract as the panel pass: returns the
// statistics (3, B, M) when want_stats, and writes the pairwise gradient sums into gx/gy
// (B, N, d, uninitialised on entry) when they are defined.
using PairPassFn = Tensor (*)(const Problem& p, const RowStats& st, const Tensor& w, int div, bool exclude_self,
                              double eps, bool want_stats, Tensor gx, Tensor gy);

// Cross-sums epilogue of the queue statistics (docs/DESIGN.md §3.6). gx, gy: (nr, nc) contiguous
// raw Gram panels (compute dtype) of rows r0… of the row set against columns c0… of the column
// set. Adds the weighted sums of the four pair terms K', K, K'·log(K'/K), K·log(K/K') into
// `row_sums` (4, R) float64 at rows r0… (over the panel's columns, weighted by wc) and into
// `col_sums` (4, C) float64 at columns c0… (over the panel's rows, weighted by wr). A zero weight
// leaves its row or column out even where its terms are NaN. Deterministic.
struct CrossArgs {
  Tensor rxr, ryr, rxc, ryc;  // inverse norms of the rows (R) and columns (C), compute dtype
  Tensor wr, wc;              // weights (R), (C) or undefined (all 1)
  double eps;
};
using CrossEpilogueFn = void (*)(const Tensor& gx, const Tensor& gy, int64_t r0, int64_t c0, const CrossArgs& args,
                                 Tensor& row_sums, Tensor& col_sums);

// A batched GEMM out[b] = a[b]·b[b] of fp32 operands into fp32 `out` (views with any strides
// that gemm_layout accepts) with an explicit TF32 choice, on the current stream. CUDA: cuBLAS
// with compute type CUBLAS_COMPUTE_32F or CUBLAS_COMPUTE_32F_FAST_TF32, so that neither the
// process-global TF32 setting nor another thread's is read or written (docs/DESIGN.md §4).
using Fp32GemmFn = void (*)(const Tensor& out, const Tensor& a, const Tensor& b, bool tf32);

// Column-major (cuBLAS) arguments of the row-major batched product out (batch, m, n) =
// a (batch, m, k) · b (batch, k, n), computed as outᵀ = bᵀ·aᵀ: cuBLAS's first operand is b, its
// second a. Strides in elements; a size-1 dimension's stride is free. Empty when a stride pattern
// has no such form (neither dimension of a matrix has stride 1, or out's columns are not unit
// stride): the caller copies that operand. Shared by the CUDA GEMM and a CPU test
// (d2sm_ext::_gemm_by_layout) that executes the same arguments with plain loops.
struct GemmLayout {
  bool trans_first, trans_second;  // cuBLAS transa (for b), transb (for a)
  int64_t m, n, k;                 // cuBLAS's: out's columns, out's rows, the inner size
  int64_t ld_first, ld_second, ldc;
  int64_t stride_first, stride_second, stride_c, batch;
};
std::optional<GemmLayout> gemm_layout(const Tensor& out, const Tensor& a, const Tensor& b);
void gemm_by_layout(const Tensor& out, const Tensor& a, const Tensor& b);  // the CPU test's executor

// The fp16 operand of the gradient product (docs/DESIGN.md §4): per-row powers of two (bc, nr)
// that bring each row's peak |W'| into [2^13, 2^14), applied to the fp32 panel (bc, nr, M) in
// place, then one cast to fp16. Returns (W'·scale in fp16, scale). Device-agnostic ATen; exposed
// to a CPU test as d2sm_ext::_fp16_operand.
std::tuple<Tensor, Tensor> fp16_operand(const Tensor& w_panel);

struct DeviceKernels {
  PanelEpilogueFn panel_epilogue = nullptr;
  FinishRowsFn finish_rows = nullptr;
  PairPassFn own_pass = nullptr;                // optional
  bool (*use_own_pass)(const Problem&, bool want_stats) = nullptr;  // optional, with own_pass
  CrossEpilogueFn cross_epilogue = nullptr;     // the queue statistics' cross sums
  Fp32GemmFn fp32_gemm = nullptr;               // optional: fp32 GEMMs with an explicit TF32 choice
};

// Each device's sources register their table once, at library load (a static initialiser).
bool register_device_kernels(c10::DeviceType device, DeviceKernels kernels);
const DeviceKernels& device_kernels(c10::DeviceType device);

// The raw pointers both epilogue implementations take, from PanelEpilogueFn's tensors.
template <typename T>
struct PanelPointers {
  T *gram_x, *gram_y;
  Columns<T> columns;
  T *f, *pu, *qv;  // statistics rows (B, M); null when the statistics are not wanted

  static PanelPointers of(const Tensor& px, const Tensor& py, const Tensor& rx, const Tensor& ry, const Tensor& cols,
                          const Tensor& stats) {
    const bool s = stats.defined();
    return {px.data_ptr<T>(),
            py.data_ptr<T>(),
            {rx.data_ptr<T>(), ry.data_ptr<T>(), cols[0].data_ptr<T>(), cols[1].data_ptr<T>(), cols[2].data_ptr<T>(),
             cols[3].data_ptr<T>(), cols[4].data_ptr<T>()},
            s ? stats[0].data_ptr<T>() : nullptr,
            s ? stats[1].data_ptr<T>() : nullptr,
            s ? stats[2].data_ptr<T>() : nullptr};
  }
};

// The two ops (schemas in ops.cpp; the same functions serve every device's dispatch key).
std::tuple<Tensor, Tensor, Tensor, Tensor> fused_forward(const Tensor& x, const Tensor& y,
                                                         const std::optional<Tensor>& x_memory,
                                                         const std::optional<Tensor>& y_memory,
                                                         std::string divergence, bool exclude_self, double eps,
                                                         bool tf32, std::string reduction, bool need_gx, bool need_gy);
std::tuple<Tensor, Tensor> fused_backward(const Tensor& x, const Tensor& y, const std::optional<Tensor>& x_memory,
                                          const std::optional<Tensor>& y_memory, const Tensor& saved,
                                          const Tensor& grad_rows, std::string divergence, bool exclude_self,
                                          double eps, bool tf32, bool need_gx, bool need_gy);
std::tuple<Tensor, Tensor, Tensor, Tensor> cross_sums(const Tensor& xr, const Tensor& yr, const Tensor& rxr,
                                                      const Tensor& ryr, const Tensor& xc, const Tensor& yc,
                                                      const Tensor& rxc, const Tensor& ryc, double eps,
                                                      const std::optional<Tensor>& row_weight,
                                                      const std::optional<Tensor>& col_weight, int64_t row_split,
                                                      bool keep_gram);
std::tuple<Tensor, Tensor> queue_backward(const Tensor& x, const Tensor& y, const Tensor& x_memory,
                                          const Tensor& y_memory, const Tensor& saved, const Tensor& grad_rows,
                                          std::string divergence, bool exclude_self, double eps, bool tf32,
                                          bool need_gx, bool need_gy, const Tensor& gram_x, const Tensor& gram_y);

}  // namespace d2sm_ext
