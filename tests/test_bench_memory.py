"""The benchmarks' CPU peak-memory measurement counts allocations made and freed inside a C++ op
(the fused kernel's scratch panels), not only what an op returns."""
import torch

import d2sm_ext
from benchmarks.common import peak_memory_bytes


def test_plain_allocations():
    def step():
        a = torch.ones(1 << 20)  # 4 MiB
        b = torch.ones(1 << 20)  # 4 MiB while a is alive
        del a, b
        c = torch.ones(1 << 19)  # 2 MiB after both are freed
        del c

    peak = peak_memory_bytes(step, "cpu")
    assert 8 << 20 <= peak < 9 << 20, peak


def test_scratch_inside_the_cpp_op_is_counted():
    x, y = torch.randn(256, 8), torch.randn(256, 8)

    def step():
        with torch.no_grad():
            d2sm_ext.d2sm_divergence(x, y, backend="cpu")

    # the op's two 256×256 fp32 Gram panels (512 KiB) live only inside it
    assert peak_memory_bytes(step, "cpu") >= 2 * 256 * 256 * 4
