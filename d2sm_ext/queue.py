"""FeatureQueue: the paired FIFO history of restored/clean features (paper §3.2, "memorized
historic sampling"), kept in device memory.

How a training step uses it (MoCo order: loss first, enqueue after, so a batch is never compared
with its own stored copy and no autograd graph is ever kept in the buffer)::

    queue = FeatureQueue(size=4096, dim=1280).to(device)
    ...
    x_mem, y_mem = queue.memory()                     # filled rows, views, no copy
    loss = d2sm_divergence(fx, fy, x_memory=x_mem, y_memory=y_mem)
    loss.backward()
    queue.enqueue(fx.detach(), fy.detach())           # non-finite rows are dropped on device

Everything lives in buffers (``state_dict``, ``.to()``, ``.double()`` work). ``enqueue`` never
synchronises with the host: which rows are finite, where they land and the new fill count are
computed on the device. ``history()``/``memory()`` need the fill count on the host and read it
(one sync) until the queue has been seen full, after which they are sync-free.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import distributed as dist_helpers


class FeatureQueue(nn.Module):
    """Ring buffers of ``size`` paired rows of ``dim`` features.

    Only filled rows take part (no random initial rows); a batch of any size may be enqueued
    (a batch larger than the queue keeps its newest finite rows); a row pair with any non-finite
    value in either member never enters.
    """

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None):
        super().__init__()
        for name, value in (("size", size), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FeatureQueue {name} must be a positive int, got {value!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"FeatureQueue dtype must be floating point, got {dtype}")
        self.size = size
        self.dim = dim
        self.register_buffer("x_buffer", torch.zeros(size, dim, dtype=dtype, device=device))
        self.register_buffer("y_buffer", torch.zeros(size, dim, dtype=dtype, device=device))
        # Next slot to write and number of filled slots; int64 scalars on the buffers' device.
        self.register_buffer("write_pointer", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long, device=device))
        self._known_full = False  # host-side cache: once full, a queue stays full until reset()

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, dtype={self.x_buffer.dtype}"

    def __len__(self) -> int:
        """Number of filled rows (reads the count from the device: one sync)."""
        return self.size if self._known_full else int(self.filled)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._known_full = False  # the loaded fill count decides

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the queue (buffers are zeroed, nothing from before can take part)."""
        self.x_buffer.zero_()
        self.y_buffer.zero_()
        self.write_pointer.zero_()
        self.filled.zero_()
        self._known_full = False

    def _filled_count(self) -> int:
        if not self._known_full:
            n = int(self.filled)
            self._known_full = n == self.size
            return n
        return self.size

    def memory(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Filled rows in storage order, as detached views of the buffers (no copy).

        Order does not matter for the loss with "mean"/"sum" reduction; use ``history()`` when it
        does. Syncs once to read the fill count until the queue has been seen full.
        """
        n = self._filled_count()
        return self.x_buffer[:n].detach(), self.y_buffer[:n].detach()

    def history(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Filled rows, oldest first, detached (a copy when the ring has wrapped; may sync)."""
        n = self._filled_count()
        if n < self.size:
            return self.x_buffer[:n].detach().clone(), self.y_buffer[:n].detach().clone()
        shift = -int(self.write_pointer)
        return (torch.roll(self.x_buffer, shift, dims=0).detach(),
                torch.roll(self.y_buffer, shift, dims=0).detach())

    @torch.no_grad()
    def enqueue(self, x: torch.Tensor, y: torch.Tensor, distributed: Optional[bool] = None, group=None) -> None:
        """Append the row pairs of ``x`` and ``y`` (N, dim) (or (..., dim), flattened) in order.

        Rows with any non-finite value in x or y are skipped; when more than ``size`` finite rows
        arrive, only the newest ``size`` are kept. No host synchronisation beyond, under
        torch.distributed, the all-gather itself.

        distributed: None (default) all-gathers the batch from every rank (rank order) when a
        multi-rank process group is initialised, so all ranks keep identical queues; True/False
        forces it. Every rank must call enqueue (an empty batch is fine).
        """
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError("enqueue expects two tensors (restored, clean)")
        if x.shape != y.shape or x.ndim < 1 or x.shape[-1] != self.dim:
            raise ValueError(
                f"enqueue expects x and y of the same shape (..., {self.dim}), got {tuple(x.shape)} "
                f"and {tuple(y.shape)}"
            )
        if x.device != self.x_buffer.device or y.device != self.x_buffer.device:
            raise ValueError(
                f"enqueue expects tensors on the queue's device {self.x_buffer.device}, got "
                f"{x.device} and {y.device}"
            )
        x = x.detach().reshape(-1, self.dim).to(self.x_buffer.dtype)
        y = y.detach().reshape(-1, self.dim).to(self.y_buffer.dtype)
        if dist_helpers.resolve(distributed, group):
            both, _ = dist_helpers.all_gather_rows(torch.cat([x, y], dim=1), group)
            x, y = both[:, :self.dim], both[:, self.dim:]
        if x.shape[0] == 0:
            return
        finite = torch.isfinite(x).all(dim=1) & torch.isfinite(y).all(dim=1)
        n_valid = finite.sum()
        # Finite rows first, in their original order (stable sort on the "non-finite" flag).
        order = torch.sort((~finite).to(torch.int8), stable=True).indices

        # Slot s receives the newest finite row whose rank k satisfies (pointer + k) % size == s.
        slots = torch.arange(self.size, device=x.device)
        rank = (slots - self.write_pointer) % self.size
        wraps = torch.clamp(torch.div(n_valid - 1 - rank, self.size, rounding_mode="floor"), min=0)
        rank = rank + wraps * self.size
        takes = rank < n_valid
        source = order[torch.clamp(rank, max=x.shape[0] - 1)]
        self.x_buffer.copy_(torch.where(takes[:, None], x[source], self.x_buffer))
        self.y_buffer.copy_(torch.where(takes[:, None], y[source], self.y_buffer))
        self.write_pointer.copy_((self.write_pointer + n_valid) % self.size)
        self.filled.copy_(torch.clamp(self.filled + n_valid, max=self.size))
