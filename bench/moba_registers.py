"""Registers, spills and shared memory of kernels/moba.py's kernels (gate and attention) compiled for sm_90, on
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


def arguments(kernel: str, p: str, kv: str) -> dict:
    """Pointer and descriptor types of a kernel's tensor arguments (the rest are i32, scales fp32)."""
    f32, i32 = "*fp32", "*i32"
    grads = dict(DO=p, LSE=f32, DELTA=f32, qk_scale="fp32", sm_scale="fp32")
    return {"forward": dict(Q=p, K=kv, V=kv, ROWS=i32, STARTS=i32, ACC=f32, M=f32, L=f32, O=p, LSE=f32,
                            qk_scale="fp32"),
            "dq": dict(Q=p, K=kv, V=kv, ROWS=i32, STARTS=i32, DQ_ACC=f32, DQ=p, **grads),
            "dkdv": dict(Q=p, K=p, V=p, ROWS=i32, STARTS=i32, DK=p, DV=p, **grads)}[kernel]


KERNELS = {"forward": "_moba_fwd_gathered", "dq": "_moba_dq_gathered", "dkdv": "_moba_dkdv_gathered"}


def usage(fn, constants: dict, types: dict, launch: dict) -> tuple[dict, int]:
    """cuobjdump's resource fields (REG, STACK, ...) and the shared memory of fn compiled for sm_90."""
    signature = {arg: "constexpr" if arg in constants else types.get(arg, "i32") for arg in fn.arg_names}
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(k),): v for k, v in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=launch)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        out = subprocess.run([str(CUOBJDUMP), "-res-usage", cubin.name], capture_output=True, text=True).stdout
    return dict(item.split(":") for item in next(l for l in out.splitlines() if "REG:" in l).split()), \
        compiled.metadata.shared


def report_gate(top_k: int, head_dim: int, block_size: int) -> str:
    block_m, num_warps = moba._gate_tile(block_size)
    constants = dict(HEAD_DIM=head_dim, TOPK=top_k, TOPK_PAD=triton.next_power_of_2(top_k), BLOCK_M=block_m,
                     BLOCK_B=64)
    fields, shared = usage(moba._gate, constants, dict(Q="*bf16", MEANS="*fp32", CHOSEN="*i32"),
                           dict(num_warps=num_warps, num_stages=2))
    return (f"| gate, top_k {top_k} | bf16 | {head_dim} | {block_m} x 64, {num_warps} warps, 2 stages | "
            f"{fields['REG']} | {fields['STACK']} | {shared} |")


def report(kernel: str, dtype: torch.dtype, head_dim: int, block_size: int) -> str:
    block_m, block_n, launch = moba._tiles(kernel, block_size, dtype)
    name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    fn = getattr(moba, KERNELS[kernel])
    constants = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
                     PRECISION="ieee" if dtype == torch.float32 else "tf32")
    types = arguments(kernel, f"*{name}", f"tensordesc<{name}[1,1,{block_n},{head_dim}]>")
    fields, shared = usage(fn, constants, types, launch)
    return (f"| {kernel} | {name} | {head_dim} | {block_m} x {block_n}, {launch['num_warps']} warps, "
            f"{launch['num_stages']} stages | {fields['REG']} | {fields['STACK']} | {shared} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--block-size", type=int, default=128)
    args = parser.parse_args()
    print(f"block_size {args.block_size}, sm_90, triton {triton.__version__}\n")
    print("| kernel | dtype | D | tile | registers | stack bytes | shared bytes |")
    print("|---|---|---|---|---|---|---|")
    for top_k in (4, 64, 256):  # top_k at N = 8K, 128K, 512K with blocks of 128
        print(report_gate(top_k, 128, args.block_size), flush=True)
    for dtype in (torch.bfloat16, torch.float32):
        for head_dim in args.head_dims:
            for kernel in KERNELS:
                print(report(kernel, dtype, head_dim, args.block_size), flush=True)


if __name__ == "__main__":
    main()
