"""What only the C++ extension has (its math against the reference runs in the backend matrix,
tests/test_backend_matrix.py, for both CPU passes): the thread-count independence of its
results, the choice between the CPU passes, strict parsing of the variables it reads, the
fallback when it is missing, and the CMake build of the same csrc/ loaded with
torch.ops.load_library."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import d2sm_ext
from backend_cases import assert_f32_close, make_inputs, run_backend
from cuda_toolkit import find_cuda_home, library_dir
from d2sm_ext.backends import cpp_backend

if cpp_backend.LOAD_ERROR is not None:
    pytest.fail(f"the C++ extension must be built for the test suite: {cpp_backend.LOAD_ERROR}", pytrace=False)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
@pytest.fixture(params=["symmetric", "panel"])
def cpu_pass(request, monkeypatch):
    """The two CPU passes (csrc/cpu/kernels.cpp: symmetric blocks; csrc/driver.cpp: panels)."""
    monkeypatch.setenv("D2SM_CPU_PASS", request.param)
    return request.param


def test_deterministic_and_thread_count(cpu_pass):
    """Repeated runs are bit-identical; one thread gives the same values within float32."""
    x, y, mem = make_inputs((2, 300, 64), 100, "cpu")
    runs = [run_backend("cpu", x, y, mem, "js", True, "mean") for _ in range(3)]
    for out, gx, gy in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(gx, runs[0][1]) and torch.equal(gy, runs[0][2])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_backend("cpu", x, y, mem, "js", True, "mean")
    finally:
        torch.set_num_threads(threads)
    assert_f32_close(one[0], runs[0][0].double(), "value with 1 thread")


def test_auto_picks_cpu_backend_for_cpu_tensors():
    assert d2sm_ext.registry.resolve_backend("auto", "cpu", torch.float32).name == "cpu"
    with pytest.raises(ValueError, match="backend 'cpu' cannot run.*CPU tensors only"):
        d2sm_ext.d2sm_divergence(torch.randn(4, 3, device="meta"), torch.randn(4, 3, device="meta"), backend="cpu")


def test_missing_extension_falls_back_with_one_warning():
    code = ("import warnings, torch\nwarnings.simplefilter('always')\n"
            "with warnings.catch_warnings(record=True) as w:\n    import d2sm_ext\n"
            "print(len([x for x in w if 'unavailable' in str(x.message)]))\n"
            "print(d2sm_ext.registry.resolve_backend('auto', 'cpu', torch.float32).name)\n"
            "print('cpu' in d2sm_ext.unavailable_backends())\n")
    env = dict(os.environ, D2SM_LOAD_EXTENSION="0", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", "dense", "True"]  # the pure-PyTorch fallback


def _cuda_hints():
    """A CUDA build of torch makes find_package(Torch) look for the CUDA toolkit, even for a
    CPU-only library. On these machines the toolkit keeps libraries under lib/ (not lib64/),
    `nvcc` on PATH is a wrapper script, and nvrtc ships inside torch's nvidia wheels."""
    if torch.version.cuda is None:
        return []
    import glob

    root = find_cuda_home()
    hints = []
    if root:
        hints += [f"-DCUDA_TOOLKIT_ROOT_DIR={root}",
                  f"-DCUDA_CUDART_LIBRARY={os.path.join(library_dir(root), 'libcudart.so')}"]
    site = os.path.dirname(os.path.dirname(torch.__file__))
    nvrtc = sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "libnvrtc.so*")))
    if nvrtc:
        hints.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc[0]}")
    return hints


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_build_loads_with_load_library(tmp_path):
    """CMakeLists.txt builds the same csrc/ against libtorch; the library loads and computes."""
    import torch.utils

    build = tmp_path / "build"
    cfg = subprocess.run(["cmake", "-S", ROOT, "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DD2SM_OPT=-O0",
                          f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                          f"-DD2SM_PYTHON={sys.executable}"] + _cuda_hints(),
                         capture_output=True, text=True, timeout=600)
    assert cfg.returncode == 0, cfg.stdout[-3000:] + cfg.stderr[-3000:]
    bld = subprocess.run(["cmake", "--build", str(build), "-j", "2"], capture_output=True, text=True, timeout=900)
    assert bld.returncode == 0, bld.stdout[-3000:] + bld.stderr[-3000:]
    libs = [p for p in build.rglob("libd2sm_ext_ops.so")]
    assert libs, list(build.iterdir())
    code = (f"import torch\ntorch.ops.load_library({str(libs[0])!r})\n"
            "x = torch.randn(7, 5, dtype=torch.float64); y = torch.randn(7, 5, dtype=torch.float64)\n"
            "v = torch.ops.d2sm_ext.fused_forward(x, y, None, None, 'kl', True, 1e-8, False, 'mean', False, False)[0]\n"
            "from d2sm_ext.reference import d2sm_reference\n"
            "torch.testing.assert_close(v, d2sm_reference(x, y), rtol=1e-10, atol=1e-12)\nprint('ok')\n")
    env = dict(os.environ, D2SM_LOAD_EXTENSION="0", PYTHONPATH=ROOT)  # the CMake library, not d2sm_ext._C
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout[-2000:] + run.stderr[-3000:]


