"""Expert parallelism per EP size: the exchange against all_to_all_single, weak scaling, and how much of the
exchange hides behind expert compute, for each exchange setting (moe.exchange, moe.a2a, moe.a2a_chunks).

One process per GPU (NCCL), or `--cpu --procs P` gloo processes on the CPU (tiny shapes: the CPU run shows
the schedule, not speed). For every EP size 2, 4, 8, ... up to the world size:
(1) exchange: the layer's round trip (rows to their experts and back, identity experts) on a real routing plan,
    against two all_to_all_single of even splits carrying the same kept-row bytes; bus bandwidth = bytes per
    rank / time * (P-1)/P (nccl-tests' convention; padding slots do not count as bytes). The bounded exchange
    carries the same plan and includes its overflow check (check_overflows: one all-reduce and host read, which
    a model pays once per forward, not per layer).
(2) weak scaling: every rank holds T tokens; EP=1 runs E_local experts alone, EP=P spreads E_local*P experts
    over P ranks, so tokens and expert FLOPs per rank are equal. Forward+backward step time, median over
    steps, the slowest rank's; dropless settings (ragged with its host sync per layer, bounded without) against
    a dropless EP=1.
(3) hidden fraction, from a torch.profiler timeline of fwd+bwd steps: exchange intervals (NCCL kernels on GPU;
    gloo:all_to_all on gloo's thread on CPU) against compute intervals (the other kernels on GPU; the
    `moe.experts` ranges on CPU); hidden = length of their overlap / length of the exchange (interval unions).
--ranks-per-node simulates nodes (LOCAL_RANK / LOCAL_WORLD_SIZE) for moe.a2a=hierarchical.
    python bench/expert_parallel.py [--gpus N] [--out-dir bench/results]
    python bench/expert_parallel.py --cpu --procs 4
"""
import argparse
import os
import shlex
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.profiler import ProfilerActivity, profile

from results_io import run_meta, write_results  # bench/, beside this script

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dist_moe.config import Config  # noqa: E402
from dist_moe.model.moe.dispatch import expert_capacity, route  # noqa: E402
from dist_moe.model.moe.layer import MoELayer  # noqa: E402
from dist_moe.parallel.exchange import check_overflows  # noqa: E402
from dist_moe.train.bounded_exchange import forward_without_overflow  # noqa: E402
from dist_moe.parallel.groups import expert_parallel_group  # noqa: E402

GPU_SHAPE = dict(T=16384, D=2048, F=5632, E_LOCAL=8, K=2)
CPU_SHAPE = dict(T=1024, D=128, F=512, E_LOCAL=4, K=2)
CAPACITY_FACTOR = 1.25


def settings(chunks: int) -> list[dict]:
    """The exchanges compared: (moe.exchange, moe.a2a, moe.a2a_chunks, moe.dropless)."""
    return [dict(exchange=e, a2a=a, a2a_chunks=c, dropless=d) for e, a, c, d in
            (("ragged", "flat", 1, False), ("ragged", "flat", chunks, False), ("padded", "flat", 1, False),
             ("padded", "flat", chunks, False), ("padded", "hierarchical", chunks, False),
             ("ragged", "hierarchical", chunks, False), ("ragged", "flat", 1, True), ("bounded", "flat", 1, True),
             ("bounded", "flat", chunks, True), ("bounded", "hierarchical", chunks, True))]


def sync() -> None:
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        torch.cuda.synchronize()


