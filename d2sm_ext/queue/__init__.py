"""The feature queue (paper §3.2) and everything it keeps: the ring (ring.py), its kept statistics
(statistics.py, docs/DESIGN.md §3.6), the queue sharded across ranks (shard.py, §3.7) and the
helpers over a model that holds queues (model_helpers.py)."""
from .model_helpers import ddp_ignore_queues, full_state_dict, queue_buffer_names
from .ring import FeatureQueue

__all__ = ["FeatureQueue", "ddp_ignore_queues", "full_state_dict", "queue_buffer_names"]
