"""Where the CUDA toolkit is, for the build (setup.py) and the tests (CMake hints, the check that
CI compiled the CUDA kernels). Standalone on purpose: setup.py runs it before torch is imported.

On these machines (DESIGN §5) the `nvcc` on PATH is a wrapper script that execs the toolkit's own
nvcc, so the toolkit is the wrapped one, not the wrapper's prefix; and its libraries are in lib/.
"""
from __future__ import annotations

import os
import re
import shutil
from typing import Optional


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
    if os.environ.get("D2SM_SKIP_CUDA", "0") == "1":
        return "D2SM_SKIP_CUDA=1"
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
