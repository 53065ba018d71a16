"""Backend "cpu": the C++ extension's fused CPU kernel (csrc/d2sm.cpp), loaded as d2sm_ext._C.

If the extension is missing (not built, D2SM_SKIP_EXTENSION at install) or fails to load (built
against another torch), importing d2sm_ext still works: ``LOAD_ERROR`` says why, the backend is
reported unavailable, and "auto" uses the reference on CPU.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from . import op_glue

LOAD_ERROR: Optional[str] = None
try:
    if os.environ.get("D2SM_NO_EXTENSION", "0") == "1":
        raise ImportError("disabled by D2SM_NO_EXTENSION=1")
    from . import _C  # noqa: F401  (loading registers the TORCH_LIBRARY ops)
except Exception as exc:  # ImportError, or an undefined symbol from a torch mismatch
    LOAD_ERROR = f"the C++ extension d2sm_ext._C could not be loaded ({type(exc).__name__}: {exc}); " \
                 f"rebuild with `pip install --no-build-isolation -e .`"
else:
    op_glue.register("d2sm_ext::fused_forward", "d2sm_ext::fused_backward")

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def d2sm_cpu(x, y, divergence="kl", exclude_self=True, reduction="mean", eps=1e-8,
             x_memory=None, y_memory=None, precision="auto"):
    """Same contract as ``d2sm_reference``; float32/float64 natively, half types in float32."""
    return op_glue.call(torch.ops.d2sm_ext.fused_forward, x, y, divergence, exclude_self, reduction, eps,
                        x_memory, y_memory, False)


def supports(device_type: str, dtype: torch.dtype) -> Optional[str]:
    if device_type != "cpu":
        return f"the C++ kernel is registered for CPU tensors only, got device type '{device_type}'"
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype} not supported"
    return None
