"""Worker for tests/test_sharded_queue.py: one rank of a W-process gloo group on CPU running a
stream against a sharded queue, and, in the same process, one process's whole queue fed the
concatenated stream (the definition the sharded queue must equal). Writes OUT/rank{r}.pt."""
import os

import torch
import torch.distributed as dist
from torch import nn

from d2sm_ext import D2SMLoss, FeatureQueue, d2sm_divergence
from d2sm_ext.distributed import full_state_dict
from loss_cases import tiny_denoiser, tiny_extractor

DIM = 5
SIZE = 23  # divisible by neither 2 nor 3
COMBOS = [(div, excl) for div in ("kl", "reverse_kl", "symmetric_kl") for excl in (True, False)]


def batches(step: int, world: int, dim: int = DIM, most: int = 4):
    """Every rank's (x, y) of a step, float64: uneven and empty batches, zero rows, now and then a
    row with a NaN or an inf (the loss of that step is NaN, and the row never enters the queue)."""
    g = torch.Generator().manual_seed(1000 + 7 * step + 100 * world)
    out = []
    for _ in range(world):
        n = int(torch.randint(0, most + 1, (1,), generator=g))
        x = torch.randn(n, dim, generator=g, dtype=torch.float64)
        y = x + 0.3 * torch.randn(n, dim, generator=g, dtype=torch.float64)
        if n and step % 5 == 2:
            x[0] = 0.0  # a zero row
        if n and step % 23 == 11:
            y[-1, 1] = float("nan") if step % 2 else float("inf")
        out.append((x, y))
    return out


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def stream(rank, world, sharded, whole, steps, start, backend, record=None):
    """Steps start … start + steps − 1 on both queues; returns the worst relative differences."""
    worst = {"value": 0.0, "grad_x": 0.0, "grad_y": 0.0}
    values = []
    for step in range(start, start + steps):
        parts = batches(step, world)
        x, y = (t.clone().requires_grad_() for t in parts[rank])
        offset = sum(p[0].shape[0] for p in parts[:rank])
        xs = torch.cat([p[0] for p in parts]).requires_grad_()
        ys = torch.cat([p[1] for p in parts]).requires_grad_()
        div, excl = COMBOS[step % len(COMBOS)]
        if xs.shape[0] and xs.shape[0] + len(whole) >= (2 if excl else 1):
            if record is not None:
                record.clear()
            loss = d2sm_divergence(x, y, div, exclude_self=excl, queue=sharded, backend=backend,
                                   reduction="sum" if step % 3 == 0 else "mean")
            expected = d2sm_divergence(xs, ys, div, exclude_self=excl, queue=whole, backend=backend,
                                       reduction="sum" if step % 3 == 0 else "mean")
            loss.backward()
            expected.backward()
            values.append(loss.detach())
            finite = bool(torch.isfinite(expected))
            for name, got, want in (("value", loss.detach().reshape(1), expected.detach().reshape(1)),
                                    ("grad_x", x.grad, xs.grad[offset:offset + x.shape[0]]),
                                    ("grad_y", y.grad, ys.grad[offset:offset + x.shape[0]])):
                # a step with a non-finite row: NaN value and gradients, as one process gives
                worst[name] = max(worst[name], _relative(got, want) if finite else float(not torch.isnan(got).all()))
            if step % 2 and sharded.stats.has_pending():
                sharded.enqueue_last_batch()
            else:
                sharded.enqueue(x.detach(), y.detach())
        else:
            sharded.enqueue(x.detach(), y.detach())
        whole.enqueue(xs.detach(), ys.detach(), distributed=False)
    return worst, values


