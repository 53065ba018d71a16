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
computed on the device, and only the slots that change are written (O(N·d) traffic, whatever the
queue size). ``history()``/``memory()`` need the fill count on the host and read it (one sync)
until the queue has been seen full, after which they are sync-free.

Statistics (``statistics=True``, docs/DESIGN.md §3.6): the queue also keeps, per row, the float64
sums A, B, C, D of its pair terms over the other queue rows, for one kernel floor ``eps``, and
updates them on enqueue (the entering rows' terms added, the evicted rows' terms subtracted:
O(N·q·d)). ``d2sm_divergence(x, y, queue=queue)`` then costs O(N·q·d) per step instead of
O((N+q)²·d). ``refresh_statistics()`` recomputes them exactly (O(q²·d)).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from . import distributed as dist_helpers
from . import queue_stats
from .reference import compute_dtype


def _tensor_key(t: torch.Tensor) -> tuple:
    """Identifies a tensor's data as it is now (storage, view, in-place version)."""
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device, t._version)


class FeatureQueue(nn.Module):
    """Ring buffers of ``size`` paired rows of ``dim`` features.

    Only filled rows take part (no random initial rows); a batch of any size may be enqueued
    (a batch larger than the queue keeps its newest finite rows); a row pair with any non-finite
    value in either member never enters.

    statistics: keep the per-row sums that let ``d2sm_divergence(x, y, queue=queue, eps=eps)``
    run in O(N·q·d) (kl, reverse_kl, symmetric_kl; any exclude_self and reduction). ``eps`` is the
    kernel floor they are kept for (default 1e-8, as d2sm_divergence): a call with another eps
    raises.
    """

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None, statistics: bool = False, eps: float = 1e-8):
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
        # Host-side count of changes (enqueue, reset, load) and the sums a loss computed for live
        # rows that may be enqueued next (see stash_live_sums).
        self._state = 0
        self._stash = None
        if not isinstance(statistics, bool):
            raise TypeError(f"statistics must be a bool, got {type(statistics).__name__}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"FeatureQueue eps must be a finite number > 0, got {eps!r}")
        self.statistics_enabled = statistics
        self.eps = float(eps)
        if statistics:
            # float64 sums A, B, C, D over the other filled rows, and the rows' inverse norms (x, y)
            self.register_buffer("row_sums", torch.zeros(queue_stats.N_STATS, size, dtype=torch.float64,
                                                         device=device))
            self.register_buffer("row_inv_norms", torch.zeros(2, size, dtype=compute_dtype(dtype), device=device))

    def extra_repr(self) -> str:
        stats = f", statistics=True, eps={self.eps}" if self.statistics_enabled else ""
        return f"size={self.size}, dim={self.dim}, dtype={self.x_buffer.dtype}{stats}"

    def __len__(self) -> int:
        """Number of filled rows (reads the count from the device: one sync)."""
        return self.size if self._known_full else int(self.filled)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._known_full = False  # the loaded fill count decides
        self._changed()

    def _changed(self) -> None:
        self._state += 1
        self._stash = None

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the queue (buffers are zeroed, nothing from before can take part)."""
        self.x_buffer.zero_()
        self.y_buffer.zero_()
        self.write_pointer.zero_()
        self.filled.zero_()
        if self.statistics_enabled:
            self.row_sums.zero_()
            self.row_inv_norms.zero_()
        self._known_full = False
        self._changed()

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
        reuse = self._take_stash(x, y)
        self._changed()
        if x.shape[0] == 0:
            return
        finite = torch.isfinite(x).all(dim=1) & torch.isfinite(y).all(dim=1)
        n_valid = finite.sum()
        # Finite rows first, in their original order (stable sort on the "non-finite" flag).
        order = torch.sort((~finite).to(torch.int8), stable=True).indices
        # In FIFO order, finite row r lands in slot (pointer + r) % size and later rows overwrite
        # earlier ones, so only rows lo … n_valid−1 survive, lo = max(n_valid − size, 0). They go
        # to K = min(N, size) consecutive (hence distinct) slots; candidate k writes row lo + k
        # when k < n_valid − lo and otherwise writes the slot's own content back.
        k = min(x.shape[0], self.size)
        lo = torch.clamp(n_valid - self.size, min=0)
        cand = torch.arange(k, device=x.device)
        slots = (self.write_pointer + lo + cand) % self.size
        takes = cand < n_valid - lo
        source = order[torch.clamp(lo + cand, max=x.shape[0] - 1)]
        new_x = torch.where(takes[:, None], x[source], self.x_buffer[slots])
        new_y = torch.where(takes[:, None], y[source], self.y_buffer[slots])
        if self.statistics_enabled:
            self._update_statistics(slots, takes, new_x, new_y, source, reuse)
        self.x_buffer.index_copy_(0, slots, new_x)
        self.y_buffer.index_copy_(0, slots, new_y)
        self.write_pointer.copy_((self.write_pointer + n_valid) % self.size)
        self.filled.copy_(torch.clamp(self.filled + n_valid, max=self.size))

    # ------------------------------------------------------------------------------------------
    # Statistics (docs/DESIGN.md §3.6)
    # ------------------------------------------------------------------------------------------
    def _require_statistics(self) -> None:
        if not self.statistics_enabled:
            raise RuntimeError("this FeatureQueue keeps no statistics: create it with statistics=True")

    def statistics(self, filled: int) -> torch.Tensor:
        """(4, filled) float64 sums A, B, C, D of the filled rows over the other filled rows."""
        self._require_statistics()
        return self.row_sums[:, :filled]

    def inverse_norms(self, filled: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse norms (x side, y side) of the filled rows, in the compute dtype."""
        self._require_statistics()
        return self.row_inv_norms[0, :filled], self.row_inv_norms[1, :filled]

    def stash_live_sums(self, x: torch.Tensor, y: torch.Tensor, row_sums: torch.Tensor,
                        col_sums: torch.Tensor) -> None:
        """Called by the loss with the sums it formed for live rows (x, y) against the filled rows:
        row_sums (4, N) over every filled row, col_sums (4, filled) over the finite live rows. If
        the next enqueue brings these very tensors (unchanged, the queue unchanged in between), it
        reuses them instead of recomputing the entering rows against the queue."""
        if self.statistics_enabled:
            # The stash holds (detached views of) x and y: while their storage is alive no other
            # tensor can be allocated at the same address and be mistaken for them.
            self._stash = (x.detach(), y.detach(), _tensor_key(x), _tensor_key(y), self._state, row_sums, col_sums)

    def _take_stash(self, x: torch.Tensor, y: torch.Tensor):
        stash, self._stash = self._stash, None
        if stash is None or x.shape[0] > self.size:
            return None
        _, _, key_x, key_y, state, row_sums, col_sums = stash
        if state != self._state or key_x != _tensor_key(x) or key_y != _tensor_key(y):
            return None
        return row_sums, col_sums

    @torch.no_grad()
    def _update_statistics(self, slots, takes, new_x, new_y, source, reuse) -> None:
        """Before the slots are written: the entering rows' terms are added to every kept row's
        sums, the evicted rows' terms subtracted, and the entering rows' own sums formed over the
        kept rows and the other entering rows. O(K·q·d) for K candidate slots; no host sync.
        With ``reuse`` (the loss's sums for these rows, see stash_live_sums) only the evicted rows
        are taken against the queue."""
        eps = self.eps
        all_slots = torch.arange(self.size, device=slots.device)
        was_filled = all_slots < self.filled  # slots fill in order: 0 … filled − 1
        evicted = takes & (slots < self.filled)
        kept = was_filled.clone()
        kept[slots] = kept[slots] & ~takes
        old_x, old_y = self.x_buffer[slots], self.y_buffer[slots]
        rx_new, ry_new = queue_stats.inverse_norms(new_x), queue_stats.inverse_norms(new_y)
        rx_old, ry_old = self.row_inv_norms[0, slots], self.row_inv_norms[1, slots]
        cdt = self.row_inv_norms.dtype
        new_new = queue_stats.block_sums(new_x, new_y, rx_new, ry_new, eps, exclude_self=True,
                                         col_weight=takes.to(cdt))
        if reuse is None:
            # rows: entering (weight +1 where it takes) and evicted (−1) against every slot
            rows_x, rows_y = torch.cat([new_x, old_x]), torch.cat([new_y, old_y])
            weight = torch.cat([takes.to(cdt), -evicted.to(cdt)])
            row_sums, col_delta = queue_stats.cross_sums(
                rows_x, rows_y, torch.cat([rx_new, rx_old]), torch.cat([ry_new, ry_old]),
                self.x_buffer, self.y_buffer, self.row_inv_norms[0], self.row_inv_norms[1], eps,
                row_weight=weight, col_weight=kept.to(cdt))
            entering = row_sums[:, :slots.shape[0]] + new_new
        else:
            live_rows, live_cols = reuse  # over every filled row; over the finite (= entering) rows
            on_evicted, _ = queue_stats.cross_sums(new_x, new_y, rx_new, ry_new, old_x, old_y, rx_old, ry_old, eps,
                                                   col_weight=evicted.to(cdt))
            entering = live_rows[:, source] - on_evicted + new_new
            _, col_delta = queue_stats.cross_sums(old_x, old_y, rx_old, ry_old, self.x_buffer, self.y_buffer,
                                                  self.row_inv_norms[0], self.row_inv_norms[1], eps,
                                                  row_weight=-evicted.to(cdt))
            col_delta[:, :live_cols.shape[1]] += live_cols
        self.row_sums.add_(torch.where(kept, col_delta, 0.0))
        self.row_sums[:, slots] = torch.where(takes, entering, self.row_sums[:, slots])
        self.row_inv_norms[0, slots] = torch.where(takes, rx_new, rx_old)
        self.row_inv_norms[1, slots] = torch.where(takes, ry_new, ry_old)

    @torch.no_grad()
    def refresh_statistics(self) -> None:
        """Recompute the kept sums exactly from the stored rows (O(q²·d); one host sync)."""
        self._require_statistics()
        n = len(self)
        xm, ym = self.x_buffer[:n], self.y_buffer[:n]
        rx, ry = queue_stats.inverse_norms(xm), queue_stats.inverse_norms(ym)
        self.row_inv_norms.zero_()
        self.row_sums.zero_()
        self.row_inv_norms[0, :n], self.row_inv_norms[1, :n] = rx, ry
        self.row_sums[:, :n] = queue_stats.block_sums(xm, ym, rx, ry, self.eps, exclude_self=True)
