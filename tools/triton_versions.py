"""The Triton versions the package claims, and the side installs that let the tests compile every
kernel variant under each of them (tests/test_triton_compile.py).

The claim follows pyproject's torch range (torch>=2.11): torch 2.11 brings Triton 3.6, the oldest
claimed; the newest is the Triton of the torch the Makefile installs (the venv's own). The venv
can hold one Triton, so every other claimed version is installed beside it, without dependencies,
into ``<venv>/triton-aot/<version>`` (``pip install --no-deps --target``); the AOT compile script
then runs with that directory first on PYTHONPATH. Compiling for sm_90 needs no GPU (Triton ships
its own ptxas), so each version's compiler is checked on a CPU machine: Triton 3.6's ``tl.dot``
requires K >= 16 where 3.8 accepted 8, a failure first seen on the card (issue 26).

    python tools/triton_versions.py install VENV   # what `make install` runs
"""
from __future__ import annotations

import os
import subprocess
import sys

# Claimed Triton versions other than the venv's own, oldest first (torch 2.11 -> Triton 3.6.0).
SIDE_VERSIONS = ("3.6.0",)
OLDEST_TORCH = "2.11"  # pyproject's torch>=2.11: its Triton is SIDE_VERSIONS[0]


def side_dir(venv: str, version: str) -> str:
    return os.path.join(venv, "triton-aot", version)


def installed(venv: str, version: str) -> bool:
    return os.path.isdir(os.path.join(side_dir(venv, version), "triton"))


def install(venv: str) -> None:
    python = os.path.join(venv, "bin", "python")
    for version in SIDE_VERSIONS:
        if installed(venv, version):
            continue
        subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--target", side_dir(venv, version),
                        f"triton=={version}"], check=True)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "install":
        sys.exit("usage: python tools/triton_versions.py install VENV")
    install(sys.argv[2])
