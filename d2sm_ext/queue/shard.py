"""A queue larger than one process: the history sharded across the ranks of a process group
(docs/DESIGN.md §3.7). ``ShardLayout`` is the layout of ``FeatureQueue(..., statistics=True,
shard=True)``: it answers the questions the ring, the statistics and the step ask a layout
(layout.py) with this rank's slots and the collectives that join the ranks' parts.

The global queue is exactly the replicated queue's ring of ``size`` slots, fed the all-gathered
stream (rank order within a step; non-finite rows never enter). Slot s is stored on rank s mod W
at local index s div W (a batch's consecutive slots spread over all ranks, so the enqueue's work
does too); every rank keeps the global write pointer and fill count. For each stored row a rank
keeps its float64 sums over ALL other rows of the global queue. A step moves O(N_global·d) rows
(the live rows, the rows the enqueue evicts) and O(N_global) statistics, never a q×d tensor:

* the loss (step.py, through this layout) all-gathers the live rows (``gather``: every rank then
  holds the global batch), gathers the rows the enqueue would evict from the ranks that store them
  (``held``), takes [live; evicted] against its own stored rows in one ``cross_sums`` call, and
  sums the live rows' partial sums over the ranks (``reduce``: 4×N_global float64). The stored
  rows' sums over the live rows are local. The value's queue part is summed over the ranks
  (``total``: one float64 per rank); the gradient of the live rows is each rank's product against
  its stored rows, all-reduced (``own_gradient``: N_global×d per side), of which a rank keeps its
  own rows.
* the enqueue then needs nothing more: every rank holds the entering rows, the evicted rows and
  their sums (the same on every rank), and its stored rows' change.

Collectives used: all_gather and all_reduce in a step, broadcast in the (rare) refresh — gloo
and NCCL have all three — the same sequence on every rank (an empty batch joins every one). A
rank whose inputs are invalid still joins the first gather and every rank raises there: no rank
is left waiting in a collective the others never reach.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .. import distributed as dist_helpers
from .layout import SlotLayout

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def capacity(size: int, world: int, rank: int) -> int:
    """Of slots 0 … size − 1, how many ``rank`` of ``world`` stores (those s with s mod W = rank);
    with ``size`` the fill count: how many filled rows it stores."""
    return max(0, -(-(size - rank) // world))


class ShardLayout(SlotLayout):
    """Rank ``rank`` of ``world`` stores slot s = i·W + rank at local index i."""

    collective = True

    def __init__(self, world: int, rank: int, group=None):
        self.world, self.rank, self.group = world, rank, group

    def stored(self, n: int) -> int:
        return capacity(n, self.world, self.rank)

    def positions(self, n: int, device) -> torch.Tensor:
        return torch.arange(n, device=device) * self.world + self.rank

    def _local(self, slots: torch.Tensor):
        return slots % self.world == self.rank, torch.div(slots, self.world, rounding_mode="floor")

    def held(self, slots, x_buffer, y_buffer, inv_norms, evicts: bool = True):
        """One all-reduce of (K, 2d + 2) in the compute dtype: each candidate slot's row from the rank
        that stores it, zeros from the others (a sum with zeros is exact). When no row can be
        evicted (``evicts=False``) only this rank's slots are written and the rows stored
        elsewhere are not needed: zeros, no collective."""
        own, local = self._local(slots)
        local = torch.clamp(local, max=max(x_buffer.shape[0] - 1, 0))
        cdt = inv_norms.dtype
        d = x_buffer.shape[1]
        packed = torch.cat([x_buffer[local].to(cdt), y_buffer[local].to(cdt), inv_norms[:, local].T], dim=1)
        packed = torch.where(own[:, None], packed, 0.0)
        if evicts:
            dist.all_reduce(packed, group=self.group)
        dtype = x_buffer.dtype
        return packed[:, :d].to(dtype), packed[:, d:2 * d].to(dtype), packed[:, 2 * d], packed[:, 2 * d + 1]

    def targets(self, plan):
        own, local = self._local(plan.slots)
        k = plan.slots.shape[0]
        ref = torch.argmax(own.to(torch.int8))  # the first candidate stored here (0 when none is)
        write = own.any()
        t = torch.where(own, local, torch.where(write, local[ref], 0))
        s = torch.where(own, torch.arange(k, device=own.device), ref)
        return t, s, write

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks in rank order (all_gather, then a fixed-order sum): bitwise the same
        result on every rank, and from run to run."""
        flat = t.reshape(-1).contiguous()  # (1-d: gloo gathers no 0-d tensors under torch.compile)
        parts = [torch.empty_like(flat) for _ in range(self.world)]
        dist.all_gather(parts, flat, group=self.group)
        return sum(parts[1:], parts[0]).reshape(t.shape)

    def check_call(self, divergence: str, reduction: str, kept_for: tuple) -> None:
        if divergence not in kept_for:
            raise ValueError(f"a sharded queue computes the loss from its kept statistics, which exist for "
                             f"{kept_for}; divergence {divergence!r} does not decompose into them "
                             f"(use one of those, or an unsharded FeatureQueue for js)")
        if reduction == "none":
            raise ValueError("reduction='none' is not available with a sharded queue: the queue rows' values live "
                             "on different ranks; use 'mean' or 'sum'")

    def gather(self, x, y, need: tuple, error: Optional[Exception], device):
        """Every rank's live rows in rank order, and whether any rank needs each gradient (every rank
        must join the gradient's all-reduce if one does). Two all_gathers: (rows, needs, dtype, valid)
        per rank, read on the host, then the rows padded to the largest count. ``error``: this rank's
        validation error (its rows are not gathered); when any rank has one, or the ranks' dtypes
        differ, every rank raises after the first gather."""
        ok = error is None
        mine = [x.shape[0], int(need[0]), int(need[1]), FLOAT_DTYPES.index(x.dtype), 1] if ok else [0, 0, 0, -1, 0]
        table = dist_helpers.all_gather_ints(mine, device, self.group)
        bad = [r for r, row in enumerate(table) if not row[4]]
        if bad:
            if error is not None:
                raise error
            raise ValueError(f"rank(s) {bad} called the sharded queue with invalid rows (their error says which); "
                             f"every rank stops here")
        if len({row[3] for row in table}) > 1:
            raise TypeError(f"the ranks' rows have different dtypes {[FLOAT_DTYPES[row[3]] for row in table]}: a "
                            f"sharded queue gathers them, give every rank the same dtype")
        sizes = [row[0] for row in table]
        d = x.shape[1]
        both, _ = dist_helpers.all_gather_rows(torch.cat([x, y], dim=1), self.group, sizes)
        need_any = (any(row[1] for row in table), any(row[2] for row in table))
        return both[:, :d], both[:, d:], sum(sizes[:self.rank]), need_any

    def total(self, rows: torch.Tensor, n_live: int) -> torch.Tensor:
        """The live rows' values are the same on every rank; the stored rows' are summed over the ranks."""
        return rows[:n_live].sum() + self.reduce(rows[n_live:].sum())

    def counts_live_block(self) -> bool:
        return self.rank == 0

    def own_gradient(self, part: torch.Tensor, offset: int, n: int) -> torch.Tensor:
        """One all_reduce of every live row's gradient (N_global × d), of which this rank keeps its rows."""
        part = part.contiguous()  # one layout on every rank (autograd may return a transposed one)
        dist.all_reduce(part, group=self.group)
        return part[offset:offset + n].clone()  # (not a view keeping N_global × d alive)

    def other_rows(self, xm: torch.Tensor, ym: torch.Tensor, filled: int):
        """The filled rows every other rank stores, one rank at a time (a broadcast from each rank in
        turn; every rank must consume the whole generator)."""
        d = xm.shape[1]
        for src in range(self.world):
            rows = capacity(filled, self.world, src)
            both = torch.cat([xm, ym], dim=1) if src == self.rank else xm.new_empty(rows, 2 * d)
            dist.broadcast(both, group=self.group, group_src=src)
            if src != self.rank:
                yield both[:, :d], both[:, d:]

    def interleave(self, t: torch.Tensor, size: int) -> torch.Tensor:
        """(rows, ...) stored on each rank → (size, ...) in slot order (slot i·W + r is rank r's row
        i): a collective, for the whole queue's state."""
        cap = capacity(size, self.world, 0)  # rank 0 stores the most
        padded = t.new_zeros((cap,) + tuple(t.shape[1:]))
        padded[:t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.stack(parts, dim=1).reshape((cap * self.world,) + tuple(t.shape[1:]))[:size]
