"""Build script: the C++/CUDA extension ``d2sm_ext._C`` (op schemas + fused kernels, csrc/).

    pip install --no-build-isolation -e .        # torch must be installed first

The CUDA kernels (csrc/cuda/) are compiled whenever a CUDA toolkit is found — decided on
the toolkit, not on a visible GPU, so that CI without a GPU still compiles them. The toolkit is
$CUDA_HOME (or $CUDA_PATH), else the one behind the `nvcc` on PATH; when that nvcc is a wrapper
script that execs another nvcc, the wrapped toolkit is used (docs/DESIGN.md §8; tools/cuda_toolkit.py).
Where torch is a CPU-only build or its CUDA major version differs from the toolkit's (which
torch.utils.cpp_extension refuses), the CPU kernels are built alone and the reason is printed.

Environment switches (the habits of pytorch/extension-cpp and flash-attention; every knob of the
package: docs/DESIGN.md §7):
  D2SM_BUILD_EXTENSION=0  build no extension (pure Python; backends cpu/cuda are then unavailable)
  D2SM_BUILD_CUDA=0       build the CPU kernels only, even where a toolkit exists
                          (the old D2SM_SKIP_EXTENSION=1 / D2SM_SKIP_CUDA=1 still work, with a warning)
  TORCH_CUDA_ARCH_LIST    CUDA archs (default "8.0;9.0" when no GPU is visible; with a GPU,
                          torch's default: the visible cards' archs)
  D2SM_CPU_FLAGS="..."    instruction-set flags for the CPU kernel (default: -mavx2 -mfma when the
                          build machine has AVX2, else none); the extension runs where it was built
  DEBUG=1                 -O0 -g
  MAX_JOBS=N              parallel compile jobs (ninja)
"""
import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools"))
from cuda_toolkit import build_flag, cublas_paths, cuda_build_blocker, find_cuda_home, library_dir  # noqa: E402

DEFAULT_CUDA_ARCHS = "8.0;9.0"  # A100, H100/H200: every-arch builds take far too long here
# csrc/ by concern and device: schemas, the device-generic driver, the CPU kernels (csrc/cuda/
# is added where a toolkit is found). CMakeLists.txt lists the same CPU sources.
CPU_SOURCES = ["csrc/ops.cpp", "csrc/driver.cpp", "csrc/cpu/kernels.cpp"]


def _cpu_flags():
    if "D2SM_CPU_FLAGS" in os.environ:
        return os.environ["D2SM_CPU_FLAGS"].split()
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return []
    return ["-mavx2", "-mfma"] if (" avx2" in info and " fma" in info) else []


ext_modules, cmdclass = [], {}
if build_flag("D2SM_BUILD_EXTENSION", "D2SM_SKIP_EXTENSION"):
    import torch

    blocker = cuda_build_blocker(torch.version.cuda)
    cuda_home = find_cuda_home() if blocker is None else None
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = cuda_home  # before cpp_extension reads it (at import)
    else:
        print(f"d2sm_ext: building the CPU kernels only: {blocker}", file=sys.stderr)
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -fopenmp: at::parallel_for is OpenMP-based in PyTorch builds (and `omp simd` marks the loops
    # to vectorise); -fno-trapping-math: lets GCC if-convert the epilogue's selects (no code here
    # relies on floating-point exceptions). The C++ standard is the one cpp_extension picks.
    cxx = opt + _cpu_flags() + ["-fopenmp", "-fno-trapping-math"]
    common = dict(extra_link_args=["-fopenmp"], py_limited_api=False)
    if cuda_home is not None:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        # cuBLAS: csrc/cuda/kernels.cu calls it directly (fp32 GEMMs with an explicit TF32 choice)
        cublas_includes, cublas_link = cublas_paths(cuda_home)
        ext_modules.append(CUDAExtension(
            "d2sm_ext._C", CPU_SOURCES + ["csrc/cuda/kernels.cu"],
            extra_compile_args={"cxx": cxx, "nvcc": opt + ["-lineinfo"]},
            include_dirs=cublas_includes,
            library_dirs=[library_dir(cuda_home)],  # torch adds lib64/ only; some toolkits use lib/
            extra_link_args=common["extra_link_args"] + cublas_link,
            **{k: v for k, v in common.items() if k != "extra_link_args"}))
    else:
        ext_modules.append(CppExtension(
            "d2sm_ext._C", CPU_SOURCES, extra_compile_args={"cxx": cxx}, **common))
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