def timed(fn, steps: int, warmup: int) -> float:
    """Median ms of fn over steps, the slowest rank's (a collective max)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        dist.barrier()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    median = torch.tensor(statistics.median(times), device=DEVICE)
    dist.all_reduce(median, op=dist.ReduceOp.MAX)
    return median.item()


def layer(shape: dict, num_experts: int, ep_size: int, group, dropless: bool = False, **moe) -> MoELayer:
    cfg = Config()
    cfg.model.d_model, cfg.model.d_ff, cfg.model.init_std = shape["D"], shape["F"], 0.02
    cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.ep_size, cfg.moe.dropless = num_experts, shape["K"], ep_size, dropless
    cfg.moe.capacity_factor = CAPACITY_FACTOR
    for key, value in moe.items():
        setattr(cfg.moe, key, value)
    torch.manual_seed(0)  # every rank draws the same global experts and keeps its own
    return MoELayer(cfg, group).to(DEVICE, DTYPE)


def bench_exchange(shape: dict, ep: int, group, rank: int, chunks: int, steps: int) -> list[dict]:
    """The layer's exchange (identity experts) on a real routing plan, against even-split all_to_all_single."""
    torch.manual_seed(1 + rank)
    moe = layer(shape, shape["E_LOCAL"] * ep, ep, group)
    x = torch.randn(shape["T"], shape["D"], device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        weights, indices, *_ = moe.router(x)
    capacity = expert_capacity(shape["T"], moe.num_experts, shape["K"], CAPACITY_FACTOR, 4)
    plan = route(indices, weights, moe.num_experts, capacity)
    rows = plan.permute(x)
    num_kept = plan.tokens_per_expert.sum()
    dist.all_reduce(num_kept, op=dist.ReduceOp.MAX, group=group)
    even = rows[: int(num_kept) // ep * ep].contiguous()
    even_out = torch.empty_like(even)
    nbytes = 2 * even.numel() * even.element_size()  # there and back

    def nccl_pair():
        dist.all_to_all_single(even_out, even, group=group)
        dist.all_to_all_single(even, even_out, group=group)

    out = [dict(impl=f"{dist.get_backend()} all_to_all_single x2, even splits", ms=timed(nccl_pair, steps, 2))]
    for setting in settings(chunks):
        exchange = layer(shape, shape["E_LOCAL"] * ep, ep, group, **setting).exchange

        def round_trip():
            exchange(rows, plan.tokens_per_expert, capacity, lambda r, counts: r, ())
            if exchange.rows_per_peer is not None:  # the bounded exchange's check (the warmup fits its limits)
                check_overflows([exchange.rows_per_peer])

        with torch.no_grad():
            ms = timed(round_trip, steps, 2)
        out.append(dict(impl=describe(setting), ms=ms, **setting))
    return [dict(r, bench="exchange", ep_size=ep, bytes_per_rank=nbytes,
                 bus_gbps=nbytes / r["ms"] * 1e-6 * (ep - 1) / ep) for r in out]


def training_step(moe: MoELayer, x: torch.Tensor, grad_y: torch.Tensor):
    """Forward+backward of moe on x, gradients reset after (each step allocates them, as training does)."""
    params = list(moe.parameters()) + [x]

    def step():
        forward_without_overflow(moe, lambda: moe(x))[0].backward(grad_y)
        for p in params:
            p.grad = None

    return step


def bench_weak_scaling(shape: dict, ep: int, group, chunks: int, steps: int) -> list[dict]:
    x = torch.randn(shape["T"], shape["D"], device=DEVICE, dtype=DTYPE, requires_grad=True)
    grad_y = torch.randn_like(x)
    out = []
    for setting in [dict(dropless=False), dict(dropless=True)] + settings(chunks):
        if "exchange" not in setting:
            moe = layer(shape, shape["E_LOCAL"], 1, None, **setting)
            name = "EP=1" + (" dropless" if setting["dropless"] else "")
        else:
            moe, name = layer(shape, shape["E_LOCAL"] * ep, ep, group, **setting), f"EP={ep} {describe(setting)}"
        ms = timed(training_step(moe, x, grad_y), steps, 2)
        out.append(dict(bench="weak scaling", impl=name, ep_size=ep, tokens_per_rank=shape["T"], ms=ms, **setting))
    base = {r["dropless"]: r["ms"] for r in out[:2]}
    return [dict(r, x_ep1=r["ms"] / base[r["dropless"]]) for r in out]


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in a for s2, e2 in b)


def hidden_fraction(prof) -> tuple[float, float]:
    """(exchange length in ms, fraction of it overlapped by compute) from the profiler's timeline."""
    exchange, compute = [], []
    for event in prof.events():
        span = (event.time_range.start, event.time_range.end)
        if DEVICE == "cuda":
            if event.device_type == torch.autograd.DeviceType.CUDA:
                (exchange if "nccl" in event.name.lower() else compute).append(span)
        elif event.name.startswith("gloo:all_to_all"):
            exchange.append(span)
        elif event.name.startswith("moe.experts"):
            compute.append(span)
    exchange, compute = union(exchange), union(compute)
    length = sum(end - start for start, end in exchange)
    return length / 1e3, overlap(exchange, compute) / max(length, 1e-9)


def bench_overlap(shape: dict, ep: int, group, chunks: int, steps: int, trace_dir: str) -> list[dict]:
    x = torch.randn(shape["T"], shape["D"], device=DEVICE, dtype=DTYPE, requires_grad=True)
    grad_y = torch.randn_like(x)
    out = []
    for setting in settings(chunks):
        step = training_step(layer(shape, shape["E_LOCAL"] * ep, ep, group, **setting), x, grad_y)
        step()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            sync()
        exchange_ms, hidden = hidden_fraction(prof)
        if trace_dir:  # chrome://tracing or ui.perfetto.dev: the exchange's thread/stream beside the experts'
            Path(trace_dir).mkdir(parents=True, exist_ok=True)
            name = describe(setting).replace(" ", "_").replace("=", "")
            prof.export_chrome_trace(str(Path(trace_dir) / f"ep{ep}_{name}_rank{dist.get_rank()}.json"))
        mean = torch.tensor([exchange_ms, hidden], device=DEVICE, dtype=torch.float64)
        dist.all_reduce(mean)
        mean /= dist.get_world_size()
        out.append(dict(bench="overlap", impl=describe(setting), ep_size=ep,
                        exchange_ms_per_step=mean[0].item() / steps, hidden_fraction=mean[1].item(), **setting))
    return out


def describe(setting: dict) -> str:
    return (f"{setting['exchange']} {setting['a2a']} chunks={setting['a2a_chunks']}"
            + (" dropless" if setting["dropless"] else ""))


def worker(rank: int, world: int, port: int, args, command: str) -> None:
    global DEVICE, DTYPE
    local = args.ranks_per_node or world
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank % local), LOCAL_WORLD_SIZE=str(local),
                      DS_ACCELERATOR="cpu" if args.cpu else "cuda")
    if args.cpu:
        DEVICE, DTYPE = "cpu", torch.float32
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
    else:
        DEVICE, DTYPE = "cuda", torch.bfloat16
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    shape, steps = (CPU_SHAPE, 5) if args.cpu else (GPU_SHAPE, 20)
    chunks = min(args.chunks, shape["E_LOCAL"])
    rows = []
    for ep in [p for p in (2, 4, 8, 16, 32, 64) if p <= world and world % p == 0]:
        group = expert_parallel_group(ep)
        rows += bench_exchange(shape, ep, group, rank, chunks, steps)
        rows += bench_weak_scaling(shape, ep, group, chunks, steps)
        rows += bench_overlap(shape, ep, group, chunks, 3, args.trace_dir)
    if rank == 0:
        device = f"{world}x gloo CPU processes" if args.cpu else f"{world}x {torch.cuda.get_device_name()}"
        versions = {} if args.cpu else {"nccl": ".".join(map(str, torch.cuda.nccl.version()))}
        meta = run_meta(gpu=device, command=command, **versions)
        write_results(args.out_dir, "ep", meta, rows, markdown(rows, meta, shape, local))
    dist.barrier()
    dist.destroy_process_group()


