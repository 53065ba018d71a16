"""Try a few tile configurations of the Triton pair-panel kernel on the GPU target shape.

    python -m benchmarks.tune_triton [--m 4096 --d 4096]

Prints fwd+bwd median ms per (BM, BN, BK, num_warps, num_stages) for tf32 and bf16; the best
goes into ``sizing.triton_pair_tiles``. Each configuration compiles once (seconds).
"""
import argparse
import os
import statistics

import torch

from benchmarks.common import Config, float32_precision, make_inputs, runner, step_fn, time_ms

# The shipped tf32 and half tiles (no spills on sm_90, tests/test_triton_compile.py) and the
# measured 128×64×32 that spilled; a candidate that wins must also pass the spill test.
CANDIDATES = ["64,32,16,8,2", "64,32,32,8,3", "128,64,32,8,3"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, default=4096)
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--configs", default=";".join(CANDIDATES))
    p.add_argument("--device", default="cuda", help="cuda; cpu only under TRITON_INTERPRET=1 (dry runs)")
    args = p.parse_args()
    cases = [Config("tune", args.m, args.d, tf32=True), Config("tune", args.m, args.d, dtype=torch.bfloat16)]
    print("| BM,BN,BK,warps,stages | " + " | ".join(c.label() for c in cases) + " |")
    print("|---|" + "---|" * len(cases))
    for cfg_text in args.configs.split(";"):
        os.environ["D2SM_TRITON_CONFIG"] = cfg_text
        cells = []
        for case in cases:
            try:
                with float32_precision(case.tf32):
                    step = step_fn(runner("triton"), make_inputs(case, args.device), True)
                    cells.append(f"{statistics.median(time_ms(step, args.device, reps=5, warmup=1)):.2f} ms")
            except Exception as exc:  # a config that does not compile or fit: report, go on
                cells.append(f"error: {type(exc).__name__}: {str(exc)[:60]}")
        print(f"| {cfg_text} | " + " | ".join(cells) + " |", flush=True)
    os.environ.pop("D2SM_TRITON_CONFIG")


if __name__ == "__main__":
    main()
