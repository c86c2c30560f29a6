"""Attention forward/backward TFLOP/s: our Triton flash kernel beside SDPA cuDNN, SDPA flash and FlexAttention.

FLOPs per BENCHMARKS.md: forward 4*B*Hq*N^2*D (halved when causal), backward 2.5x forward. Times are medians
of triton.testing.do_bench on random bf16 inputs; every implementation runs in the same process on the same
inputs, and each output is checked against cuDNN's before it is timed. Writes JSONL + a markdown table.

    python bench/attention.py [--shapes all|quick] [--out-dir bench/results]
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from results_io import run_meta, write_results  # bench/, beside this script

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dist_moe.kernels.flash_attention import flash_attention  # noqa: E402  (installed or not: the path above)

# (B, Hq, Hkv, N, D): causal GQA, B*N = 16k tokens.
SHAPES = {
    "all": [(8, 32, 8, 2048, 128), (2, 32, 8, 8192, 128), (8, 16, 4, 2048, 64)],
    "quick": [(8, 32, 8, 2048, 128)],
}
_flex = torch.compile(flex_attention, dynamic=False)


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def implementations(N: int, device: str):
    """name -> attention(q, k, v) for causal GQA; each must accept (B, Hq, N, D) q and (B, Hkv, N, D) k/v."""
    block_mask = create_block_mask(_causal, None, None, N, N, device=device)

    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return run

    return {
        "dist_moe flash_attention (ours)": lambda q, k, v: flash_attention(q, k, v, causal=True),
        "SDPA cuDNN": sdpa(SDPBackend.CUDNN_ATTENTION),
        "SDPA flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "FlexAttention": lambda q, k, v: _flex(q, k, v, block_mask=block_mask, enable_gqa=True),
    }


def bench_shape(B, Hq, Hkv, N, D, dtype=torch.bfloat16, device="cuda"):
    torch.manual_seed(0)
    q = torch.randn(B, Hq, N, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, N, D, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, N, D, device=device, dtype=dtype, requires_grad=True)
    do = torch.randn(B, Hq, N, D, device=device, dtype=dtype)
    fwd_flops = 4 * B * Hq * N * N * D / 2  # causal
    rows, ours = [], None
    for name, fn in implementations(N, device).items():
        row = dict(impl=name, B=B, Hq=Hq, Hkv=Hkv, N=N, D=D, dtype=str(dtype)[6:], causal=True)
        try:
            out = fn(q, k, v)
            ours = out.detach().float() if ours is None else ours  # ours runs first
            row["rel_err_vs_ours"] = ((out.float() - ours).norm() / ours.norm()).item()
            fwd_ms = triton.testing.do_bench(lambda: fn(q, k, v), warmup=100, rep=500, return_mode="median")
            bwd_ms = triton.testing.do_bench(lambda: out.backward(do, retain_graph=True), warmup=100, rep=500,
                                             grad_to_none=[q, k, v], return_mode="median")
            row.update(fwd_ms=fwd_ms, bwd_ms=bwd_ms, fwd_tflops=fwd_flops / fwd_ms * 1e-9,
                       bwd_tflops=2.5 * fwd_flops / bwd_ms * 1e-9)
        except Exception as e:  # a backend that refuses this shape is reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(rows, meta) -> str:
    lines = [f"# Attention benchmark, {meta['date']}", "",
             f"GPU: {meta['gpu']}; torch {meta['torch']}, triton {meta['triton']}; causal, bf16, TFLOP/s "
             "forward / backward (backward = 2.5x forward FLOPs), median of do_bench.", "",
             f"Command: `{meta['command']}`", "",
             "| shape | impl | fwd TFLOP/s | bwd TFLOP/s | fwd vs cuDNN | bwd vs cuDNN |", "|---|---|---|---|---|---|"]
    cudnn = {(r["N"], r["D"], r["Hq"]): r for r in rows if r["impl"] == "SDPA cuDNN" and "fwd_tflops" in r}
    for r in rows:
        shape = f"B={r['B']} N={r['N']} D={r['D']} Hq={r['Hq']} Hkv={r['Hkv']}"
        if "error" in r:
            lines.append(f"| {shape} | {r['impl']} | error: {r['error'][:80]} | | | |")
            continue
        c = cudnn.get((r["N"], r["D"], r["Hq"]))
        ratio = (lambda key: f"{r[key] / c[key]:.2f}x" if c else "-")
        lines.append(f"| {shape} | {r['impl']} | {r['fwd_tflops']:.0f} | {r['bwd_tflops']:.0f} | "
                     f"{ratio('fwd_tflops')} | {ratio('bwd_tflops')} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="all")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/attention.py: needs a CUDA GPU")
    meta = run_meta()
    rows = [row for shape in SHAPES[args.shapes] for row in bench_shape(*shape)]
    write_results(args.out_dir, "attention", meta, rows, markdown(rows, meta))


if __name__ == "__main__":
    main()
