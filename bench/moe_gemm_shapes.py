"""The six expert GEMMs of one MoE layer step, each against the same FLOPs as one plain matrix product.

Answers where a fine-grained layer's GEMM time goes: for each GEMM of the forward+backward (up [w1 | w3],
down, and their input and weight gradients) on routed-like segment sizes, torch._grouped_mm with the shape's
experts, torch._grouped_mm with 8 equal segments (fewer, larger groups), one torch.mm of the whole (R, K) x
(K, N) product (cuBLAS: the ceiling for that shape with no grouping at all), and ours: the Triton TMA grouped
GEMM (kernels/grouped_gemm.py) for the M-grouped ones, and on Triton 3.6 the warp-specialised Gluon kernels
(kernels/grouped_gemm_gluon.py) for all six. Writes JSONL + a markdown table.
    python bench/moe_gemm_shapes.py [--shapes all|a|b] [--out-dir bench/results]
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import triton

from results_io import run_meta, write_results  # bench/, beside this script

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dist_moe.kernels import grouped_gemm  # noqa: E402
from dist_moe.kernels.grouped_gemm import expert_tiles, grouped_mm  # noqa: E402

SHAPES = {"a": dict(T=16384, d=2048, f=5632, E=8, k=2), "b": dict(T=16384, d=2048, f=1408, E=64, k=8)}


def gemms(s: dict) -> list[tuple[str, int, int, bool, bool]]:
    """(name, K, N, weight gradient?, weight transposed?) of the layer's six grouped GEMMs."""
    d, f = s["d"], s["f"]
    return [("up x [w1|w3]", d, 2 * f, False, False), ("down h w2", f, d, False, False),
            ("grad h = g w2^T", d, f, False, True), ("grad x = g13 [w1|w3]^T", 2 * f, d, False, True),
            ("grad w2 = h^T g", f, d, True, False), ("grad [w1|w3] = x^T g13", d, 2 * f, True, False)]


def bench_shape(name: str, s: dict) -> list[dict]:
    torch.manual_seed(0)
    R, E = s["T"] * s["k"], s["E"]
    counts = torch.bincount(torch.randint(0, E, (R,), device="cuda"), minlength=E)
    offsets, tiles = torch.cumsum(counts, 0, dtype=torch.int32), expert_tiles(counts)
    equal = torch.arange(1, 9, device="cuda", dtype=torch.int32) * (R // 8)
    rows = []
    for gemm, K, N, weight_grad, transposed in gemms(s):
        bf16 = dict(device="cuda", dtype=torch.bfloat16)
        if weight_grad:  # (K, R) x (R, N) summed per segment
            a, b = torch.randn(R, K, **bf16), torch.randn(R, N, **bf16)
            impls = {f"torch._grouped_mm, {E} segments": lambda: torch._grouped_mm(a.t(), b, offs=offsets),
                     "torch._grouped_mm, 8 equal segments": lambda: torch._grouped_mm(a.t(), b, offs=equal),
                     "torch.mm, one matrix": lambda: a.t() @ b}
            if grouped_gemm.GLUON:
                impls[f"gluon weight-gradient GEMM (ours), {E} segments"] = (
                    lambda: grouped_gemm.grouped_mm_weight_grad_gluon(a, b, offsets))
        else:
            a = torch.randn(R, K, **bf16)
            w = torch.randn(E, N, K, **bf16).transpose(1, 2) if transposed else torch.randn(E, K, N, **bf16)
            impls = {f"torch._grouped_mm, {E} segments": lambda: torch._grouped_mm(a, w, offs=offsets),
                     "torch._grouped_mm, 8 equal segments": lambda: torch._grouped_mm(a, w[:8], offs=equal),
                     "torch.mm, one matrix": lambda: a @ w[0],
                     f"triton TMA grouped GEMM (ours), {E} segments": lambda: grouped_mm(a, w, tiles)}
            if grouped_gemm.GLUON:
                impls[f"gluon warp-specialised grouped GEMM (ours), {E} segments"] = (
                    lambda: grouped_gemm.grouped_mm_gluon(a, w, tiles))
        for impl, fn in impls.items():
            ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
            row = dict(shape=name, gemm=gemm, impl=impl, R=R, K=K, N=N, E=E, ms=ms, tflops=2 * R * K * N / ms * 1e-9)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=["all", *SHAPES], default="all")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    rows = [r for n, s in SHAPES.items() if args.shapes in ("all", n) for r in bench_shape(n, s)]
    meta = run_meta()
    lines = [f"# Expert GEMMs of one MoE layer step, {meta['date']}", "",
             f"GPU: {meta['gpu']}; torch {meta['torch']}, triton {meta['triton']}; bf16, median of do_bench; "
             "R = k*T rows on random routing; TFLOP/s = 2*R*K*N / time.", "",
             f"Command: `{meta['command']}`", "",
             "| shape | GEMM | R x K x N | implementation | ms | TFLOP/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['gemm']} | {r['R']} x {r['K']} x {r['N']} | {r['impl']} | {r['ms']:.3f} | "
              f"{r['tflops']:.0f} |" for r in rows]
    write_results(args.out_dir, "moe_gemm_shapes", meta, rows, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
