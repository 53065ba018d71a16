"""The C++ extension's "cpu" backend vs the reference, with the reference's own breadth:
every divergence × exclude_self × reduction at several M and d, edge rows, batches, memory rows,
non-contiguous and half inputs, gradcheck in float64, opcheck, torch.compile, determinism,
and the CMake build of the same csrc/ loaded with torch.ops.load_library."""
import itertools
import os
import shutil
import subprocess
import sys

import pytest
import torch

import d2sm_ext
from backend_cases import (assert_f32_close, check_compile_fullgraph, check_edge_rows_float64, check_float64_literal,
                           check_gradcheck, check_low_precision, check_non_contiguous, check_opcheck, check_parity,
                           make_inputs, run_backend)
from d2sm_ext import cpp_backend
from d2sm_ext.reference import DIVERGENCES, REDUCTIONS

if cpp_backend.LOAD_ERROR is not None:
    pytest.fail(f"the C++ extension must be built for the test suite: {cpp_backend.LOAD_ERROR}", pytrace=False)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from cuda_toolkit import find_cuda_home, library_dir  # noqa: E402
COMBOS = list(itertools.product(DIVERGENCES, (True, False), REDUCTIONS))
SHAPES = [((2, 1), 0), ((3, 17, 5), 6), ((64, 300), 0), ((3, 3, 300), 64)]


# The two CPU passes (csrc/d2sm.cpp): "symmetric" (each pair once; taken for M > 512) and "panel"
# (the CUDA backend's driver; taken for M ≤ 512). Tests that check the math run both, forced.
PASSES = ["symmetric", "panel"]


@pytest.fixture(params=PASSES)
def cpu_pass(request, monkeypatch):
    monkeypatch.setenv("D2SM_CPU_PASS", request.param)
    return request.param


@pytest.mark.parametrize("shape,n_memory", SHAPES)
@pytest.mark.parametrize("div,excl,red", COMBOS)
def test_parity_float32(div, excl, red, shape, n_memory, cpu_pass):
    check_parity("cpu", shape, n_memory, div, excl, red, "cpu")


@pytest.mark.parametrize("div,excl,red", COMBOS)
def test_float64_matches_literal_and_reference(div, excl, red, cpu_pass):
    check_float64_literal("cpu", "cpu", div, excl, red)


@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("excl", [True, False])
@pytest.mark.parametrize("red", ["mean", "none"])
def test_gradcheck_float64(div, excl, red, cpu_pass):
    check_gradcheck("cpu", "cpu", div, excl, red)


@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("excl", [True, False])
def test_edge_rows(div, excl, cpu_pass):
    check_edge_rows_float64("cpu", "cpu", div, excl)


def test_non_contiguous_inputs_and_memory(cpu_pass):
    check_non_contiguous("cpu", "cpu", "js")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    check_low_precision("cpu", (2, 40, 96), 24, "kl", True, "mean", "cpu", dtype)


def test_memory_rows_get_no_gradient():
    x = torch.randn(5, 8, requires_grad=True)
    y = torch.randn(5, 8)
    xm = torch.randn(30, 8, requires_grad=True)
    ym = torch.randn(30, 8, requires_grad=True)
    d2sm_ext.d2sm_divergence(x, y, backend="cpu", x_memory=xm, y_memory=ym).backward()
    assert xm.grad is None and ym.grad is None and x.grad.abs().sum() > 0
    # the forward op is asked for the live rows' gradient only, and none for y
    out = torch.ops.d2sm_ext.fused_forward(x.detach(), y, xm.detach(), ym.detach(), "kl", True, 1e-8, False,
                                           "mean", True, False)
    assert out[2].shape == x.shape and out[3].numel() == 0


def test_deterministic_and_threads():
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


def test_opcheck():
    check_opcheck(torch.ops.d2sm_ext.fused_forward, torch.ops.d2sm_ext.fused_backward, "cpu")


def test_torch_compile_fullgraph():
    check_compile_fullgraph("cpu", "cpu", "symmetric_kl")


def test_auto_picks_cpu_backend_for_cpu_tensors():
    assert d2sm_ext.backends.resolve_backend("auto", "cpu", torch.float32).name == "cpu"
    with pytest.raises(ValueError, match="backend 'cpu' cannot run.*CPU tensors only"):
        d2sm_ext.d2sm_divergence(torch.randn(4, 3, device="meta"), torch.randn(4, 3, device="meta"), backend="cpu")


def test_missing_extension_falls_back_with_one_warning():
    code = ("import warnings, torch\nwarnings.simplefilter('always')\n"
            "with warnings.catch_warnings(record=True) as w:\n    import d2sm_ext\n"
            "print(len([x for x in w if 'unavailable' in str(x.message)]))\n"
            "print(d2sm_ext.backends.resolve_backend('auto', 'cpu', torch.float32).name)\n"
            "print('cpu' in d2sm_ext.unavailable_backends())\n")
    env = dict(os.environ, D2SM_NO_EXTENSION="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", "reference", "True"]


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


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_build_loads_with_load_library(tmp_path):
    """CMakeLists.txt builds the same csrc/ against libtorch; the library loads and computes."""
    import torch.utils

    build = tmp_path / "build"
    cfg = subprocess.run(["cmake", "-S", ROOT, "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
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
    env = dict(os.environ, D2SM_NO_EXTENSION="1", PYTHONPATH=ROOT)  # the CMake library, not d2sm_ext._C
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout[-2000:] + run.stderr[-3000:]


@pytest.mark.parametrize("red", ["mean", "none"])
def test_several_blocks_and_batch_chunks(red, cpu_pass, monkeypatch):
    """Blocks / panels of 48 rows, as for large M: with 130 live + 30 memory rows the symmetric
    pass has 4 blocks (one straddling the live/memory boundary, 10 block pairs), the panel pass
    3 live panels; one problem per batch chunk in the panel pass."""
    monkeypatch.setenv("D2SM_PANEL_ROWS", "48")
    check_parity("cpu", (3, 130, 20), 30, "symmetric_kl", True, red, "cpu")


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
    with pytest.raises(RuntimeError, match="D2SM_CPU_PASS must be auto, symmetric or panel"):
        d2sm_ext.d2sm_divergence(x, y, backend="cpu")
