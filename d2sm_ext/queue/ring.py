"""FeatureQueue: the paired FIFO history of restored/clean features (paper §3.2, "memorized
historic sampling"), kept in device memory.

How a training step uses it (MoCo order: loss first, enqueue after, so a batch is never compared
with its own stored copy and no autograd graph is ever kept in the buffer)::

    queue = FeatureQueue(size=4096, dim=1280).to(device)
    ...
    loss = d2sm_divergence(fx, fy, queue=queue)       # (batch, filled rows)
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
O((N+q)²·d). ``refresh_statistics()`` recomputes them exactly (O(q²·d)). The sums live in
``queue.stats`` (``statistics.QueueStatistics``), next to their math; this module is the ring.

The fast step: ``queue.enqueue_last_batch()`` instead of ``enqueue(fx, fy)`` enqueues the rows of
the last loss computed against the queue (the loss's own copy, taken then) from the sums that loss
already formed, so the step reads the queue three times instead of five (docs/DESIGN.md §3.6).
Nothing can fool it: it never looks at the caller's tensors, and any change of the queue after the
loss discards what the loss left (then it raises and says to call ``enqueue``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import distributed as dist_helpers
from ..reference import compute_dtype, safe_rows
from ..registry import resolve_backend
from .layout import SlotLayout
from .shard import ShardLayout
from .statistics import EnqueuePlan, QueueStatistics, QueueView, finite_rows

# The state entries with one entry per slot, and the dimension that runs over the slots (what a
# sharded queue re-splits when it loads a whole queue's state).
SLOT_STATE = {"x_buffer": 0, "y_buffer": 0, "stats.row_sums": 1, "stats.row_inv_norms": 1}


class FeatureQueue(dist_helpers.RankLocalState):
    """Ring buffers of ``size`` paired rows of ``dim`` features.

    Only filled rows take part (no random initial rows); a batch of any size may be enqueued
    (a batch larger than the queue keeps its newest finite rows); a row pair with any non-finite
    value in either member never enters.

    statistics: keep the per-row sums that let ``d2sm_divergence(x, y, queue=queue, eps=eps)``
    run in O(N·q·d) (kl, reverse_kl, symmetric_kl; any exclude_self and reduction). ``eps`` is the
    kernel floor they are kept for (default 1e-8, as d2sm_divergence): a call with another eps
    raises. ``backend`` names the kernels the enqueue and refresh use for them ("auto": as
    ``d2sm_divergence``'s "auto" for the queue's device and dtype).

    shard: under an initialised process group of W > 1 ranks (``group``, default the world),
    store the queue across the ranks (docs/DESIGN.md §3.7): the global queue is exactly what this
    queue would hold unsharded after the same all-gathered stream, each rank stores at most
    ⌈size/W⌉ of its rows (slot s on rank s mod W) with their sums over the whole queue, and
    ``d2sm_divergence(x, y, queue=queue)`` is the single-process loss over every rank's live rows
    and the whole queue. Needs ``statistics=True``; decided at construction (without a process
    group, or W = 1, the queue is unsharded). The stored rows differ across ranks: they are not
    buffers (DDP's buffer broadcast never touches them), ``state_dict()`` is the rank's shard, and
    ``full_state_dict()`` (a collective) the whole queue's state, which loads into a sharded queue
    of any world size or an unsharded one.
    """

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None, statistics: bool = False, eps: float = 1e-8,
                 backend: str = "auto", shard: bool = False, group=None):
        super().__init__()
        self._init_rank_local()
        for name, value in (("size", size), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FeatureQueue {name} must be a positive int, got {value!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"FeatureQueue dtype must be floating point, got {dtype}")
        if not isinstance(statistics, bool):
            raise TypeError(f"statistics must be a bool, got {type(statistics).__name__}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"FeatureQueue eps must be a finite number > 0, got {eps!r}")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string, got {type(backend).__name__}")
        if not isinstance(shard, bool):
            raise TypeError(f"shard must be a bool, got {type(shard).__name__}")
        if shard and not statistics:
            raise ValueError("shard=True needs statistics=True: a sharded queue computes the loss from the kept "
                             "statistics (kl, reverse_kl, symmetric_kl)")
        self.size = size
        self.dim = dim
        self.backend = backend
        # The one place that decides whether the queue is sharded: every later question about
        # where a slot lives, and what joins the processes' parts, goes to its layout.
        self.layout: SlotLayout = SlotLayout()
        self._shard_requested, self._group = shard, group
        if shard and dist_helpers.active(group):
            world, rank = dist_helpers.world_and_rank(group)
            if size < world:
                raise ValueError(f"a sharded queue stores at least one slot per rank: size {size} < {world} ranks")
            self.layout = ShardLayout(world, rank, group)
        stored = self.layout.stored(size)
        self.register_buffer("x_buffer", torch.zeros(stored, dim, dtype=dtype, device=device))
        self.register_buffer("y_buffer", torch.zeros(stored, dim, dtype=dtype, device=device))
        # Next slot to write and number of filled slots; int64 scalars on the buffers' device.
        self.register_buffer("write_pointer", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long, device=device))
        self._known_full = False  # host-side cache: once full, a queue stays full until reset()
        self._eps = float(eps)
        self._loaded_statistics: Optional[bool] = None  # what the last loaded checkpoint said
        self.stats: Optional[QueueStatistics] = QueueStatistics(stored, dtype, device, eps) if statistics else None
        if self.sharded:  # rows that differ across ranks by design: not buffers (DDP broadcasts buffers)
            self._make_rank_local("x_buffer")
            self._make_rank_local("y_buffer")
            self.stats._make_rank_local("row_sums")
            self.stats._make_rank_local("row_inv_norms")
        self.register_load_state_dict_post_hook(FeatureQueue._after_load)

    @property
    def statistics_enabled(self) -> bool:
        return self.stats is not None

    @property
    def sharded(self) -> bool:
        """The rows are stored across the ranks of a process group (``shard=True`` under W > 1 ranks)."""
        return isinstance(self.layout, ShardLayout)

    def _shard_info(self) -> Optional[dict]:
        if not self.sharded:
            return None
        return {"world": self.layout.world, "rank": self.layout.rank, "size": self.size}

    @property
    def eps(self) -> float:
        """The kernel floor the statistics are kept for."""
        return self._eps

    def extra_repr(self) -> str:
        shard = f", shard=rank {self.layout.rank} of {self.layout.world}" if self.sharded else ""
        return (f"size={self.size}, dim={self.dim}, dtype={self.x_buffer.dtype}, "
                f"statistics={self.statistics_enabled}{shard}")

    def __len__(self) -> int:
        """Number of filled rows (reads the count from the device: one sync)."""
        return self.size if self._known_full else int(self.filled)

    # -- state ------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        """Saved with the buffers: what the kept sums mean (a checkpoint never loads into a queue
        that would read them for another eps) and, for a sharded queue, whose shard it is."""
        state = {"statistics": self.statistics_enabled, "eps": self._eps}
        if self.sharded:
            state["shard"] = self._shard_info()
        return state

    def set_extra_state(self, state: dict) -> None:
        if self.statistics_enabled and state.get("statistics") and state.get("eps") != self._eps:
            raise ValueError(f"this checkpoint's queue statistics were kept for eps={state.get('eps')}, this queue "
                             f"keeps them for eps={self._eps}: build FeatureQueue(..., eps={state.get('eps')}) to "
                             f"load it")
        self._loaded_statistics = bool(state.get("statistics"))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the statistics moved into .stats: the same buffers.
        for name in ("row_sums", "row_inv_norms"):
            if prefix + name in state_dict:
                state_dict[prefix + "stats." + name] = state_dict.pop(prefix + name)
        # Checkpoints from before the extra state: sums of unknown meaning, recomputed after the load.
        state_dict.setdefault(prefix + "_extra_state", {"statistics": None, "eps": None})
        self._match_layout(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._known_full = False  # the loaded fill count decides
        self._changed()

    def _match_layout(self, state_dict, prefix) -> None:
        """A rank's shard loads only into the same rank of the same layout; the state of a whole
        queue (an unsharded queue's ``state_dict()`` or ``full_state_dict()``) loads into a sharded
        queue of any world size: this rank takes its slots (s mod W = rank)."""
        extra = state_dict[prefix + "_extra_state"]
        saved = extra.get("shard") if isinstance(extra, dict) else None
        mine = self._shard_info()
        if saved == mine:
            return
        if saved is not None:
            into = (f"rank {mine['rank']} of a {mine['world']}-rank sharded queue of size {mine['size']}" if mine
                    else "an unsharded queue")
            raise ValueError(f"this checkpoint holds rank {saved['rank']}'s shard of a queue of size {saved['size']} "
                             f"sharded over {saved['world']} ranks and cannot load into {into}: save the whole "
                             f"queue with full_state_dict() (a collective; d2sm_ext.distributed.full_state_dict "
                             f"for a whole model), which loads into any world size")
        rows = state_dict.get(prefix + "x_buffer")
        if rows is not None and rows.shape[0] != self.size:  # (the same on every rank: no rank loads alone)
            raise ValueError(f"this checkpoint holds a queue of {rows.shape[0]} slots; this sharded queue has "
                             f"{self.size}")
        world, rank = self.layout.world, self.layout.rank
        for name, dim in SLOT_STATE.items():
            key = prefix + name
            if key in state_dict:
                state_dict[key] = state_dict[key][rank::world] if dim == 0 else state_dict[key][:, rank::world]

    @staticmethod
    def _after_load(module: "FeatureQueue", incompatible_keys) -> None:
        """Sums that were not loaded with their meaning (a checkpoint without statistics, loaded
        with strict=False, or one from before eps was saved) are recomputed from the loaded rows."""
        if module.stats is None:
            return
        missing = {k.rsplit(".", 1)[-1] for k in incompatible_keys.missing_keys}
        if module._loaded_statistics is not True or {"row_sums", "row_inv_norms"} & missing:
            module.refresh_statistics()

    def _apply(self, fn, recurse=True):
        """Module casts and moves keep the sums in float64: a cast of the rows to another dtype
        (.half(), .double(), .to(dtype)) recomputes them for the rows as they now are."""
        dtype = self.x_buffer.dtype
        sums = None if self.stats is None else self.stats.row_sums
        super()._apply(fn, recurse)
        if self.stats is not None:
            self.stats.row_sums = sums.to(self.x_buffer.device)
            self.stats.row_inv_norms = self.stats.row_inv_norms.to(compute_dtype(self.x_buffer.dtype))
            if self.x_buffer.dtype != dtype:
                self.refresh_statistics()
        self._changed()
        return self

    def _changed(self) -> None:
        if self.stats is not None:
            self.stats.discard_pending()

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the queue (buffers are zeroed, nothing from before can take part)."""
        self.x_buffer.zero_()
        self.y_buffer.zero_()
        self.write_pointer.zero_()
        self.filled.zero_()
        if self.stats is not None:
            self.stats.reset()
        self._known_full = False
        self._changed()

    # -- rows -------------------------------------------------------------------------------------
    def _filled_count(self) -> int:
        if not self._known_full:
            n = int(self.filled)
            self._known_full = n == self.size
            return n
        return self.size

    def _stored_count(self) -> int:
        """Filled rows this process stores (all of them unless sharded)."""
        return self.layout.stored(self._filled_count())

    def memory(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Filled rows in storage order, as detached views of the buffers (no copy); for a sharded
        queue, this rank's filled rows (slots rank, rank + W, …).

        Order does not matter for the loss with "mean"/"sum" reduction; use ``history()`` when it
        does. Syncs once to read the fill count until the queue has been seen full.
        """
        n = self._stored_count()
        return self.x_buffer[:n].detach(), self.y_buffer[:n].detach()

    def history(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Filled rows, oldest first, detached (a copy when the ring has wrapped; may sync)."""
        if self.sharded:
            raise RuntimeError("a sharded queue's history is spread over the ranks: full_state_dict() (a "
                               "collective) gathers the whole queue")
        n = self._filled_count()
        if n < self.size:
            return self.x_buffer[:n].detach().clone(), self.y_buffer[:n].detach().clone()
        shift = -int(self.write_pointer)
        return (torch.roll(self.x_buffer, shift, dims=0).detach(),
                torch.roll(self.y_buffer, shift, dims=0).detach())

    def statistics_view(self) -> QueueView:
        """The filled rows, their statistics and the enqueue planner, for the step over the queue
        (step.py)."""
        self._require_statistics()
        self._check_shard()
        xm, ym = self.memory()
        filled = self._filled_count()

        def plan(x: torch.Tensor, y: torch.Tensor, finite: torch.Tensor) -> Optional[EnqueuePlan]:
            if filled + x.shape[0] <= self.size:  # no row of the queue can leave: nothing to plan
                return None
            return self._plan(finite)
        return QueueView(xm, ym, self.stats, plan, self.x_buffer.dtype, filled)

    def _plan(self, finite: torch.Tensor, evicts: bool = True) -> EnqueuePlan:
        """Where an enqueue of N rows with these (N,) finite flags writes; on the device, no sync.
        ``evicts=False``: the caller knows no row can leave (a sharded queue then needs no
        collective for the rows the slots hold)."""
        n_valid = finite.sum()
        # Finite rows first, in their original order (stable sort on the "non-finite" flag).
        order = torch.sort((~finite).to(torch.int8), stable=True).indices
        # In FIFO order, finite row r lands in slot (pointer + r) % size and later rows overwrite
        # earlier ones, so only rows lo … n_valid−1 survive, lo = max(n_valid − size, 0). They go
        # to K = min(N, size) consecutive (hence distinct) slots; candidate k writes row lo + k
        # when k < n_valid − lo and otherwise writes the slot's own content back.
        k = min(finite.shape[0], self.size)
        lo = torch.clamp(n_valid - self.size, min=0)
        cand = torch.arange(k, device=finite.device)
        slots = (self.write_pointer + lo + cand) % self.size
        takes = cand < n_valid - lo
        source = order[torch.clamp(lo + cand, max=finite.shape[0] - 1)]
        evicted = takes & (slots < self.filled)
        norms = self.stats.row_inv_norms if self.stats is not None else None  # (no statistics: no norms)
        old_x, old_y, old_rx, old_ry = self.layout.held(slots, self.x_buffer, self.y_buffer, norms, evicts)
        return EnqueuePlan(slots, takes, source, evicted, old_x, old_y, old_rx, old_ry, n_valid)

    def _check_rows(self, x, y) -> None:
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

    @torch.no_grad()
    def enqueue(self, x: torch.Tensor, y: torch.Tensor, distributed: Optional[bool] = None, group=None) -> None:
        """Append the row pairs of ``x`` and ``y`` (N, dim) (or (..., dim), flattened) in order.

        Rows with any non-finite value in x or y are skipped; when more than ``size`` finite rows
        arrive, only the newest ``size`` are kept. No host synchronisation beyond, under
        torch.distributed, the all-gather itself. With statistics, the entering and evicted rows
        are taken against the queue (O(N·q·d)); after a loss over these very rows,
        ``enqueue_last_batch()`` does the same from the loss's sums.

        distributed: None (default) all-gathers the batch from every rank (rank order) when a
        multi-rank process group is initialised, so all ranks keep identical queues; True/False
        forces it. Every rank must call enqueue (an empty batch is fine). A sharded queue always
        gathers, over the group it was built for (distributed=False or another group raises); a
        rank's invalid rows make every rank raise.
        """
        self._check_shard()
        if self.sharded:
            self._enqueue_sharded(x, y, distributed, group)
            return
        self._check_rows(x, y)
        x = x.detach().reshape(-1, self.dim).to(self.x_buffer.dtype)
        y = y.detach().reshape(-1, self.dim).to(self.y_buffer.dtype)
        if dist_helpers.resolve(distributed, group):
            both, _ = dist_helpers.all_gather_rows(torch.cat([x, y], dim=1), group)
            x, y = both[:, :self.dim], both[:, self.dim:]
        # Rows stored in range (exact powers of two; the loss is per-row scale-invariant), so
        # the kept sums' Gram products cannot overflow (docs/DESIGN.md §2.1).
        x, y = safe_rows(x), safe_rows(y)
        self._write(x, y, None)

    def _enqueue_sharded(self, x, y, distributed, group) -> None:
        if distributed is False or (group is not None and group is not self.layout.group):
            raise ValueError("a sharded queue holds every rank's rows: its enqueue always gathers them over the "
                             "group it was built for (distributed=False or another group is not possible)")
        error = None
        try:
            self._check_rows(x, y)
            x = x.detach().reshape(-1, self.dim).to(self.x_buffer.dtype)
            y = y.detach().reshape(-1, self.dim).to(self.y_buffer.dtype)
        except (TypeError, ValueError) as e:
            error = e  # raised after the first gather, on every rank
        x, y, _, _ = self.layout.gather(x, y, (False, False), error, self.x_buffer.device)
        # the fill count is known on the host (the gather synchronised): no collective for the
        # rows the slots hold when none can leave
        self._write(safe_rows(x), safe_rows(y), None, evicts=self._filled_count() + x.shape[0] > self.size)

    def _check_shard(self) -> None:
        if self._shard_requested and not self.sharded and dist_helpers.active(self._group):
            raise RuntimeError("this FeatureQueue was built with shard=True before the process group was initialised, "
                               "so it holds the whole queue on every rank: build it (or the D2SMLoss holding it) after "
                               "torch.distributed.init_process_group")

    @torch.no_grad()
    def enqueue_last_batch(self, distributed: Optional[bool] = None, group=None) -> None:
        """Enqueue the rows of the last ``d2sm_divergence(x, y, queue=self)`` (the loss's own copy,
        taken at that call, in the queue's dtype), reusing the sums that loss formed for them: the
        queue is not read again (docs/DESIGN.md §3.6). Equal to ``enqueue(x, y)`` with the rows as
        they were at the loss.

        Raises RuntimeError when no such loss left its rows since the queue last changed (an
        enqueue, reset, load, cast or refresh discards them), when the loss promoted its rows past
        the queue's dtype, or for a queue without statistics. Under torch.distributed (see
        ``enqueue``) the batch is all-gathered and its sums are formed anew: each rank's loss knows
        only its own rows. A sharded queue communicates nothing here (its loss gathered every
        rank's rows and sums; ``distributed`` and ``group`` do not apply).
        """
        self._require_statistics()
        self._check_shard()
        pending = self.stats.take_pending()
        if pending is None:
            raise RuntimeError("enqueue_last_batch: no loss over this queue has left its rows since the queue last "
                               "changed (or the loss's rows were wider than the queue's dtype); use enqueue(x, y)")
        if not self.sharded and dist_helpers.resolve(distributed, group):
            self.enqueue(pending.x, pending.y, distributed=True, group=group)
            return
        # (a sharded queue's loss gathered every rank's rows and sums: nothing to communicate)
        self._write(pending.x, pending.y, pending)

    def _write(self, x: torch.Tensor, y: torch.Tensor, pending, evicts: bool = True) -> None:
        self._changed()
        if x.shape[0] == 0:
            return
        if pending is not None and pending.plan is not None:
            plan = pending.plan
        else:  # (a pending batch without a plan: its loss knew no row could leave)
            plan = self._plan(finite_rows(x, y), evicts=evicts and pending is None)
        new_x = torch.where(plan.takes[:, None], x[plan.source], plan.old_x)
        new_y = torch.where(plan.takes[:, None], y[plan.source], plan.old_y)
        if self.stats is not None:
            self.stats.update(plan, new_x, new_y, self.filled, self.x_buffer, self.y_buffer, self._kernels(),
                              self.layout, pending)
        t, s, write = self.layout.targets(plan)
        self.x_buffer.index_copy_(0, t, torch.where(write, new_x[s], self.x_buffer[t]))
        self.y_buffer.index_copy_(0, t, torch.where(write, new_y[s], self.y_buffer[t]))
        self.write_pointer.copy_((self.write_pointer + plan.n_valid) % self.size)
        self.filled.copy_(torch.clamp(self.filled + plan.n_valid, max=self.size))

    # -- statistics (docs/DESIGN.md §3.6) ---------------------------------------------------------
    def _require_statistics(self) -> None:
        if self.stats is None:
            raise RuntimeError("this FeatureQueue keeps no statistics: create it with statistics=True")

    def _kernels(self):
        return resolve_backend(self.backend, self.x_buffer.device.type, self.x_buffer.dtype, self._eps,
                               need_queue=True).queue

    @torch.no_grad()
    def refresh_statistics(self) -> None:
        """Recompute the kept sums exactly from the stored rows (O(q²·d); one host sync). For a
        sharded queue a collective: each rank's rows are broadcast in turn (O(q·d) traffic)."""
        self._require_statistics()
        filled = self._filled_count()
        n = self.layout.stored(filled)
        xm, ym = self.x_buffer[:n], self.y_buffer[:n]
        self.stats.refresh(xm, ym, self.layout.other_rows(xm, ym, filled))

    @torch.no_grad()
    def full_state_dict(self) -> dict:
        """The state an unsharded ``FeatureQueue(size, dim, statistics=True)`` would have after the
        same stream (its ``state_dict()`` keys), for a checkpoint that resumes on any world size:
        a collective every rank calls (it gathers the whole queue, O(q·d), on every rank). For an
        unsharded queue, its ``state_dict()``."""
        if not self.sharded:
            return self.state_dict()
        layout, size = self.layout, self.size
        rows = layout.interleave(torch.cat([self.x_buffer, self.y_buffer], dim=1), size)
        return {
            "x_buffer": rows[:, :self.dim].contiguous(), "y_buffer": rows[:, self.dim:].contiguous(),
            "write_pointer": self.write_pointer.clone(), "filled": self.filled.clone(),
            "_extra_state": {k: v for k, v in self.get_extra_state().items() if k != "shard"},
            "stats.row_sums": layout.interleave(self.stats.row_sums.T, size).T.contiguous(),
            "stats.row_inv_norms": layout.interleave(self.stats.row_inv_norms.T, size).T.contiguous(),
        }
