"""Expert parallelism on N GPUs of one host: dispatch all-to-all against NCCL, and EP=N against EP=1 step time.

One process per GPU (NCCL). (1) The layer's dispatch, as MoELayer does it (exchange per-expert counts, read
the split sizes on the host, all-to-all of the kept bf16 rows with those uneven splits), timed against
NCCL all_to_all_single with even splits of the same bytes; bus bandwidth = bytes per rank / time * (N-1)/N
(nccl-tests' convention). (2) Weak scaling: every GPU holds T tokens; EP=1 runs E_local experts on each
GPU alone, EP=N spreads E_local*N experts over the N GPUs, so tokens and expert FLOPs per GPU are equal.
Forward+backward step time is the median over steps (CUDA events, after warm-up), the slowest rank's.
    python bench/expert_parallel.py [--gpus N] [--out-dir bench/results]
"""
import argparse
import os
import shlex
import socket
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from results_io import run_meta, write_results  # bench/, beside this script

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dist_moe.config import Config  # noqa: E402
from dist_moe.model.moe.dispatch import expert_capacity, route  # noqa: E402
from dist_moe.model.moe.layer import MoELayer  # noqa: E402
from dist_moe.parallel.all_to_all import all_to_all, exchange_counts  # noqa: E402
from dist_moe.parallel.groups import expert_parallel_group  # noqa: E402

T, D, F, E_LOCAL, K = 16384, 2048, 5632, 8, 2


def timed(fn, steps: int = 20, warmup: int = 5) -> float:
    """Median ms of fn over steps (CUDA events), the slowest rank's (a collective max)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    median = torch.tensor(statistics.median(times), device="cuda")
    dist.all_reduce(median, op=dist.ReduceOp.MAX)
    return median.item()


def layer(num_experts: int, ep_size: int, group, dropless: bool) -> MoELayer:
    cfg = Config()
    cfg.model.d_model, cfg.model.d_ff, cfg.model.init_std = D, F, 0.02
    cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.ep_size, cfg.moe.dropless = num_experts, K, ep_size, dropless
    torch.manual_seed(0)  # every rank draws the same global experts and keeps its own
    return MoELayer(cfg, group).cuda().to(torch.bfloat16)


def bench_dispatch(world: int, group, rank: int) -> list[dict]:
    """The layer's dispatch exchange on a real routing plan, against even-split NCCL of the same bytes."""
    torch.manual_seed(1 + rank)
    moe = layer(E_LOCAL * world, world, group, dropless=False)
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        weights, indices, *_ = moe.router(x)
    capacity = expert_capacity(T, moe.num_experts, K, 1.25, 4)
    plan = route(indices, weights, moe.num_experts, capacity)
    rows = x[plan.token_index]
    counts = plan.tokens_per_expert.view(world, -1)

    def dispatch():
        recv = exchange_counts(counts, group)
        send_splits, recv_splits = counts.sum(1).tolist(), recv.sum(1).tolist()
        return all_to_all(rows[:sum(send_splits)], recv_splits, send_splits, group)

    num_kept = torch.tensor(int(plan.tokens_per_expert.sum()), device="cuda")
    dist.all_reduce(num_kept, op=dist.ReduceOp.MAX)
    even = rows[: int(num_kept) // world * world].contiguous()
    even_out = torch.empty_like(even)
    nbytes = even.numel() * even.element_size()
    out = []
    for name, fn in (("dist_moe dispatch (counts + uneven all-to-all)", dispatch),
                     ("NCCL all_to_all_single, even splits", lambda: dist.all_to_all_single(even_out, even, group=group))):
        ms = timed(fn)
        out.append(dict(bench="dispatch", impl=name, gpus=world, bytes_per_rank=nbytes, ms=ms,
                        bus_gbps=nbytes / ms * 1e-6 * (world - 1) / world))
    return out


def training_step(moe: MoELayer, x: torch.Tensor, grad_y: torch.Tensor):
    """Forward+backward of moe on x, gradients reset after (each step allocates them, as training does)."""
    params = list(moe.parameters()) + [x]

    def step():
        moe(x)[0].backward(grad_y)
        for p in params:
            p.grad = None

    return step


def bench_weak_scaling(world: int, group) -> list[dict]:
    out = []
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_y = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    for dropless in (True, False):
        for ep_size, num_experts in ((1, E_LOCAL), (world, E_LOCAL * world)):
            ms = timed(training_step(layer(num_experts, ep_size, group if ep_size > 1 else None, dropless), x, grad_y))
            out.append(dict(bench="weak scaling", impl=f"dist_moe EP={ep_size} E={num_experts}", gpus=world,
                            ep_size=ep_size, num_experts=num_experts, dropless=dropless, tokens_per_gpu=T, ms=ms,
                            useful_tflops_per_gpu=3 * T * K * 6 * D * F / ms * 1e-9))
    return out


def worker(rank: int, world: int, port: int, out_dir: str, command: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    group = expert_parallel_group(world)
    rows = bench_dispatch(world, group, rank) + bench_weak_scaling(world, group)
    if rank == 0:
        meta = run_meta(gpu=f"{world}x {torch.cuda.get_device_name()}", command=command,
                        nccl=".".join(map(str, torch.cuda.nccl.version())))
        write_results(out_dir, "ep", meta, rows, markdown(rows, meta))
    dist.barrier()
    dist.destroy_process_group()


def markdown(rows, meta) -> str:
    lines = [f"# Expert-parallel benchmark, {meta['date']}", "",
             f"GPUs: {meta['gpu']}; torch {meta['torch']}, triton {meta['triton']}, NCCL {meta['nccl']}; "
             f"T={T} tokens per GPU, d={D}, f={F}, k={K}, bf16; median over 20 steps, slowest rank.", "",
             f"Command: `{meta['command']}`", "", "| dispatch | bytes per rank | ms | bus GB/s |", "|---|---|---|---|"]
    for r in rows:
        if r["bench"] == "dispatch":
            lines.append(f"| {r['impl']} | {r['bytes_per_rank'] / 2**20:.1f} MiB | {r['ms']:.3f} | {r['bus_gbps']:.0f} |")
    lines += ["", "| MoE layer fwd+bwd | capacity | ms | useful TFLOP/s per GPU | x EP=1 |", "|---|---|---|---|---|"]
    for r in rows:
        if r["bench"] == "weak scaling":
            base = next(b for b in rows if b["bench"] == "weak scaling" and b["ep_size"] == 1
                        and b["dropless"] == r["dropless"])
            lines.append(f"| {r['impl']} | {'dropless' if r['dropless'] else 'cf 1.25'} | {r['ms']:.2f} | "
                         f"{r['useful_tflops_per_gpu']:.0f} | {r['ms'] / base['ms']:.3f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.gpus < 2:
        sys.exit("bench/expert_parallel.py: needs 2 or more CUDA GPUs")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on shared hosts
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args.gpus, port, args.out_dir, "python " + shlex.join(sys.argv)), nprocs=args.gpus)


if __name__ == "__main__":
    main()
