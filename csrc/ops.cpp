// The extension's entry points: the op schemas (TORCH_LIBRARY) and PyInit__C, so that
// `import d2sm_ext._C` loads the library and with it every registration. The ops' contract
// (inputs, the six saved row statistics, gradients fused into the forward for "mean"/"sum") is
// d2sm_ext/op_glue.py's docstring; the Triton backend defines the same two schemas (a test checks
// they are equal). Each device registers its dispatch key beside its kernels (csrc/cpu/,
// csrc/cuda/); the implementation is the device-generic driver (csrc/driver.cpp).
#include <Python.h>

#include <torch/library.h>

#include "driver.h"

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(d2sm_ext, m) {
  m.def("fused_forward(Tensor x, Tensor y, Tensor? x_memory, Tensor? y_memory, str divergence, bool exclude_self, "
        "float eps, bool tf32, str reduction, bool need_gx, bool need_gy) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("fused_backward(Tensor x, Tensor y, Tensor? x_memory, Tensor? y_memory, Tensor saved, Tensor grad_rows, "
        "str divergence, bool exclude_self, float eps, bool tf32, bool need_gx, bool need_gy) -> (Tensor, Tensor)");
  // Queue statistics (docs/DESIGN.md §3.6): weighted row and column sums of the pair terms
  // K', K, K'·log(K'/K), K·log(K/K') between row set R and column set C, float64: row sums (4, R),
  // column sums (2, 4, C) of the rows before row_split and of the rest (the loss's live rows and
  // the rows the next enqueue evicts share one product per side). keep_gram: also return the raw
  // Gram blocks (R, C) of x and y (empty otherwise), for queue_backward and the enqueue.
  m.def("cross_sums(Tensor xr, Tensor yr, Tensor rxr, Tensor ryr, Tensor xc, Tensor yc, Tensor rxc, Tensor ryc, "
        "float eps, Tensor? row_weight, Tensor? col_weight, int row_split, bool keep_gram) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // The gradient of the queue path (fused_backward's contract, one sample set): the raw Gram
  // blocks of the live rows against the memory rows (N, Q) come from the loss's cross block when
  // given (empty: recomputed), and Σ_j x̂_j, Σ_j α_j ū_j x̂_j ride in the gradient product as two
  // extra rows, so the pass reads the memory rows once.
  m.def("queue_backward(Tensor x, Tensor y, Tensor x_memory, Tensor y_memory, Tensor saved, Tensor grad_rows, "
        "str divergence, bool exclude_self, float eps, bool tf32, bool need_gx, bool need_gy, Tensor gram_x, "
        "Tensor gram_y) -> (Tensor, Tensor)");
  // Test support, CPU float32 only: out = a·b (batched) computed from the column-major cuBLAS
  // arguments the CUDA GEMM derives for these strides (driver.h gemm_layout), with plain loops.
  m.def("_gemm_by_layout(Tensor(a!) out, Tensor a, Tensor b) -> ()", &d2sm_ext::gemm_by_layout);
  // Test support: the C++ gradient product's fp16 operand (W' scaled in place, then cast).
  m.def("_fp16_operand(Tensor(a!) w) -> (Tensor, Tensor)", &d2sm_ext::fp16_operand);
}
