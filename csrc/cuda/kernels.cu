// CUDA kernels of the fused D2SM pass: the panel epilogue and the gradient finish, registered as
// the CUDA entries of the driver's DeviceKernels table (csrc/driver.h has the contracts;
// csrc/driver.cpp drives them between cuBLAS GEMMs on the current stream), the fp32 GEMM with an
// explicit TF32 choice (fp32_gemm_cuda),
// together with the CUDA dispatch key of the ops. docs/DESIGN.md §3 has the math.
//
// The Gram and W'·X products are cuBLAS GEMMs (shared-memory tiled, tensor cores for fp16/bf16
// and for fp32 when TF32 is allowed, fp32 accumulation); the kernels here are the O(R·M) epilogue
// over a panel and the O(N·d) finish. Both use the per-pair/per-row math of pair_math.h, the same
// code the CPU kernels run, so the CPU tests check every formula evaluated here.
//
// Layout: one thread block per panel row (epilogue) or per live row (finish); threads stride over
// the row's columns, which keeps every global access coalesced (panel rows and the (B, M) column
// arrays are contiguous). Row sums are per-thread partial sums in the accumulate type (fp32 for
// fp32, fp64 for fp64), combined by a fixed shared-memory tree: deterministic, no atomics.
// All offsets are int64.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>

#include <torch/library.h>

#include "../driver.h"

