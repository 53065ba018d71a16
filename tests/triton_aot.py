"""Compile every Triton kernel variant the backend launches, with the tiles it ships
(d2sm_ext/sizing.py, the CUDA ones), for sm_90 — without a GPU — and report each one's registers
and spills.

Run as a script in a process where TRITON_INTERPRET is not set (under the interpreter the
kernels are interpreted functions and cannot be compiled). ``triton.compile`` with a
``GPUTarget("cuda", 90, 32)`` needs no device: it lowers to PTX and runs Triton's own ptxas to a
cubin. A compiled kernel's ``n_regs``/``n_spills`` are filled only when the cubin is loaded on a
device, so the registers and spills are read from ptxas itself: the kernel's PTX is assembled
again with Triton's ptxas and its flags plus ``-v``, whose report says "Used N registers" and
"N bytes spill stores, N bytes spill loads". One line per variant:

    ok <kernel> <variant> tiles=BM,BN,BK,warps,stages regs=R spill_stores=S spill_loads=L shared=B
"""
import os
import re
import subprocess
import inspect
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from d2sm_ext import sizing
from d2sm_ext.backends import triton_kernels as K

CUDA = torch.device("cuda")
INPUT_POINTERS = {"xl_ptr", "yl_ptr", "xm_ptr", "ym_ptr", "x_ptr", "xi_ptr", "yi_ptr", "xr_ptr", "yr_ptr", "xc_ptr",
                  "yc_ptr"}
PAIR_POINTERS = INPUT_POINTERS | {"part_ptr", "wx_ptr", "wy_ptr", "rx_ptr", "ry_ptr", "a_ptr", "bn_ptr", "lba_ptr", "w_ptr",
                                  "gmx_ptr", "gmy_ptr"}

# (dtype, precision, divergence code, exclude_self, stats, grad x, grad y)
PAIR_VARIANTS = [
    ("fp32", "ieee", 0, True, True, True, False),     # fused kl, mean/sum, x needs grad
    ("fp32", "tf32", 3, False, True, True, True),     # fused js, both grads
    ("bf16", "native", 1, True, True, False, False),  # statistics only (no grad, or reduction none)
    ("fp16", "native", 2, True, False, True, True),   # backward of reduction none
    # the heaviest epilogues (statistics and both gradients) of each tile family
    ("fp32", "ieee", 2, True, True, True, True),
    ("fp32", "tf32", 2, True, True, True, True),
    ("bf16", "native", 3, False, True, True, True),
    ("fp16", "native", 0, True, True, True, True),
]
# The queue path's backward with the loss's Gram blocks handed over (TILES 1: the live tiles, 2:
# the memory tiles from the Gram): no statistics, the gradient of x (and of y),
# (dtype, precision, divergence code, grad y)
GRAM_GIVEN_VARIANTS = [("fp32", "ieee", 2, True), ("fp32", "tf32", 0, False), ("bf16", "native", 2, True)]
PREPASS = [
    (K.row_inv_norm_kernel, {"x_ptr", "out_ptr"}),
    (K.row_dot_kernel, {"x_ptr", "vec_ptr", "out_ptr"}),
    (K.weighted_colsum_kernel, {"x_ptr", "w_ptr", "out_ptr"}),
]
TARGET = GPUTarget("cuda", 90, 32)


def compile_kernel(fn, dtype, constexprs, pointers, tiles, float_args=()):
    # constexpr parameters with a default keep it unless the variant sets them (else they would
    # compile as runtime integers, with both sides of their branches)
    defaults = {p.name: p.default for p in fn.params if p.is_constexpr and p.default is not inspect.Parameter.empty}
    constexprs = {**defaults, **constexprs}
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
    return triton.compile(src, target=TARGET,
                          options=dict(num_warps=tiles["num_warps"], num_stages=tiles["num_stages"]))


def resource_usage(compiled) -> dict:
    """Registers and spill bytes per thread of a compiled kernel, from ptxas -v on its PTX (the
    same ptxas and flags as Triton's own cubin step)."""
    from triton import knobs
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(TARGET.arch).path
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        extra = knobs.nvidia.ptxas_options.split() if knobs.nvidia.ptxas_options else []
        proc = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", *extra,
                               f"--gpu-name={sm_arch_from_capability(TARGET.arch)}", ptx, "-o",
                               os.path.join(tmp, "k.o")], capture_output=True, text=True, check=True)
    log = proc.stdout + proc.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spill is None:
        raise RuntimeError(f"unexpected ptxas report:\n{log}")
    return dict(regs=int(regs.group(1)), spill_stores=int(spill.group(1)), spill_loads=int(spill.group(2)))


