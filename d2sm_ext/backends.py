"""Backend registry: every implementation of the D2SM divergence registers here under a name.

A backend is a function with the reference's signature (``d2sm_ext.reference.d2sm_reference``)
plus keyword options it may ignore, and a ``supports`` predicate that says, for a device type and
dtype, why it cannot run (a string) or ``None`` when it can. ``auto`` picks the usable backend with
the highest priority, so a fused backend registered later takes over without the API changing.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

Reason = Optional[str]


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
) -> None:
    _REGISTRY[name] = Backend(name, fn, supports, priority, description, auto_device_types)
    _UNAVAILABLE.pop(name, None)


def mark_unavailable(name: str, reason: str) -> None:
    """Record that backend ``name`` cannot be used in this installation, and why."""
    if name not in _REGISTRY:
        _UNAVAILABLE[name] = reason


def available_backends() -> dict[str, str]:
    """Registered backends with their descriptions (what ``backend=`` accepts besides 'auto')."""
    return {b.name: b.description for b in sorted(_REGISTRY.values(), key=lambda b: -b.priority)}


def unavailable_backends() -> dict[str, str]:
    """Known backends that could not be loaded here, with the reason."""
    return dict(_UNAVAILABLE)


def _describe_choices() -> str:
    parts = [f"'{n}'" for n in available_backends()]
    text = "available: 'auto', " + ", ".join(parts)
    if _UNAVAILABLE:
        text += "; unavailable here: " + "; ".join(f"'{n}' ({r})" for n, r in _UNAVAILABLE.items())
    return text


def resolve_backend(name: str, device_type: str, dtype: torch.dtype) -> Backend:
    """The backend to run for inputs on ``device_type`` with ``dtype``; a clear error otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}; {_describe_choices()}")
    if name == "auto":
        for backend in sorted(_REGISTRY.values(), key=lambda b: -b.priority):
            auto_ok = backend.auto_device_types is None or device_type in backend.auto_device_types
            if auto_ok and backend.supports(device_type, dtype) is None:
                return backend
        raise ValueError(
            f"no backend supports {dtype} tensors on device type '{device_type}'; {_describe_choices()}"
        )
    if name not in _REGISTRY:
        if name in _UNAVAILABLE:
            raise ValueError(f"backend '{name}' is unavailable: {_UNAVAILABLE[name]}; {_describe_choices()}")
        raise ValueError(f"unknown backend {name!r}; {_describe_choices()}")
    backend = _REGISTRY[name]
    reason = backend.supports(device_type, dtype)
    if reason is not None:
        raise ValueError(
            f"backend '{name}' cannot run {dtype} tensors on device type '{device_type}': {reason}; "
            f"{_describe_choices()}"
        )
    return backend
