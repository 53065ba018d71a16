// The two device-specific steps of the fused pass (d2sm.cpp drives them; everything else is
// device-generic ATen): the panel epilogue and the per-row finish of the gradient. Each has a CPU
// implementation (d2sm.cpp) and a CUDA one (d2sm_cuda.cu, compiled when setup.py finds a CUDA
// toolkit; D2SM_WITH_CUDA is then defined).
#pragma once

#include <ATen/ATen.h>

#include "pair_math.h"

namespace d2sm_ext {

// Panel epilogue. px/py: (bc, nr, M) contiguous raw Gram panels of sample rows row0…row0+nr−1 of
// problems b0…b0+bc−1 (compute dtype), overwritten with W' for the sides in grad_x/grad_y.
// rx/ry: (B, M) inverse norms; cols: (5, B, M) = 1/A, 1/B, log(B/A), w/A, w/B; stats: (3, B, M)
// = F, ū, v̄ (rows row0… are written), or undefined when the statistics are not wanted.
using PanelEpilogueFn = void (*)(int div, const at::Tensor& px, const at::Tensor& py, int64_t b0, int64_t row0,
                                 const at::Tensor& rx, const at::Tensor& ry, const at::Tensor& cols,
                                 bool exclude_self, double eps, bool grad_x, bool grad_y, const at::Tensor& stats);

// Gradient finish of the live rows, in place: `pairwise` (B, N, d) holds Σ_j W'_kj x_j on entry
// and ∂L/∂x on exit. live: (B, N, d) rows; r, coef: (B, M) inverse norms and α ū;
// s, t: (B, d) Σ_j x̂_j and Σ_j α_j ū_j x̂_j.
using FinishRowsFn = void (*)(const at::Tensor& pairwise, const at::Tensor& live, const at::Tensor& r,
                              const at::Tensor& coef, const at::Tensor& s, const at::Tensor& t, bool exclude_self);

// The raw pointers both epilogue implementations take, from PanelEpilogueFn's tensors.
template <typename T>
struct PanelPointers {
  T *gram_x, *gram_y;
  Columns<T> columns;
  T *f, *pu, *qv;  // statistics rows (B, M); null when the statistics are not wanted

  static PanelPointers of(const at::Tensor& px, const at::Tensor& py, const at::Tensor& rx, const at::Tensor& ry,
                          const at::Tensor& cols, const at::Tensor& stats) {
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

void panel_epilogue_cpu(int div, const at::Tensor& px, const at::Tensor& py, int64_t b0, int64_t row0,
                        const at::Tensor& rx, const at::Tensor& ry, const at::Tensor& cols, bool exclude_self,
                        double eps, bool grad_x, bool grad_y, const at::Tensor& stats);
void finish_rows_cpu(const at::Tensor& pairwise, const at::Tensor& live, const at::Tensor& r, const at::Tensor& coef,
                     const at::Tensor& s, const at::Tensor& t, bool exclude_self);

#ifdef D2SM_WITH_CUDA
void panel_epilogue_cuda(int div, const at::Tensor& px, const at::Tensor& py, int64_t b0, int64_t row0,
                         const at::Tensor& rx, const at::Tensor& ry, const at::Tensor& cols, bool exclude_self,
                         double eps, bool grad_x, bool grad_y, const at::Tensor& stats);
void finish_rows_cuda(const at::Tensor& pairwise, const at::Tensor& live, const at::Tensor& r, const at::Tensor& coef,
                      const at::Tensor& s, const at::Tensor& t, bool exclude_self);
#endif

}  // namespace d2sm_ext