def report(name: str, variant: str, tiles: dict, compiled) -> None:
    use = resource_usage(compiled)
    t = ",".join(str(tiles[k]) for k in ("BM", "BN", "BK", "BD", "num_warps", "num_stages") if k in tiles)
    print(f"ok {name} {variant} tiles={t} regs={use['regs']} spill_stores={use['spill_stores']} "
          f"spill_loads={use['spill_loads']} shared={compiled.metadata.shared}", flush=True)


def main() -> int:
    os.environ.pop("D2SM_TRITON_CONFIG", None)  # the shipped tiles, not a tuning override
    os.environ.pop("D2SM_TRITON_GRAD_CONFIG", None)
    cross = sizing.triton_cross_tiles(CUDA)
    for dtype, precision, div, excl, stats, gx, gy in PAIR_VARIANTS:
        torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
        pair = sizing.triton_pair_tiles(CUDA, torch_dtype, precision == "tf32")
        grad = sizing.triton_grad_tiles(CUDA, torch_dtype, precision == "tf32")
        consts = dict(DIV=div, EXCL=excl, COMPUTE_STATS=stats, COMPUTE_GX=gx, COMPUTE_GY=gy,
                      BM=pair["BM"], BN=pair["BN"], BK=pair["BK"], PRECISION=precision, UPCAST=False)
        compiled = compile_kernel(K.pair_panel_kernel, dtype, consts, PAIR_POINTERS, pair, float_args=("eps",))
        assert ".entry pair_panel_kernel" in compiled.asm["ptx"]
        report("pair_panel_kernel", f"{dtype} {precision} div={div} excl={excl} stats={stats} gx={gx} gy={gy}",
               pair, compiled)
        if gx or gy:
            # fp16: rows of W' scaled by powers of two (no flush to zero)
            scaled = dtype == "fp16"
            consts = dict(BM=grad["BM"], BN=grad["BN"], BK=grad["BK"], PRECISION=precision, UPCAST=False,
                          SCALE_ROWS=scaled)
            compiled = compile_kernel(K.panel_grad_kernel, dtype, consts,
                                      {"w_ptr", "xl_ptr", "xm_ptr", "g_ptr", "scale_ptr"}, grad)
            report("panel_grad_kernel", f"{dtype} {precision} scale_rows={scaled}", grad, compiled)
    for dtype, precision, div, gy in GRAM_GIVEN_VARIANTS:
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        pair = sizing.triton_pair_tiles(CUDA, torch_dtype, precision == "tf32")
        for tiles in (1, 2):
            consts = dict(DIV=div, EXCL=True, COMPUTE_STATS=False, COMPUTE_GX=True, COMPUTE_GY=gy, BM=pair["BM"],
                          BN=pair["BN"], BK=pair["BK"], PRECISION=precision, UPCAST=False, TILES=tiles)
            launch = sizing.triton_given_gram_tiles(pair) if tiles == 2 else pair
            consts["BM"] = launch["BM"]
            compiled = compile_kernel(K.pair_panel_kernel, dtype, consts, PAIR_POINTERS, launch, float_args=("eps",))
            report("pair_panel_kernel", f"{dtype} {precision} div={div} tiles={tiles} gx=True gy={gy}", launch,
                   compiled)
    for dtype, precision in (("fp32", "ieee"), ("bf16", "native")):  # queue statistics: the cross block
        for keep in (False, True):
            consts = dict(HAS_WR=True, HAS_WC=False, BM=cross["BM"], BN=cross["BN"], BK=cross["BK"],
                          PRECISION=precision, UPCAST=False, KEEP_GRAM=keep)
            compiled = compile_kernel(K.cross_sums_kernel, dtype, consts,
                                      {"xr_ptr", "yr_ptr", "xc_ptr", "yc_ptr", "rxr_ptr", "ryr_ptr", "rxc_ptr",
                                       "ryc_ptr", "wr_ptr", "wc_ptr", "row_part_ptr", "col_part_ptr", "gx_out_ptr",
                                       "gy_out_ptr"}, cross, float_args=("eps",))
            report("cross_sums_kernel", f"{dtype} {precision} keep_gram={keep}", cross, compiled)
    prepass = sizing.triton_prepass_tiles(CUDA)
    for fn, pointers in PREPASS:
        consts = dict(BM=prepass["BM"], BD=prepass["BD"])
        if "ACCUMULATE" in fn.arg_names:
            consts["ACCUMULATE"] = True
        report(fn.__name__, "bf16", prepass, compile_kernel(fn, "bf16", consts, pointers, prepass))
    return 0


if __name__ == "__main__":
    sys.exit(main())
