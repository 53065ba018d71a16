"""Registers the built-in backends with the registry (d2sm_ext.registry), highest priority first
for "auto": cuda (12) and triton (10) on CUDA where d2sm_ext/auto_rules.py's measured rule says
they are faster (cuda first: faster than triton in TF32 and bf16 on an H200, where triton's IEEE
fp32 did not compile, and on the queue step), cpu (5), dense (1, any device and dtype, eps >= 1.18e-38: the fast pure-PyTorch
fallback), reference (0, any device and dtype, any eps: the ground truth). A backend that cannot
be loaded here is recorded with the reason (``d2sm_ext.unavailable_backends()``) instead of
failing the import.

Each fused backend defines its torch.library ops on import: the C++ extension's
``d2sm_ext::fused_forward``/``fused_backward`` (csrc/ops.cpp) and Triton's
``d2sm_ext::triton_d2sm``/``triton_d2sm_backward`` (triton_backend.py) share one schema
(fused_op's docstring; tests/test_backend_matrix.py checks that they are equal).

Each backend also registers its kernels of the kept-statistics queue path (``QueueKernels``,
docs/DESIGN.md §3.6), beside the rest of it: reference — the PyTorch cross sums, gradient by
autograd; cpu and cuda — the C++ cross sums (BLAS/cuBLAS Gram panels + the device's cross
epilogue) and queue backward, with the Gram hand-over (the CUDA kernels are compiled here and
validated on a GPU by the GPU issue's run); triton — its cross-sums kernel and queue backward op,
with the Gram hand-over.
"""
import warnings

from .. import auto_rules
from . import cpp_backend, dense_backend
from ..queue.statistics import cross_sums_torch
from ..reference import d2sm_reference
from ..registry import QueueKernels, mark_unavailable, register_backend


def _reference_supports(device_type, dtype):
    return None  # any device, any floating dtype


register_backend("reference", d2sm_reference, _reference_supports, priority=0,
                 description="pure PyTorch with autograd, any device and dtype (the ground truth)",
                 queue=QueueKernels(cross_sums_torch))
register_backend("dense", dense_backend.d2sm_dense, dense_backend.supports, priority=1,
                 description="dense PyTorch with autograd, written for speed (row sums of the kernel matrices, "
                             "no p/q matrices), any device and dtype; eps >= 1.18e-38",
                 positive_eps=True, queue=QueueKernels(cross_sums_torch))


if cpp_backend.LOAD_ERROR is None:
    register_backend("cpu", cpp_backend.d2sm_fused, cpp_backend.supports_on("cpu", "cpu"), priority=5,
                     description="fused C++ kernel (BLAS panels + parallel epilogue), CPU tensors",
                     positive_eps=True,
                     queue=QueueKernels(cpp_backend.cross_sums, cpp_backend.queue_backward, keeps_gram=True))
else:
    mark_unavailable("cpu", cpp_backend.LOAD_ERROR)
    warnings.warn(f"d2sm_ext: backend 'cpu' unavailable, 'auto' uses the dense PyTorch path on CPU: "
                  f"{cpp_backend.LOAD_ERROR}", RuntimeWarning, stacklevel=2)
if cpp_backend.CUDA_ERROR is None:
    # Validated on an H200 (issue 26: 368 of 370 GPU tests, the two failures explained and fixed).
    register_backend("cuda", cpp_backend.d2sm_fused, cpp_backend.supports_on("cuda", "cuda"), priority=12,
                     description="fused C++/CUDA kernels (cuBLAS panels + CUDA epilogue), CUDA tensors",
                     auto_device_types=("cuda",), usable=cpp_backend.cuda_usable, positive_eps=True,
                     queue=QueueKernels(cpp_backend.cross_sums, cpp_backend.queue_backward, keeps_gram=True),
                     auto_rule=auto_rules.rule_for("cuda"))
else:
    mark_unavailable("cuda", cpp_backend.CUDA_ERROR)

try:
    from . import triton_backend
except Exception as exc:  # Triton missing or broken: the rest of the package still works
    mark_unavailable("triton", f"cannot import Triton: {type(exc).__name__}: {exc}")
else:
    register_backend("triton", triton_backend.d2sm_triton, triton_backend.supports, priority=10,
                     description="fused Triton kernels: Gram tiles + fused epilogue, panel GEMM for the "
                                 "gradient (CUDA; CPU only under TRITON_INTERPRET=1)", auto_device_types=("cuda",),
                     usable=triton_backend.usable, positive_eps=True,
                     queue=QueueKernels(triton_backend.cross_sums, triton_backend.queue_backward, keeps_gram=True),
                     auto_rule=auto_rules.rule_for("triton"))
