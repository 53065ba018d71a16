"""d2sm_ext: fast, exact D2SM (Deep Semantic Statistics Matching, ECCV 2022) loss for PyTorch."""
from .backends import available_backends, mark_unavailable, register_backend, unavailable_backends
from .extractors import build_extractor
from .functional import d2sm_divergence
from .patches import extract_patches, patch_grid
from .queue import FeatureQueue
from .reference import DIVERGENCES, REDUCTIONS, d2sm_reference


def _reference_supports(device_type, dtype):
    return None  # any device, any floating dtype


register_backend("reference", d2sm_reference, _reference_supports, priority=0,
                 description="pure PyTorch with autograd, any device and dtype (the ground truth)")

from . import cpp_backend as _cpp_backend  # noqa: E402  (before Triton: it defines the op namespace)

if _cpp_backend.LOAD_ERROR is None:
    register_backend("cpu", _cpp_backend.d2sm_fused, _cpp_backend.supports_on("cpu", "cpu"), priority=5,
                     description="fused C++ kernel (BLAS panels + parallel epilogue), CPU tensors",
                     positive_eps=True)
else:
    import warnings

    mark_unavailable("cpu", _cpp_backend.LOAD_ERROR)
    warnings.warn(f"d2sm_ext: backend 'cpu' unavailable, 'auto' uses the reference on CPU: {_cpp_backend.LOAD_ERROR}",
                  RuntimeWarning, stacklevel=2)
if _cpp_backend.CUDA_ERROR is None:
    # Explicit only (never picked by "auto"): these kernels compile in CI but have not yet been run
    # on a GPU; "auto" keeps Triton on CUDA until benchmarks/gpu_check.sh has validated them.
    register_backend("cuda", _cpp_backend.d2sm_fused, _cpp_backend.supports_on("cuda", "cuda"), priority=7,
                     description="fused C++/CUDA kernels (cuBLAS panels + CUDA epilogue), CUDA tensors; "
                                 "explicit only until validated on a GPU", auto_device_types=(),
                     usable=_cpp_backend.cuda_usable, positive_eps=True)
else:
    mark_unavailable("cuda", _cpp_backend.CUDA_ERROR)

try:
    from . import triton_backend as _triton_backend
except Exception as exc:  # Triton missing or broken: the rest of the package still works
    mark_unavailable("triton", f"cannot import Triton: {type(exc).__name__}: {exc}")
else:
    register_backend("triton", _triton_backend.d2sm_triton, _triton_backend.supports, priority=10,
                     description="fused Triton kernels: Gram tiles + fused epilogue, panel GEMM for the "
                                 "gradient (CUDA; CPU only under TRITON_INTERPRET=1)", auto_device_types=("cuda",),
                     usable=_triton_backend.usable, positive_eps=True)

from .loss import D2SMLoss  # noqa: E402  (uses the registry above)

__all__ = [
    "d2sm_divergence", "d2sm_reference", "FeatureQueue", "D2SMLoss", "extract_patches", "patch_grid",
    "build_extractor", "available_backends", "unavailable_backends", "register_backend",
    "DIVERGENCES", "REDUCTIONS",
]
__version__ = "0.1.0"
