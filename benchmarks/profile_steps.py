"""Where a step's time goes, per kernel: torch.profiler's key averages of one dense step and one
queue step for each backend, so that every card minute also gives the breakdown (issue 27).

    python -m benchmarks.profile_steps --device cuda --out $OUT          # gpu_check.sh's "profile" stage
    python -m benchmarks.profile_steps --device cpu --m 64 --dim 32 --queue-size 256 --queue-dim 16 --n 8

One dense step = ``d2sm_divergence(x, y, backend=B)`` + backward (x needs a gradient, y does not:
the benchmarks' convention); one queue step = the loss over a full statistics queue + backward +
``enqueue_last_batch()``. Each is run twice to warm up (compiles, caches), then once under the
profiler. Per (step, backend) the table lists the top operators by self time on the device (self
CPU time on CPU), the device time in all, the host (CPU) time in all, the number of device
kernels launched and of aten op calls (countable on CPU too): a step whose host time exceeds its
device time is bound by launches.
Writes profile_<device>.md under --out and prints it.
"""
from __future__ import annotations

import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile

import d2sm_ext
from benchmarks.common import usable_backend
from benchmarks.queue_steps import make_queue

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dense_step(backend: str, m: int, dim: int, device: str, dtype: torch.dtype):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, dim, generator=g, device=device, dtype=dtype).requires_grad_(True)
    y = torch.randn(m, dim, generator=g, device=device, dtype=dtype)

    def step():
        x.grad = None
        d2sm_ext.d2sm_divergence(x, y, backend=backend).backward()
    return step


def queue_step(backend: str, n: int, size: int, dim: int, device: str, dtype: torch.dtype):
    queue = make_queue(size, dim, device, dtype, statistics=True, exact_up_to=0)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(n, dim, generator=g, device=device, dtype=dtype).requires_grad_(True)
    y = torch.randn(n, dim, generator=g, device=device, dtype=dtype)

    def step():
        x.grad = None
        d2sm_ext.d2sm_divergence(x, y, backend=backend, queue=queue).backward()
        queue.enqueue_last_batch()
    return step


def profile_one(step, device: str, top: int) -> str:
    for _ in range(2):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    on_device = device == "cuda"
    key = "self_device_time_total" if on_device else "self_cpu_time_total"
    rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:top]
    device_us = sum(e.self_device_time_total for e in events) if on_device else 0.0
    host_us = max((e.cpu_time_total for e in events), default=0.0)  # the outermost op spans the step
    launches = sum(e.count for e in events if on_device and e.device_type == torch.autograd.DeviceType.CUDA)
    aten_calls = sum(e.count for e in events if e.key.startswith("aten::"))
    lines = [f"device time {device_us / 1e3:.3f} ms, host time (longest op span) {host_us / 1e3:.3f} ms, "
             f"device kernels {launches}, aten op calls {aten_calls}", "",
             "| operator / kernel | calls | self device ms | self CPU ms |", "|---|---|---|---|"]
    for e in rows:
        name = e.key if len(e.key) <= 90 else e.key[:87] + "..."
        lines.append(f"| {name.replace('|', '/')} | {e.count} | {e.self_device_time_total / 1e3:.3f} | "
                     f"{e.self_cpu_time_total / 1e3:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default="out/profile")
    parser.add_argument("--m", type=int, default=4096, help="rows of the dense step (default 4096)")
    parser.add_argument("--dim", type=int, default=4096, help="features of the dense step (default 4096)")
    parser.add_argument("--n", type=int, default=256, help="live rows of the queue step (default 256)")
    parser.add_argument("--queue-size", type=int, default=2 ** 20, help="queue rows (default 2^20)")
    parser.add_argument("--queue-dim", type=int, default=1280, help="features of the queue step (default 1280)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--backends", default=None,
                        help="comma-separated (default: every usable backend of the device but the reference, "
                             "and the interpreter's triton)")
    parser.add_argument("--top", type=int, default=12, help="operators per table (default 12)")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]
    if args.backends:
        backends = args.backends.split(",")
    else:
        backends = [name for name in d2sm_ext.available_backends()
                    if name != "reference" and usable_backend(name, args.device, dtype)]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"profile_{args.device}.md")
    sections = [f"# Per-kernel profile ({args.device}: "
                f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}, torch {torch.__version__})"]
    steps = [("dense", f"M={args.m} d={args.dim} {args.dtype}",
              lambda b: dense_step(b, args.m, args.dim, args.device, dtype)),
             ("queue", f"N={args.n} q={args.queue_size} d={args.queue_dim} {args.dtype}",
              lambda b: queue_step(b, args.n, args.queue_size, args.queue_dim, args.device, dtype))]
    for kind, shape, make in steps:
        for backend in backends:
            if kind == "queue" and not usable_backend(backend, args.device, dtype, need_queue=True):
                continue
            title = f"## {kind} step, {shape}, backend {backend}"
            try:
                body = profile_one(make(backend), args.device, args.top)
            except (RuntimeError, ValueError) as exc:  # out of memory, a backend that cannot run it
                body = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
            sections.append(title + "\n\n" + body)
            print(title, flush=True)
            with open(path, "w") as f:  # after every section: a stage limit keeps what was profiled
                f.write("\n\n".join(sections) + "\n")
            if args.device == "cuda":
                torch.cuda.empty_cache()
    print("\n\n".join(sections))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