namespace d2sm_ext {
namespace {

constexpr int kThreads = 256;

struct DeviceLog {
  __host__ __device__ float operator()(float x) const { return logf(x); }
  __host__ __device__ double operator()(double x) const { return log(x); }
};

// Sum over the block of one value per thread, in a fixed tree order; every thread gets the sum.
template <typename Acc>
__device__ Acc block_sum(Acc v, Acc* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  const Acc total = shared[0];
  __syncthreads();  // shared is reused by the caller's next block_sum
  return total;
}

template <typename T, int DIV, typename Kind>
__global__ void __launch_bounds__(kThreads)
panel_epilogue_kernel(T* __restrict__ sx, T* __restrict__ sy, int64_t nr, int64_t b0, int64_t row0, int64_t M,
                      Columns<T> all, bool exclude_self, T eps, T* f_all, T* pu_all, T* qv_all) {
  using Acc = at::acc_type<T, /*is_cuda=*/true>;
  __shared__ Acc shared[kThreads];
  const int64_t row = blockIdx.x;  // panel row = (problem b0 + row / nr, sample row row0 + row % nr)
  const int64_t b = b0 + row / nr, gi = row0 + row % nr;
  const Columns<T> c = all.shifted(b * M);
  const RowConstants<T> ri = RowConstants<T>::load(c, gi);
  const int64_t skip = exclude_self ? gi : -1;
  T* row_x = sx + row * M;
  T* row_y = sy + row * M;
  RowSums<Acc> sums{0, 0, 0};
  for (int64_t j = threadIdx.x; j < M; j += kThreads) {
    const RowSums<T> t = epilogue_pair<DIV, Kind>(row_x[j], row_y[j], ri, c, j, j != skip, eps, DeviceLog{});
    sums.f += Acc(t.f);
    sums.pu += Acc(t.pu);
    sums.qv += Acc(t.qv);
  }
  if constexpr (Kind::stats) {
    const Acc f = block_sum(sums.f, shared);
    const Acc pu = block_sum(sums.pu, shared);
    const Acc qv = block_sum(sums.qv, shared);
    if (threadIdx.x == 0) {
      f_all[b * M + gi] = T(f);
      pu_all[b * M + gi] = T(pu);
      qv_all[b * M + gi] = T(qv);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
finish_rows_kernel(T* __restrict__ g_all, const T* __restrict__ x_all, const T* __restrict__ r_all,
                   const T* __restrict__ c_all, const T* __restrict__ s_all, const T* __restrict__ t_all, int64_t N,
                   int64_t D, int64_t M, bool exclude_self) {
  using Acc = at::acc_type<T, /*is_cuda=*/true>;
  __shared__ Acc shared[kThreads];
  const int64_t row = blockIdx.x, b = row / N, k = row % N;
  T* g = g_all + row * D;
  const T* x = x_all + row * D;
  const T* sb = s_all + b * D;
  const T* tb = t_all + b * D;
  const T rk = r_all[b * M + k], ck = c_all[b * M + k];
  const T self = exclude_self ? ck * rk : T(0);
  Acc dot = 0;  // x̂·g
  for (int64_t j = threadIdx.x; j < D; j += kThreads) {
    const T v = xhat_grad(g[j], x[j], sb[j], tb[j], ck, self);
    g[j] = v;
    dot += Acc(v) * Acc(x[j] * rk);
  }
  const T dk = T(block_sum(dot, shared));
  for (int64_t j = threadIdx.x; j < D; j += kThreads) g[j] = project_out(g[j], x[j], rk, dk);
}

void check_cuda_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous(), name, " must be a contiguous CUDA tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name, " must be float32 or float64");
}

void panel_epilogue_cuda(int div, const at::Tensor& px, const at::Tensor& py, int64_t b0, int64_t row0,
                         const at::Tensor& rx, const at::Tensor& ry, const at::Tensor& cols, bool exclude_self,
                         double eps, bool grad_x, bool grad_y, const at::Tensor& stats) {
  check_cuda_float(px, "Gram panel");
  check_cuda_float(py, "Gram panel");
  const int64_t bc = px.size(0), nr = px.size(1), M = px.size(2);
  const int64_t blocks = bc * nr;
  if (blocks == 0 || M == 0) return;
  TORCH_CHECK(blocks <= int64_t(INT32_MAX), "too many panel rows for one launch: ", blocks);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(px.scalar_type(), "d2sm_panel_epilogue_cuda", [&] {
    using T = scalar_t;
    const auto ptr = PanelPointers<T>::of(px, py, rx, ry, cols, stats);
    const dim3 grid(static_cast<unsigned>(blocks));
    dispatch_pass(div, stats.defined(), grad_x, grad_y, [&](auto div_tag, auto kind) {
      panel_epilogue_kernel<T, decltype(div_tag)::value, decltype(kind)><<<grid, kThreads, 0, stream>>>(
          ptr.gram_x, ptr.gram_y, nr, b0, row0, M, ptr.columns, exclude_self, T(eps), ptr.f, ptr.pu, ptr.qv);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void finish_rows_cuda(const at::Tensor& pairwise, const at::Tensor& live, const at::Tensor& r, const at::Tensor& coef,
                      const at::Tensor& s, const at::Tensor& t, bool exclude_self) {
  check_cuda_float(pairwise, "pairwise gradient");
  check_cuda_float(live, "rows");
  const int64_t B = pairwise.size(0), N = pairwise.size(1), D = pairwise.size(2), M = r.size(1);
  const int64_t blocks = B * N;
  if (blocks == 0 || D == 0) return;
  TORCH_CHECK(blocks <= int64_t(INT32_MAX), "too many rows for one launch: ", blocks);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(pairwise.scalar_type(), "d2sm_finish_rows_cuda", [&] {
    finish_rows_kernel<scalar_t><<<dim3(static_cast<unsigned>(blocks)), kThreads, 0, stream>>>(
        pairwise.data_ptr<scalar_t>(), live.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), coef.data_ptr<scalar_t>(),
        s.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), N, D, M, exclude_self);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Cross-sums epilogue (driver.h's CrossEpilogueFn; docs/DESIGN.md §3.6): two passes over the
// panel, each owning its outputs (deterministic, no atomics): one block per panel row for the
// row sums (threads stride the columns, float64 partials combined by the fixed tree), one thread
// per column for the column sums (rows in order, float64). Both evaluate pair_math.h's
// pair_kernel, the CPU kernel's arithmetic.
template <typename T>
struct CrossTerms {
  T a, b, c, d;
};

template <typename T>
__device__ __forceinline__ CrossTerms<T> cross_terms(T gx, T gy, T rxi, T ryi, T rxj, T ryj, T eps) {
  const PairKernel<T> pk = pair_kernel(gx * rxi * rxj, gy * ryi * ryj, eps, DeviceLog{});
  return {pk.ka, pk.kb, pk.ka * pk.lab, -pk.kb * pk.lab};
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
cross_rows_kernel(const T* __restrict__ gx, const T* __restrict__ gy, int64_t nc, const T* rxr, const T* ryr,
                  const T* rxc, const T* ryc, const T* wc, T eps, double* row_sums, int64_t R) {
  __shared__ double shared[kThreads];
  const int64_t i = blockIdx.x;
  const T rxi = rxr[i], ryi = ryr[i];
  double acc[4] = {0, 0, 0, 0};
  for (int64_t j = threadIdx.x; j < nc; j += kThreads) {
    const T wj = wc ? wc[j] : T(1);
    if (wj == T(0)) continue;  // a zero weight leaves the column out, NaN terms included
    const CrossTerms<T> t = cross_terms(gx[i * nc + j], gy[i * nc + j], rxi, ryi, rxc[j], ryc[j], eps);
    acc[0] += double(wj * t.a);
    acc[1] += double(wj * t.b);
    acc[2] += double(wj * t.c);
    acc[3] += double(wj * t.d);
  }
  for (int s = 0; s < 4; ++s) {
    const double total = block_sum(acc[s], shared);
    if (threadIdx.x == 0) row_sums[s * R + i] += total;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
cross_cols_kernel(const T* __restrict__ gx, const T* __restrict__ gy, int64_t nr, int64_t nc, const T* rxr,
                  const T* ryr, const T* rxc, const T* ryc, const T* wr, T eps, double* col_sums, int64_t C) {
  const int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= nc) return;
  const T rxj = rxc[j], ryj = ryc[j];
  double acc[4] = {0, 0, 0, 0};
  for (int64_t i = 0; i < nr; ++i) {  // coalesced: the threads of a warp read consecutive columns
    const T wi = wr ? wr[i] : T(1);
    if (wi == T(0)) continue;
    const CrossTerms<T> t = cross_terms(gx[i * nc + j], gy[i * nc + j], rxr[i], ryr[i], rxj, ryj, eps);
    acc[0] += double(wi * t.a);
    acc[1] += double(wi * t.b);
    acc[2] += double(wi * t.c);
    acc[3] += double(wi * t.d);
  }
  for (int s = 0; s < 4; ++s) col_sums[s * C + j] += acc[s];
}

void cross_epilogue_cuda(const Tensor& gx, const Tensor& gy, int64_t r0, int64_t c0, const CrossArgs& args,
                         Tensor& row_sums, Tensor& col_sums) {
  const int64_t nr = gx.size(0), nc = gx.size(1), R = row_sums.size(1), C = col_sums.size(1);
  TORCH_CHECK(nr <= int64_t(INT32_MAX) && (nc + kThreads - 1) / kThreads <= int64_t(INT32_MAX),
              "cross_sums: panel too large for one launch: ", nr, " x ", nc);
  const Tensor gx_ = gx.contiguous(), gy_ = gy.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(gx.scalar_type(), "d2sm_cross_epilogue_cuda", [&] {
    using T = scalar_t;
    const T* wr = args.wr.defined() ? args.wr.data_ptr<T>() + r0 : nullptr;
    const T* wc = args.wc.defined() ? args.wc.data_ptr<T>() + c0 : nullptr;
    const T *rxr = args.rxr.data_ptr<T>() + r0, *ryr = args.ryr.data_ptr<T>() + r0;
    const T *rxc = args.rxc.data_ptr<T>() + c0, *ryc = args.ryc.data_ptr<T>() + c0;
    cross_rows_kernel<T><<<dim3(static_cast<unsigned>(nr)), kThreads, 0, stream>>>(
        gx_.data_ptr<T>(), gy_.data_ptr<T>(), nc, rxr, ryr, rxc, ryc, wc, T(args.eps),
        row_sums.data_ptr<double>() + r0, R);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cross_cols_kernel<T><<<dim3(static_cast<unsigned>((nc + kThreads - 1) / kThreads)), kThreads, 0, stream>>>(
        gx_.data_ptr<T>(), gy_.data_ptr<T>(), nr, nc, rxr, ryr, rxc, ryc, wr, T(args.eps),
        col_sums.data_ptr<double>() + c0, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// fp32 GEMM with an explicit TF32 choice (driver.h's Fp32GemmFn; docs/DESIGN.md §4): cuBLAS
// with the compute type of this call (CUBLAS_COMPUTE_32F: IEEE; CUBLAS_COMPUTE_32F_FAST_TF32),
// on the current stream through the thread's and stream's ATen handle. The handle's math mode is
// set to CUBLAS_DEFAULT_MATH first (ATen sets it on every GEMM of its own, from its flags), so the
// compute type alone decides: no global flag is read or written. Operands whose strides have no
// cuBLAS form are copied contiguous; an `out` without one is written through a contiguous buffer.
void fp32_gemm_cuda(const Tensor& out, const Tensor& a, const Tensor& b, bool tf32) {
  TORCH_CHECK(out.is_cuda() && out.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat &&
                  b.scalar_type() == at::kFloat,
              "fp32 GEMM: float32 CUDA tensors");
  if (out.numel() == 0) return;
  if (a.size(2) == 0) {
    out.zero_();
    return;
  }
  std::optional<GemmLayout> l = gemm_layout(out, a, b);
  if (!l.has_value()) {
    const Tensor ac = a.contiguous(), bc = b.contiguous();
    if (!gemm_layout(out, ac, bc).has_value()) {  // out itself has no cuBLAS form
      Tensor tmp = at::empty(out.sizes(), out.options());
      fp32_gemm_cuda(tmp, ac, bc, tf32);
      out.copy_(tmp);
      return;
    }
    fp32_gemm_cuda(out, ac, bc, tf32);
    return;
  }
  const int64_t limit = INT32_MAX;
  TORCH_CHECK(l->m <= limit && l->n <= limit && l->k <= limit && l->ld_first <= limit && l->ld_second <= limit &&
                  l->ldc <= limit && l->batch <= limit,
              "fp32 GEMM: sizes beyond cuBLAS's 32-bit arguments: ", out.sizes(), ", k = ", l->k);
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  TORCH_CUDABLAS_CHECK(cublasSetMathMode(handle, CUBLAS_DEFAULT_MATH));
  const float alpha = 1.0f, beta = 0.0f;
  TORCH_CUDABLAS_CHECK(cublasGemmStridedBatchedEx(
      handle, l->trans_first ? CUBLAS_OP_T : CUBLAS_OP_N, l->trans_second ? CUBLAS_OP_T : CUBLAS_OP_N, int(l->m),
      int(l->n), int(l->k), &alpha, b.data_ptr<float>(), CUDA_R_32F, int(l->ld_first), l->stride_first,
      a.data_ptr<float>(), CUDA_R_32F, int(l->ld_second), l->stride_second, &beta, out.data_ptr<float>(), CUDA_R_32F,
      int(l->ldc), l->stride_c, int(l->batch), tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F,
      CUBLAS_GEMM_DEFAULT));
}

}  // namespace

const bool cuda_kernels_registered = register_device_kernels(
    c10::DeviceType::CUDA,
    DeviceKernels{panel_epilogue_cuda, finish_rows_cuda, nullptr, nullptr, cross_epilogue_cuda, fp32_gemm_cuda});

// The driver is device-generic: the same functions serve every device's dispatch key.
TORCH_LIBRARY_IMPL(d2sm_ext, CUDA, m) {
  m.impl("fused_forward", &fused_forward);
  m.impl("fused_backward", &fused_backward);
  m.impl("cross_sums", &cross_sums);
  m.impl("queue_backward", &queue_backward);
}

}  // namespace d2sm_ext