def _compare_with_whole(result, key, sharded, whole, world, rank):
    """The stored rows against the whole queue's, and the kept sums against its exact recomputation."""
    whole.refresh_statistics()
    mine = torch.arange(sharded.x_buffer.shape[0]) * world + rank
    result[f"rows_equal_{key}"] = torch.equal(sharded.x_buffer, whole.x_buffer[mine]) and \
        torch.equal(sharded.y_buffer, whole.y_buffer[mine])
    exact = whole.stats.row_sums[:, mine]
    result[f"sums_error_{key}"] = float(((sharded.stats.row_sums - exact).abs() / exact.abs().clamp_min(1e-300)).max())
    sharded.refresh_statistics()  # a collective: each rank's rows broadcast in turn
    result[f"refresh_error_{key}"] = float(((sharded.stats.row_sums - exact).abs()
                                            / exact.abs().clamp_min(1e-300)).max())


def phase_stream(rank, world, result):
    """200 steps on both backends; the whole queue's state after 120 kept for the resume tests."""
    for backend in ("cpu", "reference"):
        sharded = FeatureQueue(SIZE, DIM, dtype=torch.float64, statistics=True, shard=True, backend=backend)
        whole = FeatureQueue(SIZE, DIM, dtype=torch.float64, statistics=True, backend=backend)
        result[f"stored_{backend}"] = (sharded.x_buffer.shape[0], sharded.y_buffer.shape[0],
                                       sharded.stats.row_sums.shape[1], sharded.stats.row_inv_norms.shape[1])
        worst, values = stream(rank, world, sharded, whole, 120, 0, backend)
        result[f"full_{backend}"] = sharded.full_state_dict()  # a collective, every rank
        result[f"whole_at_120_{backend}"] = {k: v.clone() if torch.is_tensor(v) else v
                                             for k, v in whole.state_dict().items()}
        more, more_values = stream(rank, world, sharded, whole, 80, 120, backend)
        result[f"worst_{backend}"] = {k: max(v, more[k]) for k, v in worst.items()}
        result[f"values_{backend}"] = values + more_values
        result[f"shard_state_{backend}"] = sharded.state_dict()
        _compare_with_whole(result, backend, sharded, whole, world, rank)
    x = torch.randn(2, DIM, dtype=torch.float64)
    for kwargs in ({"divergence": "js"}, {"reduction": "none"}):
        try:
            d2sm_divergence(x, x, queue=sharded, **kwargs)
            result[f"error_{kwargs}"] = None
        except ValueError as e:
            result[f"error_{kwargs}"] = str(e)


def phase_resume(rank, world, result, resume_from):
    """A W=2 run's full state after 120 steps, loaded into this world size, continued 80 steps."""
    for backend in ("cpu", "reference"):
        state = torch.load(resume_from, weights_only=False)[backend]
        sharded = FeatureQueue(SIZE, DIM, dtype=torch.float64, statistics=True, shard=True, backend=backend)
        whole = FeatureQueue(SIZE, DIM, dtype=torch.float64, statistics=True, backend=backend)
        sharded.load_state_dict(state)
        whole.load_state_dict(state)
        result[f"resumed_worst_{backend}"], _ = stream(rank, world, sharded, whole, 80, 120, backend)
        _compare_with_whole(result, f"resumed_{backend}", sharded, whole, world, rank)


def phase_collectives(rank, world, result):
    """A stream against a queue much larger than a step's rows, recording the number of elements
    of every collective the steps (loss, backward, enqueue) run (real collectives, called through
    a recorder)."""
    sizes = []
    originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather", "broadcast")}

    def recording(name):
        def call(tensor_or_list, *args, **kwargs):
            tensors = tensor_or_list if name != "all_gather" else args[0]
            tensors = [tensors] if torch.is_tensor(tensors) else tensors
            sizes.append(max(t.numel() for t in tensors))
            return originals[name](tensor_or_list, *args, **kwargs)
        return call

    dim, size = 8, 200
    queue = FeatureQueue(size, dim, dtype=torch.float64, statistics=True, shard=True)
    most_rows = 0
    try:
        for name in originals:
            setattr(dist, name, recording(name))
        for step in range(130):  # ~3 rows a step: wraps the 200 rows
            parts = batches(step, world, dim=dim, most=3)
            most_rows = max(most_rows, sum(p[0].shape[0] for p in parts))
            x, y = (t.clone().requires_grad_() for t in parts[rank])
            if len(queue) >= 2:
                d2sm_divergence(x, y, "symmetric_kl", queue=queue).backward()
                queue.enqueue_last_batch() if step % 2 else queue.enqueue(x.detach(), y.detach())
            else:
                queue.enqueue(x.detach(), y.detach())
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
    result["collectives"] = {"sizes": sizes, "most_rows": most_rows, "dim": dim, "size": size,
                             "filled": len(queue)}


