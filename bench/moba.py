"""MoBA forward+backward, end to end (gate + column index + attention) and by stage: our kernels beside
FlexAttention under the same block mask and our dense causal flash kernel, bf16, B*N = 128K tokens (B = 1 past
that), Hq = 32, Hkv = 8, D = 128, top_k = N / (16 * block). docs/moba.md holds the cost model and the results.

    python bench/moba.py [--shapes all|quick|long|512k|N:block[:random|correlated],...] [--impls SUBSTRING,...]
                         [--out-dir bench/results]
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
import triton

from results_io import run_meta, write_results  # bench/, beside this script

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dist_moe.kernels import moba as moba_kernels  # noqa: E402  (installed or not: the path above)
from dist_moe.kernels.flash_attention import flash_attention  # noqa: E402

TOKENS, HQ, HKV, D = 128 * 1024, 32, 8, 128
SHAPES = {  # (N, block_size, inputs): top_k = N / (16 * block_size), at least 1
    "quick": [(8192, 128, "random")],
    "all": [(n, 128, "random") for n in (8192, 32768, 131072)],
    "long": [(n, 128, "random") for n in (32768, 131072)],  # the shapes the speed targets name
    "512k": [(524288, 128, "random")],  # the memory target: ours alone
}
INPUTS = ("random", "correlated")


def tile_chose(chosen: torch.Tensor, block_m: int, num_blocks: int) -> torch.Tensor:
    """(B, Hq, N / block_m, num_blocks) bool: whether any query of a block_m-row tile chose a block."""
    B, Hq, N, K = chosen.shape
    num_tiles = triton.cdiv(N, block_m)
    hits = torch.zeros((B, Hq, num_tiles, num_blocks + 1), device=chosen.device, dtype=torch.bool)
    for h in range(Hq):  # one head at a time bounds the int64 copy scatter_ needs
        padded = torch.full((B, num_tiles * block_m, K), -1, device=chosen.device, dtype=torch.long)
        padded[:, :N] = chosen[:, h]
        hits[:, h].scatter_(-1, padded.view(B, num_tiles, block_m * K) + 1, True)  # column 0 takes the -1s
    return hits[..., 1:]


def flex_moba(chosen: torch.Tensor, block_size: int, N: int, flex_block: int = 128):
    """FlexAttention under the same MoBA mask: a (B, Hq, N, NB) table of chosen blocks read by mask_mod, and a
    block mask built from the choice at FlexAttention's 128 x 128 granularity (create_block_mask would evaluate
    mask_mod on all B*Hq*N^2 pairs at once: 256 GiB at N = 8K, B = 16)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    assert block_size % flex_block == 0, "a FlexAttention tile must lie inside one MoBA block"

    B, Hq = chosen.shape[:2]
    num_blocks = triton.cdiv(N, block_size)
    table = torch.zeros(B, Hq, N, num_blocks + 1, dtype=torch.bool, device=chosen.device)
    table.scatter_(-1, chosen.long() + 1, True)
    table = table[..., 1:]

    def mask_mod(b, h, q_idx, kv_idx):
        own = (kv_idx // block_size == q_idx // block_size) & (kv_idx <= q_idx)
        return own | table[b, h, q_idx, kv_idx // block_size]

    tiles = triton.cdiv(N, flex_block)
    hits = tile_chose(chosen, flex_block, num_blocks)  # (B, Hq, tiles, NB)
    kv_tile = torch.arange(tiles, device=chosen.device)
    moba_block_of = kv_tile * flex_block // block_size  # (tiles,) the MoBA block of each 128-row tile
    own = (moba_block_of[None, :] == moba_block_of[:, None]) & (kv_tile[None, :] <= kv_tile[:, None])
    full = own & (kv_tile[None, :] < kv_tile[:, None])  # own-block tiles below the diagonal: no mask needed
    partial = (hits[..., moba_block_of] | own) & ~full  # (B, Hq, q tiles, kv tiles)

    def listed(blocks: torch.Tensor):  # FlexAttention's (count, indices with the listed blocks first)
        order = torch.sort((~blocks).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
        return blocks.sum(-1, dtype=torch.int32), order

    mask = BlockMask.from_kv_blocks(*listed(partial), *listed(full.expand_as(partial)), BLOCK_SIZE=flex_block,
                                    mask_mod=mask_mod, seq_lengths=(N, N))
    flex = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: flex(q, k, v, block_mask=mask, enable_gqa=True)


def pytorch_moba(chosen: torch.Tensor, block_size: int, chunk_bytes: float = 2e9):
    """MoBA the original's way in PyTorch: gather each query's chosen blocks plus its own, then SDPA with one
    query per row, in chunks of queries that keep each gather under chunk_bytes. Each chunk is recomputed in
    the backward (activation checkpointing): kept for the backward, the gathers of all chunks would need
    (top_k + 1) * block * D * 4 bytes per query and head, 1.4 TB at B=16, N=8K (it ran out of memory so)."""
    def run(q, k, v):
        B, Hq, N, Dh = q.shape
        group, num_blocks = Hq // k.shape[1], triton.cdiv(N, block_size)
        pad = num_blocks * block_size - N
        blocks_of = lambda x: F.pad(x.repeat_interleave(group, 1), (0, 0, 0, pad)).view(B, Hq, num_blocks,
                                                                                         block_size, Dh)
        kb, vb = blocks_of(k), blocks_of(v)  # (B, Hq, NB, block, D)
        top_k = chosen.shape[-1]
        chunk = max(1, int(chunk_bytes // (B * Hq * (top_k + 1) * block_size * Dh * q.element_size() * 2)))
        bi = torch.arange(B, device=q.device)[:, None, None, None]
        hi = torch.arange(Hq, device=q.device)[None, :, None, None]

        def attend(q_chunk, kb, vb, start):
            pos = torch.arange(start, start + q_chunk.shape[2], device=q.device)  # (C,)
            own = (pos // block_size)[None, None, :, None].expand(B, Hq, pos.numel(), 1)
            picked = torch.cat([chosen[:, :, start:start + pos.numel()].long(), own], -1)  # (B, Hq, C, K + 1)
            key_pos = picked.clamp(min=0)[..., None] * block_size + torch.arange(block_size, device=q.device)
            visible = (picked >= 0)[..., None] & (key_pos <= pos[:, None, None]) & (key_pos < N)
            ks = kb[bi, hi, picked.clamp(min=0)].flatten(3, 4)  # (B, Hq, C, (K + 1) * block, D)
            vs = vb[bi, hi, picked.clamp(min=0)].flatten(3, 4)
            return F.scaled_dot_product_attention(q_chunk[:, :, :, None], ks, vs,
                                                  attn_mask=visible.flatten(3, 4)[..., None, :])[:, :, :, 0]

        return torch.cat([checkpoint(attend, q[:, :, start:start + chunk], kb, vb, start, use_reentrant=False)
                          for start in range(0, N, chunk)], 2)
    return run


def ours(chosen: torch.Tensor | None, block_size: int, top_k: int, **settings):
    """Our kernels with kernels/moba.py's settings (GATHER_RANGE_ROWS, TILES, GATE_METHOD) replaced during the
    forward call (the autograd Function keeps the forward's range size for the backward). chosen None: the
    gate runs inside the step (end to end); else the given choice (index + attention)."""
    def run(q, k, v):
        default = {name: getattr(moba_kernels, name) for name in settings}
        for name, value in settings.items():
            setattr(moba_kernels, name, value)
        try:
            return moba_kernels.moba_attention(q, k, v, block_size, top_k, chosen=chosen)
        finally:
            for name, value in default.items():
                setattr(moba_kernels, name, value)
    return run


def implementations(chosen: torch.Tensor, block_size: int, top_k: int, N: int, peers: bool = True):
    """name -> (a function making attention(q, k, v), whether the gate is inside it); each is made only when it
    runs (FlexAttention's mask is GBs). The first is ours end to end, the reference the others are compared
    with. Without peers (past 128K), ours alone."""
    first = {"ours, end to end": (lambda: ours(None, block_size, top_k), True)}
    if not peers:
        return first
    small_forward = {**moba_kernels.TILES, "forward": (32, 64, 4, 2)}
    return {
        **first,
        "ours, given choice (index + attention)": (lambda: ours(chosen, block_size, top_k), False),
        "ours, given choice, ranges of 1024 rows":
            (lambda: ours(chosen, block_size, top_k, GATHER_RANGE_ROWS=1024), False),
        "ours, given choice, forward tiles 32x64 w4":
            (lambda: ours(chosen, block_size, top_k, TILES=small_forward), False),
        "FlexAttention, MoBA mask (given choice)": (lambda: flex_moba(chosen, block_size, N), False),
        "PyTorch MoBA (gather + SDPA)": (lambda: pytorch_moba(chosen, block_size), False),
        "dist_moe flash_attention, dense causal": (lambda: lambda q, k, v: flash_attention(q, k, v, causal=True),
                                                   True),
    }


def choice_stats(chosen: torch.Tensor, block_size: int) -> dict:
    """How alike neighbouring queries choose: tile coverage (the union of a 64-query tile's choices over its past
    blocks) and the gathered order's tile fill (pairs / rows of the 64-row tiles it runs, ranges as the
    kernel cuts them)."""
    N, tile = chosen.shape[2], math.gcd(64, block_size)  # a tile inside one MoBA block
    num_blocks = N // block_size
    hits = tile_chose(chosen, tile, num_blocks).float()
    own = torch.arange(hits.shape[2], device=hits.device) * tile // block_size
    past = (torch.arange(num_blocks, device=hits.device)[None, :] < own[:, None]).float()
    rows, starts = moba_kernels.column_index(chosen, num_blocks, moba_kernels._range_rows(block_size))
    counts = starts[..., 1:] - starts[..., :-1]
    tiles = torch.div(counts + 63, 64, rounding_mode="floor").sum().item()
    return dict(tile_coverage=(hits.sum() / (past.sum() * hits.shape[0] * hits.shape[1])).item(),
                gathered_fill=(counts.sum().item() / max(1, 64 * tiles)))


def profile_ms(step) -> dict:
    """GPU time of one step by stage, from the profiler's kernel list."""
    from torch.profiler import ProfilerActivity, profile

    stages = (("_gate", "gate"), ("_block_means", "gate"), ("topk", "gate"), ("gemm", "gate"), ("sort", "index"),
              ("searchsorted", "index"), ("_moba_fwd", "forward"), ("_moba_dq", "dq"), ("_moba_dkdv", "dkdv"))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    out = {}
    for event in prof.key_averages():
        stage = next((s for key, s in stages if key in event.key.lower()), "other")
        out[stage] = out.get(stage, 0.0) + event.device_time_total / 1e3
    return {k: round(v, 2) for k, v in sorted(out.items())}


def time_step(step, grads: tuple[torch.Tensor, ...] = (), slow_ms: float = 1000.0) -> tuple[float, str]:
    """(ms, how): do_bench's median, or one timed run after one warm-up when a step takes longer than
    slow_ms (do_bench would run a multi-second step a dozen times)."""
    step()  # compiles (Triton, torch.compile) outside the timing
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for x in grads:
        x.grad = None
    start.record()
    step()
    end.record()
    torch.cuda.synchronize()
    if start.elapsed_time(end) > slow_ms:
        return start.elapsed_time(end), "one run"
    return triton.testing.do_bench(step, warmup=25, rep=200, grad_to_none=list(grads) or None,
                                   return_mode="median"), "median"


def make_inputs(B: int, N: int, inputs: str, block_size: int, dtype, device):
    """q, k, v, do. "correlated": as in a trained model, neighbouring queries choose alike: each key block has
    its own mean direction, and the queries of a 256-token stretch share one direction (plus noise)."""
    q = torch.randn(B, HQ, N, D, device=device, dtype=dtype)
    k = torch.randn(B, HKV, N, D, device=device, dtype=dtype)
    if inputs == "correlated":
        topic = torch.randn(B, HQ, triton.cdiv(N, 256), D, device=device, dtype=dtype)
        q = topic.repeat_interleave(256, dim=2)[:, :, :N] * 2 + q * 0.5
        k = k + torch.randn(B, HKV, triton.cdiv(N, block_size), D, device=device,
                            dtype=dtype).repeat_interleave(block_size, dim=2)[:, :, :N]
    v = torch.randn(B, HKV, N, D, device=device, dtype=dtype)
    return (*(x.requires_grad_() for x in (q, k, v)), torch.randn(B, HQ, N, D, device=device, dtype=dtype))


def bench_shape(N: int, block_size: int, inputs: str, impls: list[str], dtype=torch.bfloat16, device="cuda"):
    B, top_k = max(1, TOKENS // N), max(1, N // (16 * block_size))
    torch.manual_seed(0)
    q, k, v, do = make_inputs(B, N, inputs, block_size, dtype, device)
    with torch.no_grad():
        chosen = moba_kernels.select_blocks(q, k, block_size, top_k, method="topk")[..., :top_k].contiguous()
    gate = {}
    for method in ("kernel", "topk"):
        try:
            gate[method] = time_step(lambda: moba_kernels.select_blocks(q, k, block_size, top_k, method=method))[0]
        except Exception as e:  # reported; the attention is still timed
            print(f"gate {method}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            gate[method] = float("inf")
    index = lambda: moba_kernels.column_index(chosen, N // block_size, moba_kernels._range_rows(block_size))
    index_ms = time_step(index)[0]
    index_gib = sum(x.numel() * x.element_size() for x in index()) / 2**30
    moba_flops = 4 * B * HQ * D * N * (top_k * block_size + block_size / 2)
    common = dict(B=B, Hq=HQ, Hkv=HKV, N=N, D=D, block_size=block_size, top_k=top_k, inputs=inputs,
                  dtype=str(dtype)[6:], gate_kernel_ms=gate["kernel"], gate_topk_ms=gate["topk"],
                  index_ms=index_ms, index_gib=index_gib, **choice_stats(chosen, block_size))
    rows, first = [], None
    peers = N <= 131072
    if not peers:  # ours alone: the choice is made inside its step, so this copy would only take memory
        del chosen
        chosen = None
    for name, (make, gated) in implementations(chosen, block_size, top_k, N, peers).items():
        if impls and rows and not any(part in name for part in impls):
            continue  # the first (ours end to end) always runs: the others are compared with it
        row = dict(impl=name, **common)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            fn = make()
            out = fn(q, k, v)
            if peers:  # alone (past 128K) nothing is compared: no fp32 copy of the output (8.6 GB at 512K)
                first = out.detach().float() if first is None else first
                row["rel_err_vs_first"] = ((out.float() - first).norm() / first.norm()).item()
            del out

            def step():
                fn(q, k, v).backward(do)

            row["fwd_bwd_ms"], row["timing"] = time_step(step, (q, k, v))
            # the gate a peer needs too (ours, topk): FlexAttention's block-mask build is not counted
            row["end_to_end_ms"] = row["fwd_bwd_ms"] + (0.0 if gated else min(gate.values()))
            row["moba_tflops"] = 3.5 * moba_flops / row["fwd_bwd_ms"] * 1e-9  # fwd + 2.5x bwd, MoBA's FLOPs
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            if name.startswith("ours, end to end"):
                row["profile_ms"] = profile_ms(step)
        except Exception as e:  # an implementation that runs out of memory or refuses is reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(rows, meta) -> str:
    lines = [f"# MoBA benchmark, {meta['date']}", "",
             f"GPU: {meta['gpu']}; torch {meta['torch']}, triton {meta['triton']}; bf16, Hq={HQ}, Hkv={HKV}, D={D}, "
             f"B*N={TOKENS} (B=1 past that); forward+backward, median of do_bench (a step over 1 s: one timed run, "
             "marked *). End to end = gate + index + forward + backward (a peer given the choice: plus our "
             "faster gate). x = that impl's end to end / the first row's.", "",
             f"Command: `{meta['command']}`", "",
             "| N | block | top_k | inputs | gate ms kernel / topk | index ms | tile coverage | gathered fill "
             "| impl | rel err | fwd+bwd ms | end to end ms | x | peak GiB | MoBA TFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    first = {}
    for r in rows:
        head = (f"| {r['N']} | {r['block_size']} | {r['top_k']} | {r['inputs']} | {r['gate_kernel_ms']:.1f} / "
                f"{r['gate_topk_ms']:.1f} | {r['index_ms']:.1f} | {r['tile_coverage']:.2f} | "
                f"{r['gathered_fill']:.2f} | {r['impl']} |")
        if "error" in r:
            lines.append(f"{head} error: {r['error'][:80]} | | | | | |")
            continue
        base = first.setdefault((r["N"], r["block_size"], r["inputs"]), r["end_to_end_ms"])
        star = "*" if r["timing"] == "one run" else ""
        lines.append(f"{head} {r.get('rel_err_vs_first', float('nan')):.1e} | {r['fwd_bwd_ms']:.1f}{star} | "
                     f"{r['end_to_end_ms']:.1f} | {r['end_to_end_ms'] / base:.2f}x | {r['peak_gib']:.1f} | "
                     f"{r['moba_tflops']:.0f} |")
    lines += ["", "Ours end to end by stage (profiler, one step, ms):", ""]
    lines += [f"- N {r['N']}, {r['inputs']}, {r['impl']}: {r['profile_ms']}" for r in rows if "profile_ms" in r]
    return "\n".join(lines) + "\n"


def shapes(spec: str) -> list[tuple[int, int, str]]:
    """--shapes: a named set or N:block[:inputs] triples."""
    if spec in SHAPES:
        return SHAPES[spec]
    out = []
    for part in spec.split(","):
        fields = part.split(":")
        if len(fields) not in (2, 3) or not all(f.isdigit() for f in fields[:2]) or (
                len(fields) == 3 and fields[2] not in INPUTS):
            sys.exit(f"bench/moba.py: --shapes {spec!r}: expected one of {sorted(SHAPES)} or N:block[:inputs] "
                     f"like 8192:128,131072:128:correlated (inputs one of {INPUTS})")
        out.append((int(fields[0]), int(fields[1]), fields[2] if len(fields) == 3 else "random"))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="all", help=f"one of {sorted(SHAPES)}, or N:block[:inputs], "
                        "comma-separated (e.g. 8192:128,131072:128:correlated)")
    parser.add_argument("--impls", default="", help="comma-separated substrings of the implementations to run "
                        "(ours end to end always runs first); default all")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    todo = shapes(args.shapes)
    if not torch.cuda.is_available():
        sys.exit("bench/moba.py: needs CUDA (a GPU); nothing was measured")
    meta = run_meta()
    impls = args.impls.split(",") if args.impls else []
    rows = []
    for shape in todo:  # results written after each shape: a run cut short keeps what it measured
        rows += bench_shape(*shape, impls)
        write_results(args.out_dir, "moba", meta, rows, markdown(rows, meta))


if __name__ == "__main__":
    main()
