"""The feature queue (paper §3.2) and everything it keeps: the ring (ring.py), its kept statistics
(statistics.py, docs/DESIGN.md §3.6) and the queue sharded across ranks (shard.py, §3.7)."""
from .ring import FeatureQueue

__all__ = ["FeatureQueue"]
