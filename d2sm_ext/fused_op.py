"""What every fused backend's torch.library ops share: fake (meta) implementations, autograd,
and the call from the backend registry.

A fused backend provides two ops with these schemas (defined in Python with ``custom_op`` for
Triton, in C++ with ``TORCH_LIBRARY`` for the extension):

    forward(Tensor x, Tensor y, Tensor? x_memory, Tensor? y_memory, str divergence,
            bool exclude_self, float eps, bool tf32, str reduction, bool need_gx, bool need_gy)
        -> (Tensor value, Tensor saved, Tensor gx, Tensor gy)
    backward(Tensor x, Tensor y, Tensor? x_memory, Tensor? y_memory, Tensor saved,
             Tensor grad_rows, str divergence, bool exclude_self, float eps, bool tf32,
             bool need_gx, bool need_gy) -> (Tensor gx, Tensor gy)

``value`` is the reduced loss (or per-row values for "none") in the compute dtype (float32 for
float16/bfloat16/float32 inputs, float64 for float64); ``call`` casts it to x's dtype outside
autocast and keeps it in float32 under autocast, like PyTorch's losses. ``saved`` holds six
(B, M) row statistics (1/‖x‖, 1/‖y‖, A, B, ū, v̄) in the compute dtype; for "mean"/"sum" the
forward also returns ∂value/∂x and ∂value/∂y (computed in the same pass; empty unless asked),
so the backward only scales them by grad_output — no host sync. For "none" the backward op
recomputes the tiles with the upstream gradient as row weights.

Mixed precision (docs/DESIGN.md §4): both ops have an autocast kernel on CPU and CUDA that casts
x, y and the memory rows to their widest dtype and runs the op with autocast excluded, so the
ATen GEMMs inside it are not re-dispatched to lower precision. The gradients the ops return are
in the compute dtype; the autograd formula applies the upstream gradient first and casts to the
input's dtype last, so nothing is rounded to half precision before a GradScaler's scale is in.
"""
from __future__ import annotations

from typing import Callable

import torch

from .reference import compute_dtype, output_dtype, promote

EMPTY = (0,)


def _grad_shape(t: torch.Tensor, needed: bool):
    return t.shape if needed else EMPTY


def fake_forward(x, y, x_memory, y_memory, divergence, exclude_self, eps, tf32, reduction, need_gx, need_gy):
    bsz = x.shape[0] if x.ndim == 3 else 1
    m = x.shape[-2] + (0 if x_memory is None else x_memory.shape[-2])
    cdt = compute_dtype(x.dtype)
    if reduction == "none":
        value = x.new_empty((bsz, m) if x.ndim == 3 else (m,), dtype=cdt)
    else:
        value = x.new_empty((), dtype=cdt)
    fused = reduction != "none"
    return (value, x.new_empty((6, bsz, m), dtype=cdt),
            x.new_empty(_grad_shape(x, need_gx and fused), dtype=cdt),
            y.new_empty(_grad_shape(y, need_gy and fused), dtype=cdt))


def fake_backward(x, y, x_memory, y_memory, saved, grad_rows, divergence, exclude_self, eps, tf32, need_gx, need_gy):
    cdt = compute_dtype(x.dtype)
    return (x.new_empty(_grad_shape(x, need_gx), dtype=cdt), y.new_empty(_grad_shape(y, need_gy), dtype=cdt))


def save_for_backward(ctx, reduction: str, input_dtypes: tuple, need: tuple, grads: tuple, recompute: Callable,
                      recompute_inputs: tuple) -> None:
    """The autograd state of a fused computation (the fused ops and the queue path share it): for
    "mean"/"sum" the gradients ``grads`` formed in the forward; for "none" the tensors
    ``recompute_inputs`` and ``recompute(inputs, grad_rows, need_x, need_y) -> (gx, gy)``, which
    forms them in the backward with the upstream gradient as row weights."""
    ctx.fused_state = (reduction, input_dtypes, need, recompute)
    ctx.save_for_backward(*(recompute_inputs if reduction == "none" else grads))


def backward_from_saved(ctx, grad_value) -> tuple:
    """(∂/∂x, ∂/∂y) from ``save_for_backward``'s state: the upstream gradient applied in the
    compute dtype, then one cast to each input's dtype. The fused computations are
    differentiable once: a double backward (create_graph=True) raises instead of returning a
    gradient without a graph."""
    reduction, input_dtypes, need, recompute = ctx.fused_state
    need_x = need[0] and ctx.needs_input_grad[0]
    need_y = need[1] and ctx.needs_input_grad[1]
    if torch.is_grad_enabled() and (need_x or need_y):
        raise RuntimeError("the fused D2SM kernels are differentiable once: a double backward (create_graph=True, "
                           "e.g. a gradient penalty) needs backend='reference'")
    if reduction == "none":
        gx, gy = recompute(ctx.saved_tensors, grad_value, need_x, need_y)
    else:
        gx, gy = ctx.saved_tensors
        scale = grad_value.to(gx.dtype)
        gx, gy = gx * scale, gy * scale
    dx = gx.to(input_dtypes[0]) if need_x else None
    dy = gy.to(input_dtypes[1]) if need_y else None
    return dx, dy


