"""d2sm_ext: fast, exact D2SM (Deep Semantic Statistics Matching, ECCV 2022) loss for PyTorch.

docs/DESIGN.md is the contract: the math (§2), how the fused backends compute it (§3), the
precision of every path (§4), the API (§5), the layout (§6) and every knob (§7).
"""
from . import backends as _backends  # noqa: F401  (registers the built-in backends)
from .registry import available_backends, mark_unavailable, register_backend, unavailable_backends
from .extractors import build_extractor
from .functional import d2sm_divergence
from .loss import D2SMLoss
from .patches import extract_patches, patch_grid
from .queue import FeatureQueue
from .reference import DIVERGENCES, REDUCTIONS, d2sm_reference

__all__ = [
    "d2sm_divergence", "d2sm_reference", "FeatureQueue", "D2SMLoss", "extract_patches", "patch_grid",
    "build_extractor", "available_backends", "unavailable_backends", "register_backend",
    "DIVERGENCES", "REDUCTIONS",
]
__version__ = "0.1.0"
