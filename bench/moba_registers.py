"""Registers, spills and shared memory of kernels/moba.py's attention kernels compiled for sm_90 (Hopper), on
any machine: Triton compiles for the target without a GPU and cuobjdump (shipped with Triton) reads the cubin.
It checks the TILES guesses at no device time; docs/moba.md quotes its output.

    TRITON_INTERPRET=0 python bench/moba_registers.py [--head-dims 64 128] [--block-size 128]
"""
import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

os.environ["TRITON_INTERPRET"] = "0"  # the kernels must be JIT functions, not interpreted ones
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dist_moe.kernels import moba  # noqa: E402  (after the path and the interpreter switch)

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def arguments(kernel: str, order: str, p: str, kv: str) -> dict:
    """Pointer and descriptor types of a kernel's tensor arguments (the rest are i32, scales fp32)."""
    f32, i32 = "*fp32", "*i32"
    grads = dict(DO=p, LSE=f32, DELTA=f32, qk_scale="fp32", sm_scale="fp32")
    if order == "gather":
        return {"forward": dict(Q=p, K=kv, V=kv, ROWS=i32, STARTS=i32, ACC=f32, M=f32, L=f32, O=p, LSE=f32,
                                qk_scale="fp32"),
                "dq": dict(Q=p, K=kv, V=kv, ROWS=i32, STARTS=i32, DQ_ACC=f32, DQ=p, **grads),
                "dkdv": dict(Q=p, K=p, V=p, ROWS=i32, STARTS=i32, DK=p, DV=p, **grads)}[kernel]
    return {"forward": dict(Q=p, K=kv, V=kv, CHOSEN=i32, O=p, LSE=f32, qk_scale="fp32"),
            "dq": dict(Q=p, K=kv, V=kv, CHOSEN=i32, DQ=p, **grads),
            "dkdv": dict(Q=p, K=p, V=p, CHOSEN=i32, TILE_CHOSE="*u8", DK=p, DV=p, **grads)}[kernel]


KERNELS = {("gather", "forward"): "_moba_fwd_gathered", ("gather", "dq"): "_moba_dq_gathered",
           ("gather", "dkdv"): "_moba_dkdv_gathered", ("tile", "forward"): "_moba_fwd", ("tile", "dq"): "_moba_dq",
           ("tile", "dkdv"): "_moba_dkdv"}


def report(order: str, kernel: str, dtype: torch.dtype, head_dim: int, block_size: int) -> str:
    block_m, block_n, launch = moba._tiles(order, kernel, block_size, dtype)
    name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    fn = getattr(moba, KERNELS[order, kernel])
    constants = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
                     PRECISION="ieee" if dtype == torch.float32 else "tf32")
    if order == "tile":
        constants["TOPK_PAD"] = 4
    types = arguments(kernel, order, f"*{name}", f"tensordesc<{name}[1,1,{block_n},{head_dim}]>")
    signature = {arg: "constexpr" if arg in constants else types.get(arg, "i32") for arg in fn.arg_names}
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(k),): v for k, v in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=launch)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(CUOBJDUMP), "-res-usage", cubin.name], capture_output=True, text=True).stdout
    fields = dict(item.split(":") for item in next(l for l in usage.splitlines() if "REG:" in l).split())
    return (f"| {order} | {kernel} | {name} | {head_dim} | {block_m} x {block_n}, {launch['num_warps']} warps, "
            f"{launch['num_stages']} stages | {fields['REG']} | {fields['STACK']} | {compiled.metadata.shared} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--block-size", type=int, default=128)
    args = parser.parse_args()
    print(f"block_size {args.block_size}, sm_90, triton {triton.__version__}\n")
    print("| order | kernel | dtype | D | tile | registers | stack bytes | shared bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float32):
        for head_dim in args.head_dims:
            for order, kernel in KERNELS:
                print(report(order, kernel, dtype, head_dim, args.block_size), flush=True)


if __name__ == "__main__":
    main()
