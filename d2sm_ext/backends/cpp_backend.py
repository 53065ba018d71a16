"""Backends "cpu" and "cuda": the C++ extension's fused kernels (csrc/), loaded as d2sm_ext._C.

Both run the same ops (``d2sm_ext::fused_forward`` / ``fused_backward``); the dispatcher picks
the CPU or the CUDA kernel from the tensors' device. The CUDA kernels exist when the extension
was built where a CUDA toolkit was found (setup.py); ``CUDA_ERROR`` says why they are missing.

If the extension is missing (not built: D2SM_BUILD_EXTENSION=0 at install), disabled
(D2SM_LOAD_EXTENSION=0) or fails to load (built against another torch), importing d2sm_ext still works: ``LOAD_ERROR`` says why, both backends
are reported unavailable, and "auto" uses Triton on GPU and the reference on CPU.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import env, fused_op

LOAD_ERROR: Optional[str] = None
CUDA_ERROR: Optional[str] = None
if not env.load_extension():  # a bad value raises here, naming the variable
    LOAD_ERROR = CUDA_ERROR = "disabled by D2SM_LOAD_EXTENSION=0"
else:
    try:
        from .. import _C  # noqa: F401  (loading registers the TORCH_LIBRARY ops)
    except Exception as exc:  # ImportError, or an undefined symbol from a torch mismatch
        LOAD_ERROR = f"the C++ extension d2sm_ext._C could not be loaded ({type(exc).__name__}: {exc}); " \
                     f"rebuild with `pip install --no-build-isolation -e .`"
        CUDA_ERROR = LOAD_ERROR
    else:
        fused_op.register("d2sm_ext::fused_forward", "d2sm_ext::fused_backward")
        if not torch._C._dispatch_has_kernel_for_dispatch_key("d2sm_ext::fused_forward", "CUDA"):
            CUDA_ERROR = "d2sm_ext._C was built without CUDA kernels (no CUDA toolkit found at build time, or " \
                         "D2SM_BUILD_CUDA=0); rebuild where nvcc or CUDA_HOME points to a toolkit"

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def d2sm_fused(x, y, divergence="kl", exclude_self=True, reduction="mean", eps=1e-8,
               x_memory=None, y_memory=None, precision="auto"):
    """Backends "cpu" and "cuda" (the dispatcher picks the kernel from the device); same contract
    as ``d2sm_reference``. CPU: float32/float64 natively, half types in float32 (``precision`` has
    no effect). CUDA: GEMMs in the input dtype on tensor cores for fp16/bf16 (fp32 output), TF32 for
    fp32 when ``precision`` allows it; everything else in fp32 (fp64 for fp64 inputs)."""
    return fused_op.call(torch.ops.d2sm_ext.fused_forward, x, y, divergence, exclude_self, reduction, eps,
                        x_memory, y_memory, fused_op.use_tf32(precision))


def supports_on(backend: str, device_type: str):
    """The registry's ``supports`` predicate of a backend that runs tensors of one device type."""
    def supports(given: str, dtype: torch.dtype) -> Optional[str]:
        if given != device_type:
            kind = device_type.upper()
            return f"backend '{backend}' runs {kind} tensors only, got device type '{given}'"
        if dtype not in SUPPORTED_DTYPES:
            return f"dtype {dtype} not supported"
        return None
    return supports


def cuda_usable() -> Optional[str]:
    """Why backend "cuda" cannot run on this machine (None when a CUDA device is visible)."""
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    return None


# ---------------------------------------------------------------------------------------------
# The kept-statistics queue path (registry.QueueKernels, docs/DESIGN.md §3.6)
# ---------------------------------------------------------------------------------------------
def cross_sums(xr, yr, rxr, ryr, xc, yc, rxc, ryc, eps, row_weight, col_weight, row_split, keep_gram):
    """``QueueKernels.cross_sums`` with the C++ op (csrc/driver.cpp): Gram panels (BLAS on CPU,
    cuBLAS on CUDA) and the device's cross epilogue (CPU: one vectorised pass, row sums in double,
    column sums per thread combined in thread order; CUDA: csrc/cuda/kernels.cu, float64 sums)."""
    with torch.autocast(xr.device.type, enabled=False):
        rows, cols, gram_x, gram_y = torch.ops.d2sm_ext.cross_sums(
            xr, yr, rxr, ryr, xc, yc, rxc, ryc, float(eps), row_weight, col_weight, int(row_split), bool(keep_gram))
    return rows, cols, (gram_x if keep_gram else None), (gram_y if keep_gram else None)


def queue_backward(x, y, xm, ym, saved, grad_rows, divergence, exclude_self, eps, tf32, need_gx, need_gy,
                   gram_x=None, gram_y=None):
    """``QueueKernels.backward``: the C++ queue backward (CPU and CUDA), with the loss's Gram blocks
    when given."""
    empty = x.new_empty(0)
    with torch.autocast(x.device.type, enabled=False):
        return torch.ops.d2sm_ext.queue_backward(
            x, y, xm, ym, saved, grad_rows, divergence, exclude_self, float(eps), tf32, need_gx, need_gy,
            empty if gram_x is None else gram_x, empty if gram_y is None else gram_y)


def _fake_cross_sums(xr, yr, rxr, ryr, xc, yc, rxc, ryc, eps, row_weight, col_weight, row_split, keep_gram):
    cdt = torch.float64 if xr.dtype == torch.float64 else torch.float32
    gram = (xr.shape[0], xc.shape[0]) if keep_gram else (0,)
    return (xr.new_empty((4, xr.shape[0]), dtype=torch.float64), xr.new_empty((2, 4, xc.shape[0]), dtype=torch.float64),
            xr.new_empty(gram, dtype=cdt), xr.new_empty(gram, dtype=cdt))


def _fake_queue_backward(x, y, xm, ym, saved, grad_rows, divergence, exclude_self, eps, tf32, need_gx, need_gy,
                         gram_x, gram_y):
    return fused_op.fake_backward(x, y, xm, ym, saved, grad_rows, divergence, exclude_self, eps, tf32, need_gx,
                                  need_gy)


if LOAD_ERROR is None:
    torch.library.register_fake("d2sm_ext::cross_sums", _fake_cross_sums)
    torch.library.register_fake("d2sm_ext::queue_backward", _fake_queue_backward)