def markdown(rows, meta, shape: dict, ranks_per_node: int) -> str:
    lines = [f"# Expert-parallel benchmark, {meta['date']}", "",
             f"{meta['gpu']}, {ranks_per_node} ranks per node; torch {meta['torch']}; T={shape['T']} tokens per rank, "
             f"d={shape['D']}, f={shape['F']}, {shape['E_LOCAL']} experts per rank, k={shape['K']}, capacity factor "
             f"{CAPACITY_FACTOR}; {DTYPE}; median over steps, slowest rank.", "", f"Command: `{meta['command']}`", "",
             "| EP | exchange (there and back) | bytes per rank | ms | bus GB/s | x all_to_all_single |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r["bench"] == "exchange":
            base = next(b for b in rows if b["bench"] == "exchange" and b["ep_size"] == r["ep_size"])
            lines.append(f"| {r['ep_size']} | {r['impl']} | {r['bytes_per_rank'] / 2**20:.2f} MiB | {r['ms']:.3f} | "
                         f"{r['bus_gbps']:.2f} | {r['bus_gbps'] / base['bus_gbps']:.2f} |")
    lines += ["", "| EP | MoE layer fwd+bwd (weak scaling) | ms | x EP=1 (dropless: x EP=1 dropless) |",
              "|---|---|---|---|"]
    for r in rows:
        if r["bench"] == "weak scaling":
            lines.append(f"| {r['ep_size']} | {r['impl']} | {r['ms']:.2f} | {r['x_ep1']:.3f} |")
    lines += ["", "| EP | exchange hidden behind compute (profiler) | exchange ms per step | hidden |",
              "|---|---|---|---|"]
    for r in rows:
        if r["bench"] == "overlap":
            lines.append(f"| {r['ep_size']} | {r['impl']} | {r['exchange_ms_per_step']:.2f} | "
                         f"{r['hidden_fraction']:.0%} |")
    return "\n".join(lines) + "\n"


DEVICE, DTYPE = "cpu", torch.float32


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    parser.add_argument("--cpu", action="store_true", help="gloo processes on the CPU instead of GPUs")
    parser.add_argument("--procs", type=int, default=4, help="with --cpu: how many processes (2-4)")
    parser.add_argument("--chunks", type=int, default=4, help="moe.a2a_chunks of the chunked settings")
    parser.add_argument("--ranks-per-node", type=int, default=0, help="simulated node size (0 = all on one node; "
                                                                      "--cpu defaults to 2)")
    parser.add_argument("--trace-dir", default="", help="also write each profiled setting's chrome trace here")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    world = args.procs if args.cpu else args.gpus
    if args.cpu and not args.ranks_per_node and world % 2 == 0:
        args.ranks_per_node = 2
    if world < 2:
        sys.exit("bench/expert_parallel.py: needs 2 or more CUDA GPUs (or --cpu --procs 2..4)")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on shared hosts
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(world, port, args, "python " + shlex.join(sys.argv)), nprocs=world)


if __name__ == "__main__":
    main()
