"""Side-by-side comparison of every available backend and the baselines, one table per device.

    python -m benchmarks.compare --device cpu --out out/bench-cpu      # `make bench`
    python -m benchmarks.compare --device cuda --out $OUT/bench        # on a GPU machine

Columns: config | backend | fwd ms | fwd+bwd ms (median [p20–p80]) | peak memory of fwd+bwd |
speedup of fwd+bwd vs the eager reference, vs torch.compile of the reference, vs the plain formula
a user writes (``benchmarks.common.plain_formula``: kl, mean) eager and compiled | achieved
TFLOP/s (useful FLOPs, see ``benchmarks.common``) and % of the dense GEMM rate measured in the
same run for the same dtype/precision. A run that does not fit in memory prints OOM; one whose
first call exceeds the per-cell budget prints timeout. Also: a scaling sweep over M (time and peak
memory, log-log PNGs) and the largest M each backend handled.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys

import torch

import d2sm_ext
from benchmarks.common import (Config, float32_precision, gemm_tflops, make_inputs, peak_memory_bytes,
                               runner, step_fn, summarize, time_ms, usable_backend)

# Ordered by importance: a GPU session is short, and a stage time limit cuts the tail.
GPU_CONFIGS = [
    Config("target", 4096, 4096),
    Config("target", 4096, 4096, tf32=True),
    Config("target", 4096, 4096, dtype=torch.bfloat16),
    Config("large queue", 65536, 1280, tf32=True, compiled_baseline=False),
    Config("large queue", 65536, 1280, dtype=torch.bfloat16, compiled_baseline=False),
    Config("queue", 64, 1280, q=4032),
    Config("queue", 64, 4096, q=4032, compiled_baseline=False),
    Config("pooled patches", 2304, 4096, compiled_baseline=False),
    Config("internal patches (paper)", 36, 4096, b=64, compiled_baseline=False),
    Config("official public-code shape", 256, 100352, compiled_baseline=False),
    Config("official public-code shape", 256, 100352, dtype=torch.bfloat16, compiled_baseline=False),
    Config("large queue", 16384, 1280, tf32=True, compiled_baseline=False),
    Config("large queue", 262144, 1280, dtype=torch.bfloat16, compiled_baseline=False),
]
# CPU: the same families scaled so one cell stays near a minute on 2 cores (said in the table).
CPU_CONFIGS = [
    Config("official public-code shape", 256, 25088, note="d scaled 100352→25088 for CPU"),
    Config("internal patches (paper)", 36, 4096, b=64),
    Config("pooled patches", 1024, 4096, note="M scaled 2304→1024 for CPU"),
    Config("queue", 64, 1280, q=4032),
    Config("square mid-size", 4096, 512),
    Config("wide features", 1024, 4096),
    Config("many rows", 16384, 256, compiled_baseline=False),
]
# `--tiny` (gpu_check.sh --dry-run): the script's command lines in seconds, any device.
TINY_CONFIGS = [Config("tiny", 64, 32, q=16)]
# The baselines timed beside the backends (benchmarks.common.runner): the reference and the plain
# formula a user writes, each eager and under torch.compile.
BASELINES = ("reference", "reference+compile", "plain", "plain+compile")
SWEEP_M = {"cuda": [1024, 4096, 16384, 65536, 131072], "cpu": [256, 1024, 4096, 8192]}
SWEEP_D = 1280


def _auto_choice(cfg: Config, inputs) -> str:
    """The backend "auto" resolves to for these inputs (with the measured GPU rule)."""
    x, y, xm, ym = inputs
    tf32 = d2sm_ext.fused_op.use_tf32("auto")
    problem = d2sm_ext.auto_rules.Problem(x.device, x.dtype, tf32, cfg.b, cfg.m + cfg.q, cfg.d)
    return d2sm_ext.registry.resolve_backend("auto", x.device.type, x.dtype, 1e-8, problem).name


def measure(cfg: Config, backend: str, device: str, reps: int, budget_s: float) -> dict:
    result = dict(config=cfg.label(), backend=backend, note=cfg.note)
    fn = runner(backend)
    try:
        with float32_precision(cfg.tf32):
            inputs = make_inputs(cfg, device)
            if backend == "auto":
                result["backend"] = f"auto → {_auto_choice(cfg, inputs)}"
            for phase, backward in (("fwd", False), ("fwdbwd", True)):
                times = time_ms(step_fn(fn, inputs, backward), device, reps, warmup=2 if device == "cuda" else 1,
                                budget_s=budget_s)
                if times is None:
                    result[phase] = "timeout"
                    break
                result[phase] = summarize(times)
            if isinstance(result.get("fwdbwd"), dict):
                result["peak_bytes"] = peak_memory_bytes(step_fn(fn, inputs, True), device)
    except torch.cuda.OutOfMemoryError:
        result.setdefault("fwd", "OOM")
        result["fwdbwd"] = result["fwdbwd"] if isinstance(result.get("fwdbwd"), dict) else "OOM"
    except RuntimeError as exc:  # CPU allocation failures surface as RuntimeError
        if "alloc" not in str(exc).lower() and "memory" not in str(exc).lower():
            raise
        result.setdefault("fwd", "OOM")
        result["fwdbwd"] = "OOM"
    finally:
        inputs = None
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return result


def _ms(cell) -> str:
    if isinstance(cell, dict):
        return f"{cell['median']:.3f} [{cell['p20']:.3f}–{cell['p80']:.3f}]"
    return str(cell)


def _speedup(row: dict, base: dict | None) -> str:
    if base is None:
        return "-"
    if not isinstance(base.get("fwdbwd"), dict):  # the baseline ran out of memory or time
        return f"∞ (base {base.get('fwdbwd')})" if isinstance(row.get("fwdbwd"), dict) else "-"
    if not isinstance(row.get("fwdbwd"), dict):
        return "-"
    return f"{base['fwdbwd']['median'] / row['fwdbwd']['median']:.2f}×"


def table(rows: list[dict], gemm: dict, configs: dict) -> str:
    head = ("| config | backend | fwd ms | fwd+bwd ms | peak mem (fwd+bwd) | vs eager ref | vs compiled ref | "
            "vs plain eager | vs plain compiled | TFLOP/s (fwd+bwd) | % GEMM |")
    lines = [head, "|" + "---|" * 11]
    for row in rows:
        cfg = configs[row["config"]]

        def baseline(name):
            return next((r for r in rows if r["config"] == row["config"] and r["backend"] == name), None)
        rate = pct = "-"
        if isinstance(row.get("fwdbwd"), dict):
            tf = cfg.flops(True) / (row["fwdbwd"]["median"] * 1e-3) / 1e12
            rate = f"{tf:.2f}"
            g = gemm.get(_gemm_key(cfg))
            pct = f"{100 * tf / g:.0f}%" if g else "-"
        mem = f"{row['peak_bytes'] / 2**20:.1f} MiB" if "peak_bytes" in row else "-"
        label = row["config"] + (f" ({row['note']})" if row.get("note") else "")
        speedups = " | ".join(_speedup(row, baseline(name))
                              for name in BASELINES)
        lines.append(f"| {label} | {row['backend']} | {_ms(row.get('fwd'))} | {_ms(row.get('fwdbwd'))} | {mem} | "
                     f"{speedups} | {rate} | {pct} |")
    return "\n".join(lines)


def _gemm_key(cfg: Config) -> str:
    return f"{cfg.dtype}-{'tf32' if cfg.tf32 else 'ieee'}"


def sweep(device: str, backends: list[str], reps: int, budget_s: float, dtype: torch.dtype, tf32: bool):
    points = []
    for backend in backends:
        for m in SWEEP_M[device]:
            cfg = Config("sweep", m, SWEEP_D, dtype=dtype, tf32=tf32)
            r = measure(cfg, backend, device, reps, budget_s)
            points.append(dict(backend=backend, m=m, fwdbwd=r.get("fwdbwd"), peak_bytes=r.get("peak_bytes")))
            if not isinstance(r.get("fwdbwd"), dict):
                break  # larger M fails too: the last M it handled is the one before
    return points


def plot(points: list[dict], out: str, device: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for key, ylabel, scale, fname in (("fwdbwd", "fwd+bwd time (ms)", 1.0, "sweep_time"),
                                      ("peak_bytes", "peak memory (MiB)", 2.0 ** -20, "sweep_memory")):
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for backend in dict.fromkeys(p["backend"] for p in points):
            pts = [(p["m"], (p[key]["median"] if key == "fwdbwd" else p[key]) * scale) for p in points
                   if p["backend"] == backend and isinstance(p.get("fwdbwd"), dict) and p.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=backend)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"M (rows), d={SWEEP_D}")
        ax.set_ylabel(ylabel)
        ax.set_title(f"D2SM scaling on {device}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        path = os.path.join(out, f"{fname}_{device}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default="out/bench")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per cell (default 20 GPU, 3 CPU)")
    parser.add_argument("--budget", type=float, default=None, help="seconds per cell before 'timeout'")
    parser.add_argument("--only", default=None, help="run only configs whose label contains this text")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument("--baselines", default=",".join(BASELINES),
                        help=f"comma-separated baselines to time before the backends (default {','.join(BASELINES)}; "
                             "gpu_check.sh leaves out reference+compile to fit its stage limit)")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="one tiny config, small GEMM probe (dry runs)")
    args = parser.parse_args(argv)
    device = args.device
    os.makedirs(args.out, exist_ok=True)
    reps = args.reps or (20 if device == "cuda" else 3)
    budget = args.budget or (30.0 if device == "cuda" else 60.0)
    configs = TINY_CONFIGS if args.tiny else GPU_CONFIGS if device == "cuda" else CPU_CONFIGS
    baselines = [b for b in args.baselines.split(",") if b]
    unknown = set(baselines) - set(BASELINES)
    if unknown:
        parser.error(f"--baselines: unknown {sorted(unknown)}; choose from {','.join(BASELINES)}")
    if args.only:
        configs = [c for c in configs if args.only in c.label()]

    gemm = {}
    for cfg in configs:
        key = _gemm_key(cfg)
        if key not in gemm:
            gemm[key] = gemm_tflops(device, cfg.dtype, cfg.tf32, 256 if args.tiny else 8192 if device == "cuda" else 2048)

    header = (f"device: {device_name(device)} | torch {torch.__version__}"
              + (f" | triton {_triton_version()}" if device == "cuda" else "")
              + f" | python {sys.version.split()[0]}")
    gemm_line = "dense GEMM rate measured in this run: " + ", ".join(f"{k}: {v:.1f} TFLOP/s" for k, v in gemm.items())
    rows = []
    by_label = {}
    for cfg in configs:
        by_label[cfg.label()] = cfg
        # "auto" last: the backend a user gets by default, with what it resolved to (auto_rules.py)
        backends = [n for n in d2sm_ext.available_backends()
                    if n != "reference" and usable_backend(n, device, cfg.dtype)]
        for backend in baselines + backends + ["auto"]:
            if backend.endswith("+compile") and (args.no_compile or not cfg.compiled_baseline):
                continue
            row = measure(cfg, backend, device, reps, budget)
            rows.append(row)
            print(f"  {row['config']:<55} {backend:<18} fwd+bwd {_ms(row.get('fwdbwd'))}", flush=True)
            # written after every cell, so a stage time limit still leaves the rows measured so far
            _write(args.out, device, "\n".join([header, gemm_line, "", table(rows, gemm, by_label)]),
                   dict(device=device_name(device), torch=torch.__version__, gemm_tflops=gemm, rows=rows))
    text = "\n".join([header, gemm_line, "", table(rows, gemm, by_label)])

    result = dict(device=device_name(device), torch=torch.__version__, gemm_tflops=gemm, rows=rows)
    if not args.no_sweep:
        sweep_backends = ["reference"] + [n for n in d2sm_ext.available_backends()
                                          if n != "reference" and usable_backend(n, device, torch.float32)]
        tf32 = device == "cuda"
        points = sweep(device, sweep_backends, max(3, reps // 4), budget, torch.float32, tf32)
        result["sweep"] = points
        files = plot(points, args.out, device)
        largest = {}
        for p in points:
            if isinstance(p.get("fwdbwd"), dict):
                largest[p["backend"]] = max(largest.get(p["backend"], 0), p["m"])
        text += ("\n\nscaling sweep (fwd+bwd, d=%d, %s): largest M handled: " % (SWEEP_D, "tf32" if tf32 else "fp32")
                 + ", ".join(f"{k}: {v}" for k, v in largest.items()) + "\nplots: " + ", ".join(files))
        sweep_lines = ["| backend | M | fwd+bwd ms | peak MiB |", "|---|---|---|---|"]
        for p in points:
            mem = f"{p['peak_bytes'] / 2**20:.1f}" if p.get("peak_bytes") is not None else "-"
            sweep_lines.append(f"| {p['backend']} | {p['m']} | {_ms(p.get('fwdbwd'))} | {mem} |")
        text += "\n\n" + "\n".join(sweep_lines)

    _write(args.out, device, text, result)
    print("\n" + text)
    return 0


def _write(out: str, device: str, text: str, result: dict) -> None:
    with open(os.path.join(out, f"compare_{device}.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(os.path.join(out, f"compare_{device}.md"), "w") as f:
        f.write(text + "\n")


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "absent"


if __name__ == "__main__":
    raise SystemExit(main())