def _setup_context(ctx, inputs, output):
    x, y, x_memory, y_memory, divergence, exclude_self, eps, tf32, reduction, need_gx, need_gy = inputs
    _, saved, gx, gy = output
    ctx.options = (divergence, exclude_self, eps, tf32)
    save_for_backward(ctx, reduction, (x.dtype, y.dtype), (need_gx, need_gy), (gx, gy), ctx.recompute,
                      (x, y, x_memory, y_memory, saved))


def _make_backward(backward_op: Callable):
    def recompute(ctx):
        def run(inputs, grad_rows, need_x, need_y):
            return backward_op(*inputs, grad_rows, *ctx.options, need_x, need_y)
        return run

    def setup_context(ctx, inputs, output):
        ctx.recompute = recompute(ctx)
        _setup_context(ctx, inputs, output)

    def backward(ctx, grad_value, _grad_saved, _grad_gx, _grad_gy):
        return (*backward_from_saved(ctx, grad_value), None, None, None, None, None, None, None, None, None)
    return backward, setup_context


# Libraries holding the autocast registrations (kept alive for the life of the process).
_AUTOCAST_LIBS: list = []


def _register_autocast(qualname: str) -> None:
    """Autocast kernels (CPU and CUDA) for op ``qualname``, whose first four arguments are x, y,
    x_memory, y_memory: promote those to their widest dtype, then run the op with autocast
    excluded. The op then computes exactly as it does outside autocast, in its own precision
    (tensor-core GEMMs with fp32 accumulation for half inputs on CUDA)."""
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default
    lib = torch.library.Library(namespace, "IMPL")
    _AUTOCAST_LIBS.append(lib)
    for device_type in ("cpu", "cuda"):
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)

        def run(*args, _key=key):
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return op(*promote(*args[:4]), *args[4:])

        # py_impl: what tracing (torch.compile, make_fx) runs; lib.impl: the C++ dispatcher.
        if op.has_kernel_for_dispatch_key(key):
            op.py_kernels.pop(key, None)
        op.py_impl(key)(run)
        lib.impl(name, lambda _keyset, *args, _run=run: _run(*args), key_name, with_keyset=True)


def register(forward_name: str, backward_name: str) -> None:
    """Fake implementations and autocast kernels for both ops, and the autograd formula of the
    forward op."""
    torch.library.register_fake(forward_name, fake_forward)
    torch.library.register_fake(backward_name, fake_backward)
    _register_autocast(forward_name)
    _register_autocast(backward_name)
    namespace, name = backward_name.split("::")
    backward_op = getattr(getattr(torch.ops, namespace), name)
    backward, setup_context = _make_backward(backward_op)
    torch.library.register_autograd(forward_name, backward, setup_context=setup_context)


@torch.compiler.assume_constant_result  # a global setting read once at trace time (Dynamo can't call it)
def _torch_allows_tf32() -> bool:
    # torch >= 2.9 has a per-backend setting (torch.backends.cuda.matmul.fp32_precision); set on its
    # own it makes torch.get_float32_matmul_precision() raise, so it is read first when it is set.
    per_backend = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if per_backend != "none":
        return per_backend == "tf32"
    return torch.get_float32_matmul_precision() != "highest"


def use_tf32(precision: str) -> bool:
    """The ops' ``tf32`` flag for a ``precision`` option ("auto" follows PyTorch's float32 matmul
    setting: ``torch.set_float32_matmul_precision`` or ``torch.backends.cuda.matmul.fp32_precision``)."""
    if precision == "auto":
        return _torch_allows_tf32()
    return precision == "tf32"


def call(forward_op: Callable, x, y, divergence, exclude_self, reduction, eps, x_memory, y_memory, tf32: bool):
    """Run a fused forward op the way the registry calls backends (same contract as the reference)."""
    grad_on = torch.is_grad_enabled()
    need_gx = grad_on and x.requires_grad
    need_gy = grad_on and y.requires_grad
    if x_memory is not None:
        x_memory, y_memory = x_memory.detach(), y_memory.detach()
    value, _, _, _ = forward_op(x, y, x_memory, y_memory, divergence, exclude_self, float(eps), tf32, reduction,
                                need_gx, need_gy)
    return value.to(output_dtype(x))
