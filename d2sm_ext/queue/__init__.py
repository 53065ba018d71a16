"""The feature queue (paper §3.2) and everything it keeps, bottom up: where its slots are stored
(layout.py: the whole ring here; shard.py: across the ranks, docs/DESIGN.md §3.7), the kept
statistics (statistics.py, §3.6), the ring (ring.py: ``FeatureQueue``), the step over a queue
(step.py: the loss from the kept statistics) and the helpers over a model that holds queues
(model_helpers.py)."""
from .model_helpers import ddp_ignore_queues, full_state_dict, queue_buffer_names
from .ring import FeatureQueue

__all__ = ["FeatureQueue", "ddp_ignore_queues", "full_state_dict", "queue_buffer_names"]
