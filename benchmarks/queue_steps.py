"""Per-step cost of training with a queue: the kept statistics (docs/DESIGN.md §3.6) against the
full recomputation over queue.memory(), side by side in one process.

One step = the loss over (N live rows, the filled queue) + backward + enqueue of the batch, with a
full queue (the steady state), fp32, kl, exclude_self, "mean". Both paths use the same backend
("auto": the C++ kernel on CPU, Triton on CUDA), the same inputs and the same queue contents; the
kept-statistics step enqueues with ``enqueue_last_batch()`` (the loss's sums), the full one with
``enqueue(x, y)``.

The floor (docs/DESIGN.md §3.6): a step must read the queue three times, two (2N×d)(d×q) products
(the live rows and the rows the enqueue evicts, one per side) and one (N×q)(q×d) (the gradient).
Those three torch.mm are timed in the same run, and the table gives step / floor.

    python -m benchmarks.queue_steps --out out/queue            # CPU sizes of BENCHMARKS.md
    python -m benchmarks.queue_steps --device cuda --n 256 --dim 1280 --sizes 1048576 --dtype bfloat16

Writes queue_steps_<device>.json and .md (a table) under --out, and prints the table.

``--world 1 2``: the sharded queue (docs/DESIGN.md §3.7) on W gloo processes of one thread each,
for every W given, in one run: the same global batch (--n rows, split over the ranks) and queue
size; per-rank step time (the slowest rank's, per step) and the bytes each rank sends per step,
counted at the collectives. Writes queue_world.json and .md.

    python -m benchmarks.queue_steps --world 1 2 --n 128 --sizes 65472 --out out/queue
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

import d2sm_ext
from d2sm_ext.queue.statistics import inverse_norms
from d2sm_ext.reference import compute_dtype
from benchmarks.common import peak_memory_bytes, summarize, synchronize, time_ms


def make_queue(size: int, dim: int, device: str, dtype: torch.dtype, statistics: bool, exact_up_to: int,
               seed: int = 0):
    """A full queue of random rows. Its statistics are exact (refresh_statistics, O(q²·d)) up to
    ``exact_up_to`` rows; beyond, they are placeholders of the right size and magnitude: the
    per-step time does not depend on their values, and an exact fill would take longer than the
    benchmark (tests/test_queue_statistics.py checks exactness)."""
    g = torch.Generator(device=device).manual_seed(seed)  # rows made on the device: no host copy of q×d
    queue = d2sm_ext.FeatureQueue(size, dim, dtype=dtype, device=device, statistics=statistics)
    x = torch.randn(size, dim, generator=g, device=device).to(dtype)
    with torch.no_grad():
        queue.x_buffer.copy_(x)
        queue.y_buffer.copy_(x + 0.7 * torch.randn(size, dim, generator=g, device=device).to(dtype))
        queue.filled.fill_(size)
    if statistics:
        if size <= exact_up_to:
            queue.refresh_statistics()
        else:
            stats = queue.stats
            stats.row_inv_norms[0] = inverse_norms(queue.x_buffer)
            stats.row_inv_norms[1] = inverse_norms(queue.y_buffer)
            stats.row_sums[:2] = 0.5 * (size - 1)
            stats.row_sums[2:] = 1e-3 * size
    return queue


def step_fn(queue, n: int, dim: int, device: str, dtype: torch.dtype, use_statistics: bool):
    g = torch.Generator(device="cpu").manual_seed(1)
    x0 = torch.randn(n, dim, generator=g).to(device, dtype)
    y0 = (x0 + 0.7 * torch.randn(n, dim, generator=g).to(device, dtype))

    def step():
        x = x0.clone().requires_grad_(True)
        if use_statistics:
            loss = d2sm_ext.d2sm_divergence(x, y0, queue=queue)
        else:
            xm, ym = queue.memory()
            loss = d2sm_ext.d2sm_divergence(x, y0, x_memory=xm, y_memory=ym)
        loss.backward()
        if use_statistics:
            queue.enqueue_last_batch()
        else:
            queue.enqueue(x.detach(), y0)
    return step


def _timed(fn, device: str) -> float:
    synchronize(device)
    t = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - t) * 1e3


def floor_fn(queue, n: int, device: str, dtype: torch.dtype):
    """The three products a step cannot avoid, in the dtype the step multiplies in (the compute
    dtype on CPU, the input dtype on CUDA)."""
    mm_dtype = dtype if device == "cuda" else compute_dtype(dtype)
    xb, yb = queue.x_buffer.to(mm_dtype), queue.y_buffer.to(mm_dtype)
    g = torch.Generator(device=device).manual_seed(2)
    rows = torch.randn(2 * n, xb.shape[1], generator=g, device=device).to(mm_dtype)
    weights = torch.randn(n, xb.shape[0], generator=g, device=device).to(mm_dtype)

    def floor():
        torch.mm(rows, xb.T)
        torch.mm(rows, yb.T)
        torch.mm(weights, xb)
    return floor


# -- the sharded queue on W processes (--world) -------------------------------------------------------
def _sharded_queue(size: int, dim: int, dtype: torch.dtype):
    """A full sharded queue of random rows (this rank's shard) with placeholder statistics (the step
    time does not depend on their values; tests/test_sharded_queue.py checks exactness)."""
    queue = d2sm_ext.FeatureQueue(size, dim, dtype=dtype, statistics=True, shard=True)
    g = torch.Generator().manual_seed(10 + (queue.layout.rank if queue.sharded else 0))
    with torch.no_grad():
        rows = queue.x_buffer.shape[0]
        queue.x_buffer.copy_(torch.randn(rows, dim, generator=g).to(dtype))
        queue.y_buffer.copy_(queue.x_buffer + 0.7 * torch.randn(rows, dim, generator=g).to(dtype))
        queue.filled.fill_(size)
        queue.stats.row_inv_norms[0] = inverse_norms(queue.x_buffer)
        queue.stats.row_inv_norms[1] = inverse_norms(queue.y_buffer)
        queue.stats.row_sums[:2] = 0.5 * (size - 1)
        queue.stats.row_sums[2:] = 1e-3 * size
    return queue


def _world_worker(rank: int, world: int, init_file: str, out: str, size: int, n: int, dim: int, dtype_name: str,
                  reps: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    sent = [0]
    originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather", "broadcast")}

    def counting(name):
        def call(tensor_or_list, *args, **kwargs):
            t = args[0] if name == "all_gather" else tensor_or_list  # what this rank puts in
            sent[0] += t.numel() * t.element_size()
            return originals[name](tensor_or_list, *args, **kwargs)
        return call

    try:
        dtype = getattr(torch, dtype_name)
        queue = _sharded_queue(size, dim, dtype)
        local = n // world + (1 if rank < n % world else 0)  # the global batch of n rows, split
        g = torch.Generator().manual_seed(100 + rank)
        x0 = torch.randn(local, dim, generator=g).to(dtype)
        y0 = x0 + 0.7 * torch.randn(local, dim, generator=g).to(dtype)

        def step():
            x = x0.clone().requires_grad_(True)
            d2sm_ext.d2sm_divergence(x, y0, queue=queue).backward()
            queue.enqueue_last_batch()
        for name in originals:
            setattr(dist, name, counting(name))
        times, sent_per_step = [], []
        for i in range(reps + 1):  # + 1: the warm-up step
            dist.barrier()
            before, t = sent[0], time.perf_counter()
            step()
            elapsed = torch.tensor([(time.perf_counter() - t) * 1e3])
            sent_per_step.append(sent[0] - before)
            originals["all_reduce"](elapsed, op=dist.ReduceOp.MAX)  # the step lasts as long as its slowest rank
            if i:
                times.append(float(elapsed))
        for name, original in originals.items():
            setattr(dist, name, original)
        stored = queue.x_buffer.shape[0]
        if rank == 0:
            with open(os.path.join(out, f"world{world}.json"), "w") as f:
                json.dump(dict(world=world, stored_rows=stored, rows_per_rank=local,
                               queue_mib=2 * stored * dim * queue.x_buffer.element_size() / 2 ** 20,
                               step=summarize(times), bytes_sent=int(statistics.median(sent_per_step[1:]))), f)
    finally:
        dist.destroy_process_group()


def world_main(args) -> int:
    """Per-rank step time and bytes sent at each --world W, the same global batch and queue."""
    import tempfile

    import torch.multiprocessing as mp

    size, n, dim = args.sizes[0], args.n, args.dim
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for world in args.world:
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_world_worker, args=(world, os.path.join(tmp, "init"), tmp, size, n, dim, args.dtype, args.reps),
                     nprocs=world, join=True)
            with open(os.path.join(tmp, f"world{world}.json")) as f:
                rows.append(json.load(f))
        print(json.dumps(rows[-1]), flush=True)
    base = next((r["step"]["median"] for r in rows if r["world"] == 1), None)
    lines = [f"Sharded queue on W gloo processes (one thread each; {platform.processor() or platform.machine()}), "
             f"torch {torch.__version__}: global batch N={n}, q={size:,}, d={dim}, {args.dtype}, kl, loss + backward "
             f"+ enqueue_last_batch; per-rank step = the slowest rank's, median ms (p20–p80) of {args.reps} steps", "",
             "| W | rows stored per rank | queue MiB per rank | live rows per rank | step: ms | vs W=1 | "
             "bytes sent per rank and step |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        step = r["step"]
        ratio = "—" if base is None else f"{step['median'] / base:.2f}×"
        lines.append(f"| {r['world']} | {r['stored_rows']:,} | {r['queue_mib']:.0f} | {r['rows_per_rank']} | "
                     f"{step['median']:.1f} ({step['p20']:.1f}–{step['p80']:.1f}) | {ratio} | {r['bytes_sent']:,} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "queue_world.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "queue_world.json"), "w") as f:
        json.dump(dict(torch=torch.__version__, q=size, n=n, dim=dim, dtype=args.dtype, rows=rows), f, indent=1)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--n", type=int, default=64, help="live rows per step (default 64)")
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4032, 16320, 65472, 262080])
    parser.add_argument("--full-up-to", type=int, default=16320,
                        help="run the full recomputation only up to this queue size (it grows as q²)")
    parser.add_argument("--exact-up-to", type=int, default=16320,
                        help="exact statistics (an O(q²·d) refresh) up to this size, placeholders beyond")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds per cell (timing)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--out", default="out/queue")
    parser.add_argument("--world", type=int, nargs="+",
                        help="the sharded queue on W gloo processes (CPU), for each W given (first --sizes only)")
    args = parser.parse_args(argv)
    if args.world:
        return world_main(args)
    dtype = getattr(torch, args.dtype)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for size in args.sizes:
        row = dict(q=size, n=args.n, dim=args.dim, dtype=args.dtype, exact_statistics=size <= args.exact_up_to)
        for label, stats in (("statistics", True), ("full", False)):
            if not stats and size > args.full_up_to:
                row[label] = None
                continue
            queue = make_queue(size, args.dim, args.device, dtype, statistics=stats, exact_up_to=args.exact_up_to)
            step = step_fn(queue, args.n, args.dim, args.device, dtype, stats)
            if stats:
                # the step and its floor products alternate call by call, so that the machine's
                # drift (frequency, neighbours) weighs on both alike
                floor = floor_fn(queue, args.n, args.device, dtype)
                step_times, floor_times = [], []

                def step_then_floor():
                    step_times.append(_timed(step, args.device))
                    floor_times.append(_timed(floor, args.device))
                pairs = time_ms(step_then_floor, args.device, args.reps, warmup=1, budget_s=2 * args.budget)
                times = None if pairs is None else step_times[1:]  # [1:]: without the warm-up call
                row["floor"] = None if pairs is None else summarize(floor_times[1:])
                del floor
            else:
                times = time_ms(step, args.device, args.reps, warmup=1, budget_s=args.budget)
            synchronize(args.device)
            cell = None if times is None else summarize(times)
            if cell is not None and not args.no_memory:
                cell["peak_mib"] = peak_memory_bytes(step, args.device) / 2 ** 20
            row[label] = cell
            del queue, step
        full, fast, floor = row.get("full"), row.get("statistics"), row.get("floor")
        row["speedup"] = full["median"] / fast["median"] if full and fast else None
        row["over_floor"] = fast["median"] / floor["median"] if fast and floor else None
        rows.append(row)
        print(json.dumps(row), flush=True)
    machine = (torch.cuda.get_device_name() if args.device == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    lines = [f"Queue steps on {args.device} ({machine}), torch {torch.__version__}: N={args.n}, d={args.dim}, "
             f"{args.dtype}, kl, loss + backward + enqueue, median ms (p20–p80), peak MiB above the inputs "
             f"(statistics exact up to q={args.exact_up_to}, placeholders beyond: timing only)", "",
             "| q | statistics: ms | full recomputation: ms | speed-up | floor products: ms | step / floor | "
             "peak MiB (statistics / full) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        def cell(c):
            return "—" if c is None else f"{c['median']:.1f} ({c['p20']:.1f}–{c['p80']:.1f})"

        def mem(c):
            return "—" if c is None or "peak_mib" not in c else f"{c['peak_mib']:.0f}"

        speed = "—" if r["speedup"] is None else f"{r['speedup']:.1f}×"
        over = "—" if r["over_floor"] is None else f"{r['over_floor']:.2f}×"
        lines.append(f"| {r['q']:,} | {cell(r['statistics'])} | {cell(r['full'])} | {speed} | "
                     f"{cell(r.get('floor'))} | {over} | {mem(r['statistics'])} / {mem(r['full'])} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, f"queue_steps_{args.device}.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, f"queue_steps_{args.device}.json"), "w") as f:
        json.dump(dict(machine=machine, torch=torch.__version__, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
