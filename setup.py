"""Build script: the C++ extension ``d2sm_ext._C`` (op schemas + fused CPU kernel, csrc/).

    pip install --no-build-isolation -e .        # torch must be installed first

Environment switches (the habits of pytorch/extension-cpp and flash-attention):
  D2SM_SKIP_EXTENSION=1   build no extension (pure Python; the cpu backend is then unavailable)
  D2SM_CPU_FLAGS="..."    instruction-set flags for the CPU kernel (default: -mavx2 -mfma when the
                          build machine has AVX2, else none); the extension runs where it was built
  DEBUG=1                 -O0 -g
  MAX_JOBS=N              parallel compile jobs (ninja)
"""
import os


def _cpu_flags():
    if "D2SM_CPU_FLAGS" in os.environ:
        return os.environ["D2SM_CPU_FLAGS"].split()
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return []
    return ["-mavx2", "-mfma"] if (" avx2" in info and " fma" in info) else []

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("D2SM_SKIP_EXTENSION", "0") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    debug = os.environ.get("DEBUG", "0") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += _cpu_flags() + ["-fopenmp"]  # the C++ standard is the one torch.utils.cpp_extension picks; -fopenmp: at::parallel_for is OpenMP-based in PyTorch builds
    ext_modules.append(CppExtension(
        "d2sm_ext._C", ["csrc/d2sm.cpp"], extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
        py_limited_api=False))
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
