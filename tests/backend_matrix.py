"""The backend test matrix: one table of every backend the package ships, on every device it runs
on, that drives the shared suites (tests/test_backend_matrix.py, tests/test_mixed_precision.py,
tests/test_input_hygiene.py). Adding a backend = adding a row here (docs/DESIGN.md §6).

A row that cannot run on this machine (no GPU, Triton without its interpreter) yields no test
cases; instead tests/test_backend_matrix.py::test_row_runs_here reports it as one skip with the
reason, so nothing is counted as passing that did not run.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import pytest
import torch

import d2sm_ext

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


@dataclasses.dataclass(frozen=True)
class Row:
    backend: str
    device: str
    dtypes: tuple  # input dtypes the backend accepts
    fused: bool  # a torch.library op pair (opcheck, panels, determinism) rather than plain autograd
    ops: Optional[tuple] = None  # (forward, backward) op names for opcheck
    # (id, environment) variants that every math test runs under (the CPU's two passes)
    variants: tuple = (("", ()),)

    @property
    def id(self) -> str:
        return f"{self.backend}-{self.device}"

    def why_not_here(self) -> Optional[str]:
        if self.device == "cuda" and not torch.cuda.is_available():
            return "no CUDA device here"
        if self.backend not in d2sm_ext.available_backends():
            return f"backend '{self.backend}' cannot run here: {d2sm_ext.unavailable_backends().get(self.backend)}"
        return None


CPU_PASSES = (("symmetric", (("D2SM_CPU_PASS", "symmetric"),)), ("panel", (("D2SM_CPU_PASS", "panel"),)))
CPP_OPS = ("fused_forward", "fused_backward")
TRITON_OPS = ("triton_d2sm", "triton_d2sm_backward")

ROWS = (
    Row("reference", "cpu", (F16, BF16, F32, F64), fused=False),
    Row("dense", "cpu", (F16, BF16, F32, F64), fused=False),
    Row("cpu", "cpu", (F16, BF16, F32, F64), fused=True, ops=CPP_OPS, variants=CPU_PASSES),
    Row("triton", "cpu", (F16, BF16, F32), fused=True, ops=TRITON_OPS),  # Triton's interpreter
    Row("reference", "cuda", (F16, BF16, F32, F64), fused=False),
    Row("dense", "cuda", (F16, BF16, F32, F64), fused=False),
    Row("cuda", "cuda", (F16, BF16, F32, F64), fused=True, ops=CPP_OPS),
    Row("triton", "cuda", (F16, BF16, F32), fused=True, ops=TRITON_OPS),
)


def runnable(rows=ROWS):
    return [r for r in rows if r.why_not_here() is None]


def rows_params(*, fused: Optional[bool] = None, checked: Optional[bool] = None, dtype: Optional[torch.dtype] = None,
                variants: bool = True, device: Optional[str] = None):
    """pytest params (row, variant environment) of the rows that run here and match the filters;
    ``checked=True``: the rows the math suites check against the reference (every backend but the
    reference itself); ``fused=True``: the rows with a torch.library op pair (opcheck, op calls);
    ``variants=False`` takes each row once (its first variant)."""
    params = []
    for row in runnable():
        if fused is not None and row.fused != fused:
            continue
        if checked is not None and (row.backend != "reference") != checked:
            continue
        if dtype is not None and dtype not in row.dtypes:
            continue
        if device is not None and row.device != device:
            continue
        for name, env in (row.variants if variants else row.variants[:1]):
            ident = row.id + (f"-{name}" if name and variants else "")
            params.append(pytest.param(row, dict(env), id=ident))
    return params


def apply_variant(monkeypatch, env: dict) -> None:
    """Sets a variant's environment (e.g. D2SM_CPU_PASS) for one test."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def ops_of(row: Row):
    """The row's (forward, backward) OpOverloadPackets."""
    return tuple(getattr(torch.ops.d2sm_ext, name) for name in row.ops)