def test_pass_choice(monkeypatch):
    """Every D2SM_CPU_PASS value gives the reference's value (with 16-row blocks, 40 rows span
    three, so "auto" takes the symmetric pass); an unknown value is an error."""
    x, y = torch.randn(40, 8), torch.randn(40, 8)
    want = d2sm_ext.d2sm_divergence(x, y, backend="reference")
    monkeypatch.setenv("D2SM_PANEL_ROWS", "16")  # 40 rows: 3 blocks, so "auto" is symmetric
    for choice in ("auto", "symmetric", "panel"):
        monkeypatch.setenv("D2SM_CPU_PASS", choice)
        assert_f32_close(d2sm_ext.d2sm_divergence(x, y, backend="cpu"), want.double(), choice)
    monkeypatch.setenv("D2SM_CPU_PASS", "fast")
    with pytest.raises(RuntimeError, match="D2SM_CPU_PASS must be one of auto, symmetric, panel, got .fast."):
        d2sm_ext.d2sm_divergence(x, y, backend="cpu")


@pytest.mark.parametrize("name,value,message", [
    ("D2SM_PANEL_ROWS", "abc", "D2SM_PANEL_ROWS must be an integer >= 1, got 'abc'"),
    ("D2SM_PANEL_ROWS", "0", "D2SM_PANEL_ROWS must be an integer >= 1, got '0'"),
    ("D2SM_PANEL_ROWS", "12rows", "D2SM_PANEL_ROWS must be an integer >= 1"),
    ("D2SM_PANEL_MB", "lots", "D2SM_PANEL_MB must be a number > 0, got 'lots'"),
    ("D2SM_PANEL_MB", "-5", "D2SM_PANEL_MB must be a number > 0"),
    ("D2SM_PANEL_MB", "nan", "D2SM_PANEL_MB must be a number > 0"),
    ("D2SM_CPU_PASS", "Symmetric", "D2SM_CPU_PASS must be one of auto, symmetric, panel"),
    ("D2SM_CPU_HALF_GEMM", "yes", "D2SM_CPU_HALF_GEMM must be one of 0, 1, got 'yes'"),
    ("D2SM_CPU_TF32", "on", "D2SM_CPU_TF32 must be one of 0, 1, got 'on'"),
])
def test_bad_environment_values_raise_with_the_name(name, value, message, monkeypatch):
    """The C++ side parses its variables strictly (csrc/env.h): junk never becomes 0 or 1 rows."""
    monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match=message):
        d2sm_ext.d2sm_divergence(torch.randn(40, 8), torch.randn(40, 8), backend="cpu")


@pytest.mark.parametrize("env,loaded,warns", [
    (dict(D2SM_LOAD_EXTENSION="0"), False, False),
    (dict(D2SM_NO_EXTENSION="1"), False, True),   # the deprecated spelling still works, with a warning
    (dict(D2SM_NO_EXTENSION="0"), True, True),
    (dict(D2SM_LOAD_EXTENSION="yes"), None, False),  # a bad value: the import raises, naming it
])
def test_load_extension_switch(env, loaded, warns):
    code = ("import warnings\nwarnings.simplefilter('always')\n"
            "with warnings.catch_warnings(record=True) as w:\n    import d2sm_ext\n"
            "print('cpu' in d2sm_ext.available_backends())\n"
            "print(any('deprecated' in str(x.message) for x in w))\n")
    full = {k: v for k, v in os.environ.items() if k not in ("D2SM_LOAD_EXTENSION", "D2SM_NO_EXTENSION")}
    full.update(env, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=300)
    if loaded is None:
        assert out.returncode != 0 and "D2SM_LOAD_EXTENSION must be 0 or 1, got 'yes'" in out.stderr
        return
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(loaded), str(warns)]
