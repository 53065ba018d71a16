"""Backend registry: every implementation of the D2SM divergence registers here under a name.

A backend is a function with the reference's signature (``d2sm_ext.reference.d2sm_reference``)
plus keyword options it may ignore, and two predicates that return why it cannot run (a string)
or ``None`` when it can: ``usable()`` for this machine as a whole (a GPU backend without a GPU)
and ``supports(device_type, dtype)`` for given tensors. ``auto`` picks the usable backend with the
highest priority, so a fused backend registered later takes over without the API changing.
Fused backends need eps > 0 (``positive_eps``): with eps = 0, "auto" takes the reference.

Capabilities: a backend may also bring the kernels of the kept-statistics queue path
(``QueueKernels``, docs/DESIGN.md §3.6). ``resolve_backend(..., need_queue=True)`` resolves
``backend=`` for that path exactly as for the full pass ("auto": the highest-priority usable
backend that has them; a named backend without them: a clear error). The built-in backends are
registered in ``d2sm_ext/backends/__init__.py``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

Reason = Optional[str]


@dataclasses.dataclass(frozen=True)
class QueueKernels:
    """What a backend brings to the kept-statistics queue path (docs/DESIGN.md §3.6).

    cross_sums(xr, yr, rxr, ryr, xc, yc, rxc, ryc, eps, row_weight, col_weight, row_split, keep_gram)
        -> (row_sums (4, R), col_sums (2, 4, C), gram_x, gram_y): float64 weighted sums of the four
        pair terms between row set R and column set C (``queue.statistics.cross_sums_torch`` is the
        definition), the column sums split into the rows before ``row_split`` and the rest; with
        keep_gram the raw Gram blocks (R, C) of x and y (else None). Never an R×C matrix unless
        keep_gram asks for it.
    backward(x, y, xm, ym, saved, grad_rows, divergence, exclude_self, eps, tf32, need_gx, need_gy,
             gram_x, gram_y) -> (gx, gy): the fused backward op's contract (``fused_op``) for one
        sample set, with the live rows' Gram blocks against the memory rows (N, Q) when given.
        None: the sums are differentiable PyTorch and autograd forms the gradient (the reference).
    keeps_gram: cross_sums can return the Gram blocks and backward takes them.
    """
    cross_sums: Callable[..., tuple]
    backward: Optional[Callable[..., tuple]] = None
    keeps_gram: bool = False


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable[..., torch.Tensor]
    supports: Callable[[str, torch.dtype], Reason]
    priority: int
    description: str
    # Device types on which "auto" may pick this backend (None: any it supports). A backend can be
    # usable on a device by explicit request but too slow to be chosen there automatically.
    auto_device_types: Optional[tuple[str, ...]] = None
    # Why the backend cannot run on this machine at all (None: it can).
    usable: Callable[[], Reason] = lambda: None
    # The fused kernels floor every kernel value at eps and take its log: they need eps to be a
    # positive normal float32 (>= MIN_FUSED_EPS). The reference handles eps = 0 (values may be +inf).
    positive_eps: bool = False
    # The kernels of the kept-statistics queue path (docs/DESIGN.md §3.6); None: the backend
    # does not run that path.
    queue: Optional[QueueKernels] = None
    # Why "auto" should not take the backend for a given problem (an auto_rules.Problem) although
    # it could run it: the backend was not measured faster than the backends below it there
    # (d2sm_ext/auto_rules.py). None: no rule.
    auto_rule: Optional[Callable[..., Reason]] = None


# The smallest eps a fused backend accepts: float32's smallest normal number.
MIN_FUSED_EPS = torch.finfo(torch.float32).tiny

_REGISTRY: dict[str, Backend] = {}
# Backends that exist in the code base but could not be loaded here, with the reason.
_UNAVAILABLE: dict[str, str] = {}


def register_backend(
    name: str,
    fn: Callable[..., torch.Tensor],
    supports: Callable[[str, torch.dtype], Reason],
    priority: int,
    description: str,
    auto_device_types: Optional[tuple[str, ...]] = None,
    usable: Callable[[], Reason] = lambda: None,
    positive_eps: bool = False,
    queue: Optional[QueueKernels] = None,
    auto_rule: Optional[Callable[..., Reason]] = None,
) -> None:
    _REGISTRY[name] = Backend(name, fn, supports, priority, description, auto_device_types, usable, positive_eps,
                              queue, auto_rule)
    _UNAVAILABLE.pop(name, None)


def mark_unavailable(name: str, reason: str) -> None:
    """Record that backend ``name`` cannot be used in this installation, and why."""
    if name not in _REGISTRY:
        _UNAVAILABLE[name] = reason


def _usable() -> list[Backend]:
    return [b for b in sorted(_REGISTRY.values(), key=lambda b: -b.priority) if b.usable() is None]


def available_backends() -> dict[str, str]:
    """Backends that can run on this machine, with their descriptions (what ``backend=`` accepts
    besides 'auto'), highest priority first."""
    return {b.name: b.description for b in _usable()}


def unavailable_backends() -> dict[str, str]:
    """Known backends that cannot run on this machine, with the reason (not built, no GPU, ...)."""
    reasons = dict(_UNAVAILABLE)
    for b in _REGISTRY.values():
        reason = b.usable()
        if reason is not None:
            reasons[b.name] = reason
    return reasons


def _describe_choices() -> str:
    parts = [f"'{n}'" for n in available_backends()]
    text = "available: 'auto', " + ", ".join(parts)
    unavailable = unavailable_backends()
    if unavailable:
        text += "; unavailable here: " + "; ".join(f"'{n}' ({r})" for n, r in unavailable.items())
    return text


def _eps_reason(backend: Backend, eps: float) -> Reason:
    if backend.positive_eps and not eps >= MIN_FUSED_EPS:
        return (f"its kernels take log K' of every kernel value and need eps >= {MIN_FUSED_EPS:.3g} (a positive normal "
                f"float32), got eps={eps!r}; "
                f"use backend='reference' (or 'auto') for eps = 0")
    return None


def _queue_reason(backend: Backend, need_queue: bool) -> Reason:
    if need_queue and backend.queue is None:
        having = [b.name for b in _usable() if b.queue is not None]
        return f"it has no kernels for the kept-statistics queue path (backends that have them: {having})"
    return None


def resolve_backend(name: str, device_type: str, dtype: torch.dtype, eps: float = 1e-8, problem=None,
                    need_queue: bool = False) -> Backend:
    """The backend to run for inputs on ``device_type`` with ``dtype`` and kernel floor ``eps``;
    a clear error otherwise. ``problem`` (an ``auto_rules.Problem``) lets "auto" apply the
    backends' measured rules (a backend not measured faster than those below it for that shape and
    precision is passed over). ``need_queue``: the backend must have ``QueueKernels``."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}; {_describe_choices()}")
    if name == "auto":
        for backend in _usable():
            auto_ok = backend.auto_device_types is None or device_type in backend.auto_device_types
            if auto_ok and backend.supports(device_type, dtype) is None and _eps_reason(backend, eps) is None \
                    and _queue_reason(backend, need_queue) is None:
                if problem is not None and backend.auto_rule is not None and backend.auto_rule(problem) is not None:
                    continue
                return backend
        raise ValueError(
            f"no backend supports {dtype} tensors on device type '{device_type}'; {_describe_choices()}"
        )
    if name not in _REGISTRY or _REGISTRY[name].usable() is not None:
        unavailable = unavailable_backends()
        if name in unavailable:
            raise ValueError(f"backend '{name}' cannot run here: {unavailable[name]}; {_describe_choices()}")
        raise ValueError(f"unknown backend {name!r}; {_describe_choices()}")
    backend = _REGISTRY[name]
    reason = backend.supports(device_type, dtype) or _eps_reason(backend, eps) or _queue_reason(backend, need_queue)
    if reason is not None:
        raise ValueError(
            f"backend '{name}' cannot run {dtype} tensors on device type '{device_type}': {reason}; "
            f"{_describe_choices()}"
        )
    return backend
