"""Build-time helpers for setup.py and the tests: where the CUDA toolkit is (CMake hints, the
check that CI compiled the CUDA kernels) and the D2SM_BUILD_* switches. Standalone on purpose:
setup.py runs it before torch is imported.

The `nvcc` on PATH may be a wrapper script that execs a toolkit's own nvcc: the toolkit is then
the wrapped one, not the wrapper's prefix, and its libraries may be in lib/ rather than lib64/
(docs/DESIGN.md §8).
"""
from __future__ import annotations

import os
import re
import shutil
import warnings
from typing import Optional


def build_flag(name: str, deprecated: str) -> bool:
    """A D2SM_BUILD_* switch: "1" (default) or "0". Its deprecated D2SM_SKIP_* spelling means the
    opposite and still works, with a warning. Any other value stops the build with a message."""
    value = os.environ.get(name, "")
    old = os.environ.get(deprecated, "")
    if value not in ("", "0", "1"):
        raise SystemExit(f"{name} must be 0 or 1, got {value!r}")
    if old:
        if old not in ("0", "1"):
            raise SystemExit(f"{deprecated} must be 0 or 1, got {old!r}")
        warnings.warn(f"{deprecated}={old} is deprecated: use {name}={1 - int(old)}", DeprecationWarning,
                      stacklevel=2)
        if not value:
            return old != "1"
    return value != "0"


def find_cuda_home() -> Optional[str]:
    """$CUDA_HOME or $CUDA_PATH, else the toolkit behind the `nvcc` on PATH; None without one."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    nvcc = os.path.realpath(nvcc)
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
    except OSError:
        head = b""
    if head.startswith(b"#!"):  # a wrapper such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
        found = re.search(rb"(/\S+)/bin/nvcc\b", head)
        if found:
            return found.group(1).decode()
    return os.path.dirname(os.path.dirname(nvcc))


def library_dir(cuda_home: str) -> str:
    """The toolkit's library folder: lib64/ where it has libcudart there, else lib/."""
    lib64 = os.path.join(cuda_home, "lib64")
    return lib64 if os.path.exists(os.path.join(lib64, "libcudart.so")) else os.path.join(cuda_home, "lib")


def toolkit_version(cuda_home: str) -> Optional[str]:
    """"13.0" from `nvcc --version`, or None when it cannot be run."""
    import subprocess

    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+\.\d+)", out)
    return found.group(1) if found else None


def cuda_build_blocker(torch_cuda: Optional[str]) -> Optional[str]:
    """Why the CUDA kernels will not be built here (None: they will). ``torch_cuda`` is
    ``torch.version.cuda``. torch.utils.cpp_extension refuses a toolkit whose major version differs
    from torch's; the build then falls back to the CPU kernels instead of failing."""
    if not build_flag("D2SM_BUILD_CUDA", "D2SM_SKIP_CUDA"):
        return "D2SM_BUILD_CUDA=0"
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return "no CUDA toolkit found (no nvcc on PATH, CUDA_HOME unset)"
    if torch_cuda is None:
        return "this torch is a CPU-only build"
    version = toolkit_version(cuda_home)
    if version is None:
        return f"cannot run {cuda_home}/bin/nvcc"
    if version.split(".")[0] != torch_cuda.split(".")[0]:
        return f"CUDA toolkit {version} at {cuda_home} does not match torch's CUDA {torch_cuda} (major version)"
    return None


def cublas_paths(cuda_home: str, search_path: Optional[list] = None) -> tuple[list, list]:
    """(include folders, link arguments) for cuBLAS, which the CUDA kernels call directly (the fp32
    GEMMs with an explicit TF32 choice, docs/DESIGN.md §4): the toolkit's headers and libcublas
    when it has them; else those of the pip wheel that torch itself loads (nvidia/cu13/ for CUDA 13,
    nvidia/cublas/ for CUDA 12; its library is linked by file name, since the wheel has no
    unversioned libcublas.so). At run time torch has already loaded that library."""
    import glob
    import sys

    includes, link = [], []
    if not os.path.exists(os.path.join(cuda_home, "include", "cublas_v2.h")):
        for root in search_path if search_path is not None else sys.path:
            for sub in ("cu13", "cublas", "cu12"):
                inc = os.path.join(root, "nvidia", sub, "include")
                if os.path.exists(os.path.join(inc, "cublas_v2.h")):
                    includes.append(inc)
                    break
            if includes:
                break
    lib = library_dir(cuda_home)
    if glob.glob(os.path.join(lib, "libcublas.so")):
        return includes, ["-lcublas"]
    for root in search_path if search_path is not None else sys.path:
        for sub in ("cu13", "cublas", "cu12"):
            found = sorted(glob.glob(os.path.join(root, "nvidia", sub, "lib", "libcublas.so.*")))
            if found:
                link = [found[0], "-Wl,-rpath," + os.path.dirname(found[0])]
                return includes, link
    return includes, ["-lcublas"]  # let the linker say what is missing