def phase_from_empty(rank, world, result):
    """The training loop (loss, backward, enqueue_last_batch) from its first step on a new queue and
    after reset(), against one process's whole queue fed enqueue(): the first loss leaves the
    batch pending on every rank and its enqueue gives the whole queue's rows and sums. The new
    queue's first batch fits; after the reset it is larger than the queue (a plan, nothing evicted)."""
    out = {}
    for backend in ("cpu", "reference"):
        for dtype in (torch.float32, torch.float64):
            sharded = FeatureQueue(SIZE, DIM, dtype=dtype, statistics=True, shard=True, backend=backend)
            whole = FeatureQueue(SIZE, DIM, dtype=dtype, statistics=True, backend=backend)
            case = {"raised": [], "pending": [], "value": 0.0, "grad_x": 0.0, "rows_equal": [], "sums_error": 0.0}
            for phase, first in (("new", 3), ("reset", SIZE // world + 1)):
                if phase == "reset":
                    sharded.reset()
                    whole.reset()
                for step, rows in enumerate((first, 2)):
                    g = torch.Generator().manual_seed(500 + 10 * step + rows)
                    parts = [torch.randn(2, rows + r, DIM, generator=g, dtype=torch.float64).to(dtype)
                             for r in range(world)]
                    x, y = parts[rank][0].clone().requires_grad_(), parts[rank][1]
                    offset = sum(p.shape[1] for p in parts[:rank])
                    xs = torch.cat([p[0] for p in parts]).requires_grad_()
                    ys = torch.cat([p[1] for p in parts])
                    loss = d2sm_divergence(x, y, queue=sharded, backend=backend)
                    expected = d2sm_divergence(xs, ys, queue=whole, backend=backend)
                    loss.backward()
                    expected.backward()
                    case["value"] = max(case["value"], _relative(loss.detach().reshape(1), expected.detach().reshape(1)))
                    case["grad_x"] = max(case["grad_x"], _relative(x.grad, xs.grad[offset:offset + x.shape[0]]))
                    case["pending"].append(sharded.stats.has_pending())
                    case["raised"].append(_raises(sharded.enqueue_last_batch))
                    whole.enqueue(xs.detach(), ys, distributed=False)
                    mine = torch.arange(sharded.x_buffer.shape[0]) * world + rank
                    case["rows_equal"].append(torch.equal(sharded.x_buffer, whole.x_buffer[mine]))
                    want = whole.stats.row_sums[:, mine]
                    case["sums_error"] = max(case["sums_error"], float(
                        ((sharded.stats.row_sums - want).abs() / want.abs().clamp_min(1e-300)).max()))
            out[f"{backend}-{str(dtype).split('.')[-1]}"] = case
    result["from_empty"] = out


def _raises(fn) -> str:
    try:
        fn()
    except (TypeError, ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return ""


def phase_api(rank, world, result):
    """Every public method on a sharded queue, and the misuses that must raise on every rank
    (a rank's invalid input, a whole state of another size) without leaving a rank waiting."""
    import copy

    def filled_queue(dtype=torch.float64):
        queue = FeatureQueue(SIZE, DIM, dtype=dtype, statistics=True, shard=True)
        whole = FeatureQueue(SIZE, DIM, dtype=dtype, statistics=True)
        for step in range(12):
            parts = batches(step, world)
            queue.enqueue(*(t.to(dtype) for t in parts[rank]))
            whole.enqueue(*(torch.cat(t).to(dtype) for t in zip(*parts)), distributed=False)
        return queue, whole

    queue, whole = filled_queue()
    mine = torch.arange(queue.x_buffer.shape[0]) * world + rank
    n = len(queue)
    stored = -(-(n - rank) // world)
    api = {"len": n == len(whole), "memory": torch.equal(queue.memory()[0], whole.x_buffer[mine[:stored]]),
           "history_raises": _raises(queue.history), "buffers": sorted(dict(queue.named_buffers())),
           "no_local_enqueue": _raises(lambda: queue.enqueue(torch.zeros(1, DIM, dtype=torch.float64),
                                                             torch.zeros(1, DIM, dtype=torch.float64),
                                                             distributed=False))}
    # a rank's shard back into the same rank; into the other rank: raises (on both)
    shard = {k: v.clone() if torch.is_tensor(v) else v for k, v in queue.state_dict().items()}
    again = FeatureQueue(SIZE, DIM, dtype=torch.float64, statistics=True, shard=True)
    again.load_state_dict(shard)
    api["same_rank_load"] = torch.equal(again.x_buffer, queue.x_buffer) and torch.equal(
        again.stats.row_sums, queue.stats.row_sums) and len(again) == n
    others = [None] * world
    dist.all_gather_object(others, shard)
    api["other_rank_load"] = _raises(lambda: again.load_state_dict(others[(rank + 1) % world]))
    # a whole state of another size: every rank raises
    small = FeatureQueue(SIZE + 1, DIM, dtype=torch.float64, statistics=True)
    api["size_mismatch"] = _raises(lambda: again.load_state_dict(small.state_dict()))
    # a rank with invalid rows (a wrong width on rank 1): every rank raises, none waits
    width = DIM + 1 if rank == 1 else DIM
    bad = torch.randn(2, width, dtype=torch.float64)
    api["invalid_loss"] = _raises(lambda: d2sm_divergence(bad, bad, queue=queue))
    api["invalid_enqueue"] = _raises(lambda: queue.enqueue(bad, bad))
    # every rank empty: the loss over the queue rows alone, as one process's
    empty = torch.zeros(0, DIM, dtype=torch.float64)
    api["all_empty"] = float((d2sm_divergence(empty, empty, queue=queue)
                              - d2sm_divergence(empty, empty, queue=whole)).abs()
                             / d2sm_divergence(empty, empty, queue=whole).abs())
    # deepcopy, then the same step on the copy and the original
    twin = copy.deepcopy(queue)
    x, y = (t.to(torch.float64) for t in batches(40, world)[rank])
    for q in (queue, twin):
        q.enqueue(x, y)
    api["deepcopy"] = torch.equal(twin.x_buffer, queue.x_buffer) and torch.equal(twin.stats.row_sums,
                                                                                  queue.stats.row_sums)
    # a cast that changes the dtype recomputes the sums (a collective refresh)
    low, low_whole = filled_queue(torch.float32)
    low.double()
    low_whole.double()
    mine = torch.arange(low.x_buffer.shape[0]) * world + rank
    api["cast"] = (low.x_buffer.dtype == torch.float64 and low.stats.row_sums.dtype == torch.float64
                   and float(((low.stats.row_sums - low_whole.stats.row_sums[:, mine]).abs()
                              / low_whole.stats.row_sums[:, mine].abs()).max()))
    queue.reset()
    api["reset"] = len(queue) == 0 and int(queue.x_buffer.abs().sum()) == 0
    result["api"] = api


def run(rank, world, init_file, out, resume_from=None):
    early = FeatureQueue(SIZE, DIM, statistics=True, shard=True)  # before the process group exists
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        result = {"late_group": _raises(lambda: early.enqueue(torch.zeros(1, DIM), torch.zeros(1, DIM)))}
        phase_stream(rank, world, result)
        if resume_from is not None:
            phase_resume(rank, world, result, resume_from)
        if world == 2:
            phase_from_empty(rank, world, result)
            phase_api(rank, world, result)
            phase_collectives(rank, world, result)
            phase_ddp(rank, world, result)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


class Holder(nn.Module):
    """A training module holding its network and its loss (with the queue): DDP wraps both."""

    def __init__(self, shard: bool):
        super().__init__()
        self.net = tiny_denoiser()
        self.crit = D2SMLoss(extractor=tiny_extractor(), sampling="pooled", patch_size=8, stride=4, queue_size=21,
                             divergence="symmetric_kl", shard_queue=shard,
                             distributed=None if shard else False)  # the whole queue: one process's

    def forward(self, noisy, clean):
        return self.crit(noisy + self.net(noisy), clean)


def images(step: int, rank: int, world: int):
    n = (2, 1, 3)[rank] if step != 2 else (1, 0, 2)[rank]  # uneven, and an empty batch on rank 1 at step 2
    g = torch.Generator().manual_seed(50 + 10 * step + rank)
    clean = torch.rand(n, 3, 12, 12, generator=g)
    return clean + 0.1 * torch.randn(clean.shape, generator=g), clean


DDP_STEPS = 5


def phase_ddp(rank, world, result):
    """D2SMLoss(shard_queue=True) inside the DDP-wrapped module (broadcast_buffers=True, the
    default; no ddp_ignore_queues) against one process with an unsharded queue on the
    concatenated batch: parameter gradients each step, the queue, a bf16 autocast step and a
    torch.compile'd loss."""
    result.update(losses=[], grad_error=[])
    model, whole = Holder(shard=True), Holder(shard=False)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt, opt_whole = (torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, whole))
    for step in range(DDP_STEPS):
        noisy, clean = images(step, rank, world)
        loss = ddp(noisy, clean)
        opt.zero_grad()
        loss.backward()
        parts = [images(step, r, world) for r in range(world)]
        expected = whole(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        opt_whole.zero_grad()
        expected.backward()
        result["losses"].append((loss.detach(), expected.detach()))
        result["grad_error"].append(max(float((p.grad - q.grad).abs().max() / q.grad.abs().max())
                                        for p, q in zip(model.net.parameters(), whole.net.parameters())))
        opt.step()
        opt_whole.step()
    result["full"] = model.crit.queue.full_state_dict()
    result["whole"] = whole.crit.queue.state_dict()
    result["shard_rows"] = model.crit.queue.x_buffer.clone()
    result["whole_rows_here"] = whole.crit.queue.x_buffer[rank::world].clone()
    result["model_state"] = full_state_dict(model)
    # bf16 autocast, then the same step through a GradScaler (the loss in eval mode: the queue
    # stays as it is, so both steps see the same sample set)
    model.crit.eval()
    noisy, clean = images(7, rank, world)
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ddp(noisy, clean)
    loss.backward()
    plain = model.net[0].weight.grad.clone()
    opt.zero_grad()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scaled = ddp(noisy, clean)
    scaler.scale(scaled).backward()
    scaler.unscale_(opt)
    result["autocast"] = (loss.detach().float(), scaled.detach().float(), plain, model.net[0].weight.grad.clone())
    scaler.step(opt)
    scaler.update()
    model.crit.train()
    # a torch.compile'd loss against the same loss in eager mode (the sharded divergence runs
    # eagerly inside the compiled module: torch.compiler.disable)
    compiled_crit = torch.compile(Holder(shard=True), backend="aot_eager")
    eager_crit = Holder(shard=True)
    result["compiled"] = []
    for step in (0, 1, 3):  # batches of one shape per rank (no recompilation)
        noisy, clean = images(step, rank, world)
        a, b = compiled_crit(noisy, clean), eager_crit(noisy, clean)
        a.backward()
        b.backward()
        result["compiled"].append((a.detach(), b.detach(),
                                   float((compiled_crit.net[0].weight.grad - eager_crit.net[0].weight.grad)
                                         .abs().max())))
