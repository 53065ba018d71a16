"""The D2SM_* environment variables read at run time, parsed strictly (docs/DESIGN.md §7 has the
table of every knob, build time included). An unset or empty variable means "not given"; any
other value that is not valid raises ValueError naming the variable and what it expects. The C++
extension parses the variables it reads the same way (csrc/env.h).
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Optional


def _raw(name: str) -> Optional[str]:
    value = os.environ.get(name, "")
    return value if value else None


def _parsed(name: str, convert, valid, expected: str):
    """The variable converted and checked, or None when unset; ValueError naming it otherwise."""
    text = _raw(name)
    if text is None:
        return None
    try:
        value = convert(text)
    except ValueError:
        value = None
    if value is None or not valid(value):
        raise ValueError(f"{name} must be {expected}, got {text!r}")
    return value


def integer(name: str, minimum: int) -> Optional[int]:
    """An integer >= minimum, or None when unset."""
    return _parsed(name, int, lambda v: v >= minimum, f"an integer >= {minimum}")


def positive_number(name: str) -> Optional[float]:
    """A finite number > 0, or None when unset."""
    return _parsed(name, float, lambda v: math.isfinite(v) and v > 0, "a number > 0")


def tiles(name: str) -> Optional[dict]:
    """A Triton tile override "BM,BN,BK,num_warps,num_stages" (positive integers), or None."""
    text = _raw(name)
    if text is None:
        return None
    parts = text.split(",")
    try:
        values = [int(v) for v in parts]
    except ValueError:
        values = []
    if len(values) != 5 or min(values) < 1:
        raise ValueError(f"{name} must be five positive integers BM,BN,BK,num_warps,num_stages, got {text!r}")
    bm, bn, bk, warps, stages = values
    return dict(BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages)


def load_extension() -> bool:
    """D2SM_LOAD_EXTENSION: "1" (default) loads the C++ extension, "0" does not (backends cpu and
    cuda are then unavailable). The deprecated D2SM_NO_EXTENSION=1 means D2SM_LOAD_EXTENSION=0."""
    value = _raw("D2SM_LOAD_EXTENSION")
    if value not in (None, "0", "1"):
        raise ValueError(f"D2SM_LOAD_EXTENSION must be 0 or 1, got {value!r}")
    old = _raw("D2SM_NO_EXTENSION")
    if old is not None:
        if old not in ("0", "1"):
            raise ValueError(f"D2SM_NO_EXTENSION must be 0 or 1, got {old!r}")
        warnings.warn(f"D2SM_NO_EXTENSION={old} is deprecated: use D2SM_LOAD_EXTENSION={1 - int(old)}",
                      DeprecationWarning, stacklevel=3)
        if value is None:
            return old != "1"
    return value != "0"
