"""MoE layer forward+backward: dist_moe beside a dense ceiling, DeepSpeed, HF Mixtral and a plain grouped_mm layer.

FLOPs per BENCHMARKS.md: forward T*k*6*d*f (routed tokens only), forward+backward 3x that; the dense SwiGLU
of width k*f does the same FLOPs with no routing (the ceiling). Times are medians of triton.testing.do_bench
of one forward+backward (random bf16 input and output gradient, parameter gradients reset every step);
peak memory is torch.cuda.max_memory_allocated over one step, parameters and inputs included. Every peer
runs in this process on the same input; dist_moe (dropless) is checked against the plain grouped_mm layer
given the same weights. A second table times the expert GEMMs alone: torch._grouped_mm (weights row- and
column-major) against the Triton grouped GEMM (kernels/grouped_gemm.py). Writes JSONL + a markdown table.
    python bench/moe_layer.py [--shapes all|a|b] [--out-dir bench/results] [--profile]
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch import nn

from results_io import run_meta, write_results  # bench/, beside this script

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dist_moe.config import Config  # noqa: E402
from dist_moe.kernels.grouped_gemm import expert_tiles, grouped_mm as triton_grouped_mm  # noqa: E402
from dist_moe.model.moe.experts import SwiGLU  # noqa: E402
from dist_moe.model.moe.layer import MoELayer  # noqa: E402

SHAPES = {"a": dict(T=16384, d=2048, f=5632, E=8, k=2), "b": dict(T=16384, d=2048, f=1408, E=64, k=8)}
INIT_STD = 0.02


class PlainGroupedMM(nn.Module):
    """The plain 20-line dropless layer: fp32 top-k router, argsort, three torch._grouped_mm, index_add."""

    def __init__(self, router: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, k: int):
        super().__init__()
        self.router, self.w1, self.w3, self.w2 = (nn.Parameter(t.detach().clone()) for t in (router, w1, w3, w2))
        self.k = k

    def forward(self, x):
        probs = torch.softmax(x.float() @ self.router.float().t(), dim=-1)
        weights, experts = torch.topk(probs, self.k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        order = experts.flatten().argsort(stable=True)
        offsets = torch.cumsum(torch.bincount(experts.flatten(), minlength=self.router.shape[0]), 0, dtype=torch.int32)
        token = order // self.k
        rows = x[token]
        hidden = F.silu(torch._grouped_mm(rows, self.w1, offs=offsets)) * torch._grouped_mm(rows, self.w3, offs=offsets)
        out = torch._grouped_mm(hidden, self.w2, offs=offsets)
        weighted = out.float() * weights.flatten()[order, None]
        return torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, token, weighted).to(x.dtype)


def dist_moe_layer(s: dict, dropless: bool) -> MoELayer:
    cfg = Config()
    cfg.model.d_model, cfg.model.d_ff, cfg.model.init_std = s["d"], s["f"], INIT_STD
    cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.dropless, cfg.moe.capacity_factor = s["E"], s["k"], dropless, 1.25
    return MoELayer(cfg, None)


def deepspeed_layer(s: dict, dropless: bool) -> nn.Module:
    import deepspeed
    from deepspeed.moe.layer import MoE

    deepspeed.init_distributed(auto_mpi_discovery=False, verbose=False)  # wraps the process group main() made
    layer = MoE(s["d"], SwiGLU(s["d"], s["f"]), s["E"], ep_size=1, k=s["k"], capacity_factor=1.25,
                eval_capacity_factor=1.25, min_capacity=4, drop_tokens=not dropless, use_rts=False)
    layer.set_deepspeed_parallelism()
    return layer


def mixtral_block(s: dict) -> nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=s["d"], intermediate_size=s["f"], num_local_experts=s["E"],
                        num_experts_per_tok=s["k"], router_jitter_noise=0.0)
    return MixtralSparseMoeBlock(cfg)


def first(out):
    return out[0] if isinstance(out, tuple) else out


def implementations(s: dict) -> dict:
    """name -> (builder, forward(module, x (T, d)) -> y (T, d), capacity note)."""
    width = s["k"] * s["f"]
    flat = lambda m, x: first(m(x))  # noqa: E731
    batched = lambda m, x: first(m(x[None])).view_as(x)  # noqa: E731
    return {
        f"dense SwiGLU width k*f={width} (ceiling)": (lambda: SwiGLU(s["d"], width), flat, "-"),
        "dist_moe MoELayer, dropless": (lambda: dist_moe_layer(s, True), flat, "dropless"),
        "torch._grouped_mm plain layer, dropless": (None, flat, "dropless"),  # built from dist_moe's weights
        "dist_moe MoELayer, cf 1.25 drop": (lambda: dist_moe_layer(s, False), flat, "1.25"),
        "HF transformers MixtralSparseMoeBlock": (lambda: mixtral_block(s), batched, "dropless"),
        "DeepSpeed MoE, cf 1.25 drop": (lambda: deepspeed_layer(s, False), batched, "1.25"),
        "DeepSpeed MoE, dropless": (lambda: deepspeed_layer(s, True), batched, "dropless"),
    }


def init_(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, INIT_STD)


def measure(module: nn.Module, forward, x: torch.Tensor, grad_y: torch.Tensor) -> dict:
    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        forward(module, x).backward(grad_y)

    step()
    torch.cuda.synchronize()
    for p in params + [x]:
        p.grad = None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    ms = triton.testing.do_bench(step, warmup=200, rep=1000, grad_to_none=params + [x], return_mode="median")
    return dict(ms=ms, peak_gib=peak / 2**30, step_gib=(peak - base) / 2**30)


def bench_layers(name: str, s: dict, profile: bool) -> list[dict]:
    torch.manual_seed(0)
    T, d = s["T"], s["d"]
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_y = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    useful = 3 * T * s["k"] * 6 * d * s["f"]
    rows, ours = [], None
    for impl, (build, forward, capacity) in implementations(s).items():
        row = dict(shape=name, impl=impl, capacity=capacity, **s)
        try:
            if build is None:  # right after dist_moe dropless: same weights, then dist_moe's copy goes
                e = ours.experts
                module = PlainGroupedMM(ours.router.weight, *e.w13.chunk(2, dim=2), e.w2, s["k"])
                with torch.no_grad():
                    reference = ours(x)[0].float()
                    y = forward(module, x).float()
                row["rel_err_vs_dist_moe"] = ((y - reference).norm() / reference.norm()).item()
                e = ours = reference = y = None
            else:
                module = build()
                if not isinstance(module, MoELayer):
                    init_(module)
            module = module.cuda().to(torch.bfloat16)
            with torch.no_grad():
                row["finite"] = bool(torch.isfinite(forward(module, x)).all())
            row.update(measure(module, forward, x, grad_y))
            row["useful_tflops"] = useful / row["ms"] * 1e-9
            if isinstance(module, MoELayer):
                stats = module.last_stats
                row["dropped_fraction"] = float(stats.dropped) / stats.routed
                if profile:
                    profile_step(module, forward, x, grad_y)
                if capacity == "dropless":
                    ours = module
                    for p in module.parameters():
                        p.grad = None
        except Exception as e:  # a peer that fails (import, OOM) is reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        module = None
        torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def profile_step(module, forward, x, grad_y, steps: int = 3) -> None:
    """Where the time goes: top CUDA kernels (ms per step), host-side synchronisations (CUDA runtime calls
    that wait, and ops that torch's sync debug mode flags), and host time per step against device time."""
    import time
    import warnings

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    params = list(module.parameters()) + [x]

    def step():  # gradients reset each step, as in measure(): no accumulation kernels
        forward(module, x).backward(grad_y)
        for p in params:
            p.grad = None

    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    host = (time.perf_counter() - start) / steps * 1e3
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(10):
        step()
    end.record()
    torch.cuda.synchronize()
    print(f"  host time to enqueue a step: {host:.2f} ms; device time per step, 10 back to back: "
          f"{begin.elapsed_time(end) / 10:.2f} ms")
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step()
    torch.cuda.set_sync_debug_mode(0)
    for w in caught:
        if "synchroniz" in str(w.message):
            print(f"  sync: {w.filename}:{w.lineno} {str(w.message)[:80]}")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    for e in events:
        if any(word in e.key for word in ("Synchronize", "Memcpy", "cudaMalloc", "cudaFree")):
            print(f"  runtime: {e.key} x{e.count // steps} per step, {e.cpu_time_total / steps / 1e3:.3f} ms")
    kernels = sorted((e for e in events if e.device_type == DeviceType.CUDA), key=lambda e: -e.device_time_total)
    print(f"  kernels: {sum(e.device_time_total for e in kernels) / steps / 1e3:.2f} ms per step, "
          f"{sum(e.count for e in kernels) // steps} launches per step")
    for e in kernels[:16]:
        print(f"  {e.device_time_total / steps / 1e3:7.3f} ms  x{e.count // steps:<3} {e.key[:110]}")
    print_idle_gaps(prof, steps)


def print_idle_gaps(prof, steps: int, top: int = 6) -> None:
    """Device idle time between consecutive GPU activities (kernels, memcpy, memset) of the profiled steps,
    and the largest gaps with the activity on each side: what the kernel sum leaves out of the step time."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.loads(Path(f.name).read_text())
    gpu = sorted((e for e in trace["traceEvents"] if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                 key=lambda e: e["ts"])
    gaps = [(b["ts"] - (a["ts"] + a["dur"]), a["name"], b["name"]) for a, b in zip(gpu, gpu[1:])]
    busy = sum(e["dur"] for e in gpu)
    idle = sum(g for g, _, _ in gaps if g > 0)
    print(f"  device busy {busy / steps / 1e3:.2f} ms, idle between activities {idle / steps / 1e3:.2f} ms per step "
          f"({len(gpu) // steps} activities per step); largest gaps:")
    for gap, before, after in sorted(gaps, reverse=True)[:top]:
        print(f"    {gap / 1e3:.3f} ms after {before[:60]} -> before {after[:60]}")


def bench_gemms(name: str, s: dict) -> list[dict]:
    """The expert GEMMs alone on routed-like segment sizes: up (k*T, d) x (E, d, f), down (k*T, f) x (E, f, d)."""
    torch.manual_seed(1)
    T, d, f, E, k = s["T"], s["d"], s["f"], s["E"], s["k"]
    experts = torch.randint(0, E, (T * k,), device="cuda")
    counts = torch.bincount(experts, minlength=E)
    offsets, tiles = torch.cumsum(counts, 0, dtype=torch.int32), expert_tiles(counts)
    rows = []
    for gemm, (K, N) in (("up d->f", (d, f)), ("down f->d", (f, d))):
        x = torch.randn(T * k, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(E, K, N, device="cuda", dtype=torch.bfloat16) / K ** 0.5
        w_col = w.transpose(1, 2).contiguous().transpose(1, 2)  # same values, column-major per expert
        reference = torch._grouped_mm(x, w, offs=offsets)
        flops = 2 * T * k * K * N
        for impl, fn in (("torch._grouped_mm, w row-major", lambda: torch._grouped_mm(x, w, offs=offsets)),
                         ("torch._grouped_mm, w column-major", lambda: torch._grouped_mm(x, w_col, offs=offsets)),
                         ("triton TMA grouped GEMM (ours)", lambda: triton_grouped_mm(x, w, tiles))):
            row = dict(shape=name, gemm=gemm, impl=impl, M=T * k, K=K, N=N, E=E)
            try:
                out = fn()
                row["rel_err"] = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
                row["ms"] = triton.testing.do_bench(fn, warmup=100, rep=500, return_mode="median")
                row["tflops"] = flops / row["ms"] * 1e-9
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def markdown(layer_rows, gemm_rows, meta) -> str:
    lines = [f"# MoE layer benchmark, {meta['date']}", "",
             f"GPU: {meta['gpu']}; torch {meta['torch']}, triton {meta['triton']}, deepspeed {meta['deepspeed']}, "
             f"transformers {meta['transformers']}; bf16, forward+backward, median of do_bench; useful FLOPs = "
             "3 * T*k*6*d*f (routed tokens only); peak = max allocated over one step (params, grads, inputs "
             "included).", "", f"Command: `{meta['command']}`", ""]
    for shape in dict.fromkeys(r["shape"] for r in layer_rows):
        rows = [r for r in layer_rows if r["shape"] == shape]
        s = SHAPES[shape]
        dense = next((r for r in rows if "ceiling" in r["impl"] and "ms" in r), None)
        ds = next((r for r in rows if r["impl"] == "DeepSpeed MoE, cf 1.25 drop" and "ms" in r), None)
        lines += [f"## ({shape}) T={s['T']} d={s['d']} f={s['f']} E={s['E']} k={s['k']}", "",
                  "| implementation | ms | useful TFLOP/s | x dense | x DeepSpeed cf1.25 | peak GiB | dropped |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['impl']} | error: {r['error'][:90]} | | | | | |")
                continue
            vs = lambda ref, r=r: f"{ref['ms'] / r['ms']:.2f}" if ref else "-"  # noqa: E731
            dropped = f"{r['dropped_fraction']:.3%}" if "dropped_fraction" in r else "-"
            lines.append(f"| {r['impl']} | {r['ms']:.2f} | {r['useful_tflops']:.0f} | {vs(dense)} | {vs(ds)} | "
                         f"{r['peak_gib']:.2f} | {dropped} |")
        plain = next((r for r in rows if "rel_err_vs_dist_moe" in r), None)
        if plain:
            lines += ["", f"Plain grouped_mm layer vs dist_moe (same weights, dropless): relative error "
                          f"{plain['rel_err_vs_dist_moe']:.1e}."]
        lines.append("")
    if gemm_rows:
        lines += ["## Expert GEMMs alone (forward, random routing)", "",
                  "| shape | GEMM | implementation | ms | TFLOP/s | rel err |", "|---|---|---|---|---|---|"]
        for r in gemm_rows:
            if "error" in r:
                lines.append(f"| {r['shape']} | {r['gemm']} | {r['impl']} | error: {r['error'][:80]} | | |")
            else:
                lines.append(f"| {r['shape']} | {r['gemm']} | {r['impl']} | {r['ms']:.3f} | {r['tflops']:.0f} | "
                             f"{r['rel_err']:.1e} |")
    return "\n".join(lines) + "\n"


def version(package: str) -> str:
    try:
        return __import__(package).__version__
    except ImportError:
        return "not installed"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=["all", *SHAPES], default="all")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--profile", action="store_true", help="print dist_moe's top kernels per shape")
    parser.add_argument("--no-gemms", action="store_true", help="skip the expert-GEMM table")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/moe_layer.py: needs a CUDA GPU")
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT="29511", RANK="0", WORLD_SIZE="1",
                           LOCAL_RANK="0").items():
        os.environ.setdefault(key, value)
    torch.distributed.init_process_group("nccl")  # DeepSpeed's MoE needs its (size-1) expert groups
    meta = run_meta(deepspeed=version("deepspeed"), transformers=version("transformers"))
    shapes = list(SHAPES) if args.shapes == "all" else [args.shapes]
    layer_rows = [r for name in shapes for r in bench_layers(name, SHAPES[name], args.profile)]
    gemm_rows = [] if args.no_gemms else [r for name in shapes for r in bench_gemms(name, SHAPES[name])]
    write_results(args.out_dir, "moe_layer", meta, layer_rows + gemm_rows, markdown(layer_rows, gemm_rows, meta))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
