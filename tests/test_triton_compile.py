"""The Triton kernels compile for a real GPU (sm_90) — in CI, without a GPU — with the tiles the
backend ships (d2sm_ext/sizing.py), and none of them spills registers, under every Triton version
the package claims: the venv's own (the newest) and the older ones that tools/triton_versions.py
installs beside it (`make install`; the oldest, 3.6, is the GPU machine's and refuses dots with
K < 16, which the newer ones accept).

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

import triton_versions

pytest.importorskip("triton")
VENV = os.path.dirname(os.path.dirname(os.path.abspath(sys.executable)))

LINE = re.compile(r"^ok (\w+) (.*) tiles=(\S+) regs=(\d+) spill_stores=(\d+) spill_loads=(\d+) shared=(\d+)$", re.M)


@pytest.mark.slow
@pytest.mark.parametrize("version", ["venv", *triton_versions.SIDE_VERSIONS])
def test_every_kernel_variant_compiles_for_sm90_without_spills(version):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "D2SM_TRITON_CONFIG",
                                                            "D2SM_TRITON_GRAD_CONFIG")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [root]
    if version != "venv":
        # a missing side install is a failed set-up, not a skip: the claim would go untested
        assert triton_versions.installed(VENV, version), (
            f"Triton {version} is not installed beside the venv ({triton_versions.side_dir(VENV, version)}): "
            f"run `make install` (tools/triton_versions.py install {VENV})")
        path.insert(0, triton_versions.side_dir(VENV, version))
    env["PYTHONPATH"] = os.pathsep.join(path + [env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", "import triton; print('triton', triton.__version__)"], env=env,
                          capture_output=True, text=True, timeout=120)
    seen = proc.stdout.split()[-1] if proc.returncode == 0 else proc.stderr[-2000:]
    assert version == "venv" or seen == version, f"expected Triton {version}, imported {seen}"
    proc = subprocess.run([sys.executable, os.path.join(root, "tests", "triton_aot.py")], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    print(f"\nTriton {seen}")
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
