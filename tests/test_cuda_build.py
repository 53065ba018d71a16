"""The extension's "cuda" backend where no GPU is needed (CI included): the CUDA kernels must have
been compiled wherever setup.py's rule says a toolkit can build them, and the backend's
registration, errors and precision switch are checked. Running the kernels: the CUDA rows of the
backend matrix and tests/test_cuda_on_gpu.py (on a GPU only)."""
import pytest
import torch

import d2sm_ext
from d2sm_ext import fused_op
from d2sm_ext.backends import cpp_backend
from cuda_toolkit import cuda_build_blocker
from d2sm_ext.registry import resolve_backend



def test_cuda_kernels_compiled_where_a_toolkit_can_build_them():
    blocker = cuda_build_blocker(torch.version.cuda)
    if blocker is not None:
        pytest.skip(f"setup.py builds no CUDA kernels here: {blocker}")
    assert cpp_backend.LOAD_ERROR is None, cpp_backend.LOAD_ERROR
    assert cpp_backend.CUDA_ERROR is None, cpp_backend.CUDA_ERROR
    for op in ("fused_forward", "fused_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"d2sm_ext::{op}", "CUDA"), op
    # listed as available only where it can run (a CUDA device is visible)
    if torch.cuda.is_available():
        assert "cuda" in d2sm_ext.available_backends()
    else:
        assert "cuda" not in d2sm_ext.available_backends()
        assert "no CUDA device" in d2sm_ext.unavailable_backends()["cuda"]


def test_registration_and_errors():
    if cpp_backend.CUDA_ERROR is not None or not torch.cuda.is_available():
        assert "cuda" in d2sm_ext.unavailable_backends()
        with pytest.raises(ValueError, match="backend 'cuda' cannot run here"):
            d2sm_ext.d2sm_divergence(torch.randn(4, 3), torch.randn(4, 3), backend="cuda")
        return
    # validated on an H200: the highest priority on CUDA (auto_rules.py rules it per shape)
    assert resolve_backend("auto", "cuda", torch.float64).name == "cuda"
    assert resolve_backend("cuda", "cuda", torch.bfloat16).name == "cuda"
    with pytest.raises(ValueError, match="backend 'cuda' cannot run.*CUDA tensors only"):
        d2sm_ext.d2sm_divergence(torch.randn(4, 3), torch.randn(4, 3), backend="cuda")


def test_precision_switch():
    assert fused_op.use_tf32("tf32") and not fused_op.use_tf32("ieee")
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert not fused_op.use_tf32("auto")
        torch.set_float32_matmul_precision("high")
        assert fused_op.use_tf32("auto")
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9: the per-backend setting
            torch.set_float32_matmul_precision("highest")
            torch.backends.cuda.matmul.fp32_precision = "tf32"  # alone: get_float32_matmul_precision() raises
            assert fused_op.use_tf32("auto")
            torch.backends.cuda.matmul.fp32_precision = "ieee"
            assert not fused_op.use_tf32("auto")
    finally:
        torch.set_float32_matmul_precision(old)  # sets both the global and the per-backend value
