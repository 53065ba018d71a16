// The extension's entry points: the op schemas (TORCH_LIBRARY) and PyInit__C, so that
// `import d2sm_ext._C` loads the library and with it every registration. The ops' contract
// (inputs, the six saved row statistics, gradients fused into the forward for "mean"/"sum") is
// d2sm_ext/op_glue.py's docstring; the Triton backend defines the same two schemas (a test checks
// they are equal). Each device registers its dispatch key beside its kernels (csrc/cpu/,
// csrc/cuda/); the implementation is the device-generic driver (csrc/driver.cpp).
#include <Python.h>

#include <torch/library.h>

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
  // K', K, K'·log(K'/K), K·log(K/K') between row set R and column set C, float64 (4, R), (4, C).
  // keep_gram: also return the raw Gram blocks (R, C) of x and y (empty otherwise), which
  // fused_backward_cross takes instead of multiplying the live rows against the memory again.
  m.def("cross_sums(Tensor xr, Tensor yr, Tensor rxr, Tensor ryr, Tensor xc, Tensor yc, Tensor rxc, Tensor ryc, "
        "float eps, Tensor? row_weight, Tensor? col_weight, bool keep_gram) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("fused_backward_cross(Tensor x, Tensor y, Tensor x_memory, Tensor y_memory, Tensor saved, Tensor grad_rows, "
        "str divergence, bool exclude_self, float eps, bool tf32, bool need_gx, bool need_gy, Tensor gram_x, "
        "Tensor gram_y) -> (Tensor, Tensor)");
}
