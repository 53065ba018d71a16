"""The Triton kernels compile for a real GPU (sm_90) — in CI, without a GPU — with the tiles the
backend ships (d2sm_ext/sizing.py), and none of them spills registers.

The CPU interpreter executes kernels with numpy and accepts code the GPU compiler rejects (seen
here: an early return inside a constexpr branch). Compiling ahead of time for Hopper, in a
process without TRITON_INTERPRET, catches that. tests/triton_aot.py compiles every variant and
reads its registers and spill bytes from ptxas; the report is printed (pytest -s or -rA shows
it) and any spill fails the test: a spilled tile reads and writes local memory in its inner loop.
"""
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

LINE = re.compile(r"^ok (\w+) (.*) tiles=(\S+) regs=(\d+) spill_stores=(\d+) spill_loads=(\d+) shared=(\d+)$", re.M)


@pytest.mark.slow
def test_every_kernel_variant_compiles_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "D2SM_TRITON_CONFIG",
                                                            "D2SM_TRITON_GRAD_CONFIG")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.join(root, "tests", "triton_aot.py")], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = LINE.findall(proc.stdout)
    print("\nkernel | variant | tiles BM,BN,BK,warps,stages | registers | spill stores/loads (B) | shared (B)")
    for name, variant, tiles, regs, st, ld, shared in rows:
        print(f"{name} | {variant} | {tiles} | {regs} | {st}/{ld} | {shared}")
    count = lambda k: sum(r[0] == k for r in rows)  # noqa: E731
    # 8 pair variants + 6 of the queue gradient with the Gram handed over (live and memory tiles)
    assert count("pair_panel_kernel") == 14 and count("panel_grad_kernel") == 7, proc.stdout
    assert count("cross_sums_kernel") == 4 and len(rows) == 28, proc.stdout
    assert proc.stdout.count("ok ") == len(rows), proc.stdout  # every variant reported its resources
    spilled = [f"{r[0]} {r[1]} tiles={r[2]}: {r[4]} B stores, {r[5]} B loads" for r in rows if int(r[4]) or int(r[5])]
    assert not spilled, "register spills at the shipped tiles:\n" + "\n".join(spilled)
