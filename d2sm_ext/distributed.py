"""Process-group primitives: all-gathers of feature rows of different lengths per rank, the
sum of a count over the ranks, the gradient scaling a rank-local loss needs under DDP, and
``RankLocalState`` (tensors that differ across ranks, outside DDP's buffer broadcast). This
module sits below the queue and imports nothing of it.

Semantics used by FeatureQueue and D2SMLoss under DDP (README "Distributed training"):

* The queue enqueues the all-gathered batch (rank 0's rows, then rank 1's, …), so every rank
  holds the same history after every step, and a rank-0 checkpoint loads on any world size.
* The loss's sample set is (this rank's live rows, global history) by default: each rank's loss
  is the D2SM of its own batch against the shared history, and DDP's gradient averaging gives
  the gradient of the mean of the per-rank losses. With ``gather_live=True`` the sample set is
  (all ranks' live rows, history): the value is the same on every rank, gradients flow only into
  the local rows, and they are scaled by the world size so that DDP's average equals the
  gradient of the single-process loss on the concatenated batch.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn


def active(group=None) -> bool:
    """A process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_and_rank(group=None) -> tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


def global_count(n: int, device, group=None) -> int:
    """Σ n over the ranks (every rank calls it; read on the host)."""
    return sum(row[0] for row in all_gather_ints([n], device, group))


def all_gather_ints(values: list[int], device, group=None) -> list[list[int]]:
    """Every rank's list of ints (the same length on every rank), in rank order: one all_gather,
    read on the host. ``device``: where the group's tensors live (CUDA for NCCL)."""
    mine = torch.tensor(values, dtype=torch.long, device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    return torch.stack(parts).tolist()


def all_gather_rows(t: torch.Tensor, group=None, sizes: Optional[list[int]] = None) -> tuple[torch.Tensor, list[int]]:
    """Concatenate every rank's (n_r, ...) rows in rank order; n_r may differ and may be 0.

    Two collectives: the row counts (read on the host — the padding needs them; skipped when the
    caller gathered them: ``sizes``), then the rows padded to the largest count. No gradient
    flows through the result.
    """
    world = dist.get_world_size(group)
    if sizes is None:
        sizes = [row[0] for row in all_gather_ints([t.shape[0]], t.device, group)]
    padded = t.new_zeros((max(sizes),) + tuple(t.shape[1:]))
    padded[: t.shape[0]] = t.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]), sizes


def gather_live_rows(x: torch.Tensor, group=None) -> tuple[torch.Tensor, int]:
    """All ranks' rows with this rank's slice replaced by ``x`` itself (keeps its autograd graph).

    Returns (rows, world size)."""
    rows, sizes = all_gather_rows(x, group)
    rank = dist.get_rank(group)
    start = sum(sizes[:rank])
    rows = torch.cat([rows[:start], x, rows[start + sizes[rank]:]])
    return rows, len(sizes)


def scale_local_gradient(loss: torch.Tensor, world: int) -> torch.Tensor:
    """Same value, gradient × world: undoes DDP's averaging for a loss whose gradient each rank
    only partly holds (its own rows)."""
    return loss * world - (loss * (world - 1)).detach()


def resolve(flag: Optional[bool], group=None) -> bool:
    """``None``: distributed exactly when a multi-rank process group is initialised."""
    return active(group) if flag is None else bool(flag)


class RankLocalState(nn.Module):
    """A module whose named tensors differ across ranks by design: held as plain attributes, not
    buffers, so ``DistributedDataParallel`` (whose ``broadcast_buffers=True`` copies rank 0's
    buffers to every rank before each forward) never sees them; still in ``state_dict`` under
    their names, moved and cast by ``.to()``, and loaded by ``load_state_dict``."""

    def _init_rank_local(self) -> None:
        self._rank_local: list[str] = []

    def _make_rank_local(self, name: str) -> None:
        """Turn the registered buffer ``name`` into a rank-local tensor."""
        tensor = self._buffers.pop(name)
        self._rank_local.append(name)
        object.__setattr__(self, name, tensor)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in getattr(self, "_rank_local", ()):
            t = getattr(self, name)
            destination[prefix + name] = t if keep_vars else t.detach()

    def _load_rank_local(self, state_dict, prefix, missing_keys, error_msgs) -> None:
        for name in getattr(self, "_rank_local", ()):
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value, mine = state_dict.pop(key), getattr(self, name)
            if value.shape != mine.shape:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, "
                                  f"the shape in current model is {tuple(mine.shape)}.")
                continue
            with torch.no_grad():
                mine.copy_(value)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self._load_rank_local(state_dict, prefix, missing_keys, error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name in getattr(self, "_rank_local", ()):
            object.__setattr__(self, name, fn(getattr(self, name)))
        return self


# The model-level queue helpers live with the queue (d2sm_ext/queue/model_helpers.py), which is built
# on this module. They keep their public names here, imported on first access (PEP 562), so that
# this module imports nothing of the queue when it is loaded: no import points up from it.
_QUEUE_HELPERS = ("full_state_dict", "ddp_ignore_queues", "queue_buffer_names")


def __getattr__(name: str):
    if name in _QUEUE_HELPERS:
        from .queue import model_helpers

        return getattr(model_helpers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
