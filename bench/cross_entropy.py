"""LM-head cross-entropy forward+backward: our two-read Triton kernel beside PyTorch's float32 path, eager and
compiled.

Bytes per BENCHMARKS.md's method: the kernel's floor is 6 bytes a logit in bf16 (the forward reads the logits,
the backward reads them again and writes their gradient); PyTorch's `F.cross_entropy(logits.float(), targets)`
moves about 40 (a float32 copy, a float32 log-softmax, a float32 gradient and its cast back). Times are medians
of triton.testing.do_bench of loss + backward on random bf16 logits of scale 4; each implementation's loss and
gradient are checked against the float32 eager path before it is timed. Peak memory is what one
forward+backward allocates beyond the logits themselves. Writes JSONL + a markdown table.

    python bench/cross_entropy.py [--out-dir bench/results]
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from results_io import run_meta, write_results  # bench/, beside this script

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dist_moe.kernels.cross_entropy import cross_entropy  # noqa: E402  (installed or not: the path above)

# (N tokens, V vocabulary): the medium preset's micro batch (16 x 2048) at its 32k vocabulary, half of it,
# and Llama 3's 128k vocabulary.
SHAPES = [(32768, 32000), (16384, 32000), (8192, 128256)]


def torch_float32(logits, targets):
    return F.cross_entropy(logits.float(), targets)


IMPLEMENTATIONS = {
    "dist_moe cross_entropy (ours)": cross_entropy,
    "PyTorch float32 path (eager)": torch_float32,
    "PyTorch float32 path (torch.compile)": torch.compile(torch_float32, dynamic=False),
}


def bench_shape(N, V):
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (4 * torch.randn(N, V, device="cuda", generator=g)).bfloat16().requires_grad_()
    targets = torch.randint(0, V, (N,), device="cuda", generator=g)
    reference_loss = torch_float32(logits, targets)
    reference_loss.backward()
    reference_grad = logits.grad.float()
    rows = []
    for name, fn in IMPLEMENTATIONS.items():
        row = dict(impl=name, N=N, V=V, dtype="bfloat16")
        logits.grad = None  # do_bench leaves the last timed gradient behind
        try:
            loss = fn(logits, targets)
            loss.backward()
            row["loss_abs_err"] = abs(loss.item() - reference_loss.item())
            row["grad_rel_err"] = ((logits.grad.float() - reference_grad).norm() / reference_grad.norm()).item()
            logits.grad = None
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn(logits, targets).backward()
            torch.cuda.synchronize()
            row["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
            logits.grad = None
            ms = triton.testing.do_bench(lambda: fn(logits, targets).backward(), warmup=50, rep=300,
                                         grad_to_none=[logits], return_mode="median")
            row.update(ms=ms, floor_tb_s=6 * N * V / ms * 1e-9)
        except Exception as e:  # an implementation that fails is reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(rows, meta) -> str:
    lines = [f"# LM-head cross-entropy benchmark, {meta['date']}", "",
             f"GPU: {meta['gpu']}; torch {meta['torch']}, triton {meta['triton']}; bf16 logits, forward+backward, "
             "median of do_bench. 'At 6 B/logit' = the kernel's floor bytes over the time (HBM rate if it were "
             "the kernel).", "", f"Command: `{meta['command']}`", "",
             "| N x V | impl | ms | at 6 B/logit TB/s | vs eager | extra peak GiB | loss abs err | grad rel err |",
             "|---|---|---|---|---|---|---|---|"]
    eager = {(r["N"], r["V"]): r for r in rows if "eager" in r["impl"] and "ms" in r}
    for r in rows:
        shape = f"{r['N']} x {r['V']}"
        if "error" in r:
            lines.append(f"| {shape} | {r['impl']} | error: {r['error'][:80]} | | | | | |")
            continue
        e = eager.get((r["N"], r["V"]))
        speedup = f"{e['ms'] / r['ms']:.2f}x" if e else "-"
        lines.append(f"| {shape} | {r['impl']} | {r['ms']:.2f} | {r['floor_tb_s']:.2f} | {speedup} | "
                     f"{r['peak_extra_gib']:.2f} | {r['loss_abs_err']:.1e} | {r['grad_rel_err']:.1e} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/cross_entropy.py: needs a CUDA GPU")
    meta = run_meta()
    rows = [row for shape in SHAPES for row in bench_shape(*shape)]
    write_results(args.out_dir, "cross_entropy", meta, rows, markdown(rows, meta))


if __name__ == "__main__":
    main()
