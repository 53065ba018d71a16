"""Where a queue's slots are stored, and what that means for every stage that touches them.

A queue of ``size`` slots is stored by one process (``SlotLayout``, here: slot s at index s) or
across the ranks of a process group (``shard.ShardLayout``, docs/DESIGN.md §3.7: slot s on rank s
mod W). The ring (``ring.FeatureQueue``), the kept statistics' update
(``statistics.QueueStatistics.update``) and the step over a queue (``step``) are written once
against this interface; the queue's layout, chosen when it is built, is the only place that knows
whether the queue is sharded. Here every answer is the whole queue's, with no communication.
"""
from __future__ import annotations

import torch


class SlotLayout:
    """The whole ring in this process: slot s at index s."""

    #: a step over this layout runs collectives: it runs eagerly (outside torch.compile: the
    #: collectives read sizes on the host) and forms its gradient in the forward (a backward pass
    #: must not wait on other ranks)
    collective = False

    def stored(self, n: int) -> int:
        """Of slots 0 … n − 1, how many this process stores."""
        return n

    def positions(self, n: int, device) -> torch.Tensor:
        """(n,) the queue slot each of the n stored slots holds."""
        return torch.arange(n, device=device)

    def held(self, slots, x_buffer, y_buffer, inv_norms, evicts: bool = True):
        """The rows (and kept inverse norms, None without statistics) the candidate ``slots`` hold
        now, whichever process stores them. ``evicts=False``: the caller knows no row can leave,
        so only the slots stored here are needed (here: all of them)."""
        if inv_norms is None:
            return x_buffer[slots], y_buffer[slots], None, None
        return x_buffer[slots], y_buffer[slots], inv_norms[0, slots], inv_norms[1, slots]

    def targets(self, plan):
        """(t, s, write): candidate k of the ``statistics.EnqueuePlan`` is written to stored slot t_k
        with candidate s_k's values, where ``write`` (0-d); candidates stored elsewhere repeat one
        of this process's (same slot, same values) or, with none here, rewrite stored slot 0 with
        itself: no host sync."""
        return plan.slots, torch.arange(plan.slots.shape[0], device=plan.slots.device), \
            torch.ones((), dtype=torch.bool, device=plan.slots.device)

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sums formed over this process's slots → sums over the whole queue."""
        return t

    def check_call(self, divergence: str, reduction: str, kept_for: tuple) -> None:
        """Raise for a loss this layout cannot compute; ``kept_for``: the divergences the kept
        statistics serve (here every loss can be computed: the others by the full pass)."""

    def gather(self, x, y, need: tuple, error, device):
        """The step's live rows: (x_all, y_all, offset of this call's rows in them, need) — here
        this call's own rows. ``error``: this call's validation error, raised here. ``need``:
        whether the gradient of x, of y is needed (of any rank's rows, for a layout that gathers)."""
        if error is not None:
            raise error
        return x, y, 0, need

    def total(self, rows: torch.Tensor, n_live: int) -> torch.Tensor:
        """Σ of the per-row values of the whole sample set, given this process's ``rows``: the
        ``n_live`` live rows, then the stored queue rows."""
        return rows.sum()

    def counts_live_block(self) -> bool:
        """Whether this process's gradient counts the live rows' own block (one process must)."""
        return True

    def own_gradient(self, part: torch.Tensor, offset: int, n: int) -> torch.Tensor:
        """This call's rows' gradient from this process's ``part`` of every live row's gradient."""
        return part

    def other_rows(self, xm, ym, filled: int):
        """The filled rows stored by other processes, as (x, y) blocks (for a refresh): none."""
        return ()
