"""Compile every Triton kernel variant the backend uses for sm_90, without a GPU.

Run as a script in a process where TRITON_INTERPRET is not set (under the interpreter the
kernels are interpreted functions and cannot be compiled). Prints one line per variant.
"""
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from d2sm_ext.backends import triton_kernels as K

INPUT_POINTERS = {"xl_ptr", "yl_ptr", "xm_ptr", "ym_ptr", "x_ptr", "xi_ptr", "yi_ptr", "xr_ptr", "yr_ptr", "xc_ptr",
                  "yc_ptr"}
PAIR_POINTERS = INPUT_POINTERS | {"part_ptr", "wx_ptr", "wy_ptr", "rx_ptr", "ry_ptr", "a_ptr", "bn_ptr", "lba_ptr", "w_ptr"}

# (dtype, precision, divergence code, exclude_self, stats, grad x, grad y)
PAIR_VARIANTS = [
    ("fp32", "ieee", 0, True, True, True, False),     # fused kl, mean/sum, x needs grad
    ("fp32", "tf32", 3, False, True, True, True),     # fused js, both grads
    ("bf16", "native", 1, True, True, False, False),  # statistics only (no grad, or reduction none)
    ("fp16", "native", 2, True, False, True, True),   # backward of reduction none
]
PREPASS = [
    (K.row_inv_norm_kernel, {"x_ptr", "out_ptr"}),
    (K.row_dot_kernel, {"x_ptr", "vec_ptr", "out_ptr"}),
    (K.weighted_colsum_kernel, {"x_ptr", "w_ptr", "out_ptr"}),
]


def compile_kernel(fn, dtype, constexprs, pointers, float_args=()):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = f"*{dtype}" if name in INPUT_POINTERS else "*fp32"
        elif name in float_args:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2))


def main() -> int:
    for dtype, precision, div, excl, stats, gx, gy in PAIR_VARIANTS:
        consts = dict(DIV=div, EXCL=excl, COMPUTE_STATS=stats, COMPUTE_GX=gx, COMPUTE_GY=gy,
                      BM=128, BN=64, BK=32, PRECISION=precision, UPCAST=False)
        compiled = compile_kernel(K.pair_panel_kernel, dtype, consts, PAIR_POINTERS, float_args=("eps",))
        assert ".entry pair_panel_kernel" in compiled.asm["ptx"]
        print(f"ok pair_panel_kernel {dtype} {precision} div={div} excl={excl} stats={stats} gx={gx} gy={gy} "
              f"shared={compiled.metadata.shared}")
        if gx or gy:
            # fp16: rows of W' scaled by powers of two (no flush to zero)
            consts = dict(BM=128, BN=128, BK=32, PRECISION=precision, UPCAST=False, SCALE_ROWS=dtype == "fp16")
            compile_kernel(K.panel_grad_kernel, dtype, consts, {"w_ptr", "xl_ptr", "xm_ptr", "g_ptr", "scale_ptr"})
            print(f"ok panel_grad_kernel {dtype} {precision} scale_rows={dtype == 'fp16'}")
    for dtype, precision in (("fp32", "ieee"), ("bf16", "native")):  # queue statistics: the cross block
        consts = dict(HAS_WR=True, HAS_WC=False, BM=64, BN=128, BK=32, PRECISION=precision, UPCAST=False)
        compile_kernel(K.cross_sums_kernel, dtype, consts,
                       {"xr_ptr", "yr_ptr", "xc_ptr", "yc_ptr", "rxr_ptr", "ryr_ptr", "rxc_ptr", "ryc_ptr", "wr_ptr",
                        "wc_ptr", "row_part_ptr", "col_part_ptr"}, float_args=("eps",))
        print(f"ok cross_sums_kernel {dtype} {precision}")
    for fn, pointers in PREPASS:
        consts = dict(BM=32, BD=128)
        if "ACCUMULATE" in fn.arg_names:
            consts["ACCUMULATE"] = True
        compile_kernel(fn, "bf16", consts, pointers)
        print(f"ok {fn.__name__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
