"""MoBA forward+backward time: our Triton kernels (kernels/moba.py) beside FlexAttention with the same block
mask, a PyTorch MoBA in the original's style (gather the chosen blocks, then SDPA) and our dense causal flash
kernel, in one process on the same bf16 inputs. B*N = 128K tokens, Hq = 32, Hkv = 8, D = 128.

    python bench/moba.py [--shapes all|quick|long|512k|N:block,...] [--impls SUBSTRING,...]
                         [--out-dir bench/results]

FLOP model (counted before measuring; forward 4*D FLOPs per (query, key) pair per head, backward 2.5x):
- dense causal: 4*B*Hq*D * N^2/2. At N = 128K (B=1): 4*32*128 * 8.6e9 = 1.41e14 forward.
- MoBA, top_k = N / (16 * block) past blocks per query plus its own half (causally): keys per query
  ~ top_k*block + block/2 = N/16 + block/2, so 4*B*Hq*D * N * (N/16 + block/2); at N = 128K, block 128:
  4*32*128 * 131072 * 8256 = 1.77e13, i.e. 8.0x fewer than dense (1/16 of the keys vs 1/2, plus the own
  block). The gate adds 2*B*Hq*D * N * (N/block)/2 FLOPs: at block 128, 2*32*128 * 131072 * 512 = 5.5e11
  (3% of MoBA's forward), plus the running top-k's O(N * N/block * top_k) compares.
- bytes, "tile" order (kernels/moba.py): per query tile (64 rows) the forward streams K and V of every block
  any of its rows chose: 2 * union * block * D * 2 bytes. With independent random choices (these random
  inputs) a tile of 64 queries covers 1 - (15/16)^64 = 98% of the past blocks, so this order does
  near-dense work: predicted ~1x dense flash, not 8x. The table reports the measured union ("tile
  coverage": visited (tile, block) pairs / past pairs).
- bytes, "gather" order (collect and densify, the candidate default; timed as "ours"): per (query, chosen block)
  pair, ~3.3 KB forward (the gathered q row, its fp32 softmax state read and written, its share of the block's
  K/V in half-full tiles; 2.3 KB in full ones), ~3.6 KB for dQ, ~1 KB for dK/dV (kernels/moba.py's docstring has
  the count): 20-28 FLOP/byte forward, so it is bandwidth-bound unless L2 holds a range's scratch. At N = 128K,
  block 128 (268M pairs): 620-890 GB forward from HBM in the worst case, 130-185 ms at 4.8 TB/s; 44 ms if
  compute-bound at 400 TFLOP/s; dense flash's forward is ~350 ms there. Its column index (a stable sort of the
  268M pairs) is in the timed step and also timed alone ("index ms"), with its size ("index GiB"). Variants of
  ours: "gathered ranges of 1024 rows" (FlashMoBA's range at this sparsity: fuller tiles, twice the scratch per
  program), "forward tiles 32x64 w4" (two forward programs per SM), "tile order" (the per-tile kernels,
  kernels/moba.py's default until the gathered order wins here).
Every implementation gets the same block choice (our gate's); the timed step is attention forward+backward,
so neither our gate nor FlexAttention's block-mask build is in it: the gate's own time is a column.
Targets (issue 27): fwd+bwd >= 1.5x FlexAttention at N >= 32K; >= 8x dense flash at N = 128K, block 128;
one layer at N = 512K (B = 1) fits on one H200. Needs CUDA; on CPU it stops with a message.
"""
import argparse
import json
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
SHAPES = {  # (N, block_size): top_k = N / (16 * block_size), at least 1
    "all": [(n, bs) for n in (8192, 32768, 131072) for bs in (128, 512)],
    "quick": [(8192, 128)],
    "long": [(n, bs) for n in (32768, 131072) for bs in (128, 512)],  # the shapes the speed targets name
    "512k": [(524288, 128)],  # the memory target: ours alone (dense flash alone would take minutes there)
}


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
    hits = moba_kernels._tile_chose(chosen, flex_block, num_blocks).bool()  # (B, Hq, tiles, NB)
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


def ours(chosen: torch.Tensor, block_size: int, top_k: int, order: str = "gather", **settings):
    """Our kernels in one order, with kernels/moba.py's settings (GATHER_RANGE_ROWS, TILES) replaced during
    the forward call; the autograd Function keeps the forward's range size for the backward, whose tiles
    are the module's own."""
    def run(q, k, v):
        default = {name: getattr(moba_kernels, name) for name in settings}
        for name, value in settings.items():
            setattr(moba_kernels, name, value)
        try:
            return moba_kernels.moba_attention(q, k, v, block_size, top_k, chosen=chosen, order=order)
        finally:
            for name, value in default.items():
                setattr(moba_kernels, name, value)
    return run


def implementations(chosen: torch.Tensor, block_size: int, top_k: int, N: int, peers: bool = True):
    """name -> attention(q, k, v); ours runs first and is the reference the others are compared with. Without
    peers, ours alone (past 128K FlexAttention's mask table alone is tens of GB, dense flash takes minutes).
    Two variants of ours try the guesses most likely to be wrong: FlashMoBA's 1024-row ranges, and a
    forward of 32 x 64 tiles on 4 warps (two programs per SM, to hide the gathers' latency)."""
    first = {"dist_moe moba, gathered order (ours)": ours(chosen, block_size, top_k)}
    if not peers:
        return first
    small_forward = {**moba_kernels.TILES, "gather": {**moba_kernels.TILES["gather"], "forward": (32, 64, 4, 2)}}
    return {
        **first,
        "dist_moe moba, gathered ranges of 1024 rows": ours(chosen, block_size, top_k, GATHER_RANGE_ROWS=1024),
        "dist_moe moba, forward tiles 32x64 w4": ours(chosen, block_size, top_k, TILES=small_forward),
        "dist_moe moba, tile order (the default)": ours(chosen, block_size, top_k, order="tile"),
        "FlexAttention, MoBA mask": flex_moba(chosen, block_size, N),
        "PyTorch MoBA (gather + SDPA)": pytorch_moba(chosen, block_size),
        "dist_moe flash_attention, dense causal": lambda q, k, v: flash_attention(q, k, v, causal=True),
    }


def tile_coverage(chosen: torch.Tensor, block_size: int) -> float:
    """Visited (query tile, past block) pairs / all past pairs: the union the per-tile forward walks."""
    tile = 64 if block_size % 64 == 0 else 16
    hits = moba_kernels._tile_chose(chosen, tile, triton.cdiv(chosen.shape[2], block_size)).float()
    own = torch.arange(hits.shape[2], device=hits.device) * tile // block_size
    past = (torch.arange(hits.shape[3], device=hits.device)[None, :] < own[:, None]).float()
    return (hits.sum() / (past.sum() * hits.shape[0] * hits.shape[1])).item()


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


def bench_shape(N: int, block_size: int, impls: list[str], dtype=torch.bfloat16, device="cuda"):
    B, top_k = max(1, TOKENS // N), max(1, N // (16 * block_size))
    torch.manual_seed(0)
    q = torch.randn(B, HQ, N, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, HKV, N, D, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, HKV, N, D, device=device, dtype=dtype, requires_grad=True)
    do = torch.randn(B, HQ, N, D, device=device, dtype=dtype)
    with torch.no_grad():
        chosen = moba_kernels.select_blocks(q, k, block_size, top_k)[..., :top_k].contiguous()
    gate_ms, gate_topk_ms = (time_step(lambda: moba_kernels.select_blocks(q, k, block_size, top_k, method=method))[0]
                             for method in ("kernel", "topk"))
    index = lambda: moba_kernels.column_index(chosen, N // block_size, moba_kernels._range_rows(block_size))
    index_ms = time_step(index)[0]
    index_gib = sum(x.numel() * x.element_size() for x in index()) / 2**30
    moba_flops = 4 * B * HQ * D * N * (top_k * block_size + block_size / 2)
    common = dict(B=B, Hq=HQ, Hkv=HKV, N=N, D=D, block_size=block_size, top_k=top_k, dtype=str(dtype)[6:],
                  gate_ms=gate_ms, gate_topk_ms=gate_topk_ms, index_ms=index_ms, index_gib=index_gib,
                  tile_coverage=tile_coverage(chosen, block_size))
    rows, ours = [], None
    peers = N <= max(n for n, _ in SHAPES["all"])
    for name, fn in implementations(chosen, block_size, top_k, N, peers).items():
        if impls and not any(part in name for part in impls):
            continue
        row = dict(impl=name, **common)
        try:
            out = fn(q, k, v)
            ours = out.detach().float() if ours is None else ours
            row["rel_err_vs_ours"] = ((out.float() - ours).norm() / ours.norm()).item()

            def step():
                fn(q, k, v).backward(do)

            row["fwd_bwd_ms"], row["timing"] = time_step(step, (q, k, v))
            row["moba_tflops"] = 3.5 * moba_flops / row["fwd_bwd_ms"] * 1e-9  # fwd + 2.5x bwd, MoBA's FLOPs
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        except Exception as e:  # an implementation that runs out of memory or refuses is reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(rows, meta) -> str:
    lines = [f"# MoBA benchmark, {meta['date']}", "",
             f"GPU: {meta['gpu']}; torch {meta['torch']}, triton {meta['triton']}; bf16, Hq={HQ}, Hkv={HKV}, D={D}, "
             f"B*N={TOKENS}; forward+backward, median of do_bench (a step over 1 s: one timed run, marked *). "
             "Speedup = that impl's time / ours.", "",
             f"Command: `{meta['command']}`", "",
             "| N | block | top_k | gate ms (kernel / topk) | index ms | index GiB | tile coverage | impl | fwd+bwd ms "
             "| MoBA TFLOP/s | ours faster by |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    ours = {(r["N"], r["block_size"]): r for r in rows if r["impl"].endswith("(ours)") and "fwd_bwd_ms" in r}
    for r in rows:
        head = (f"| {r['N']} | {r['block_size']} | {r['top_k']} | {r['gate_ms']:.2f} / {r['gate_topk_ms']:.2f} | "
                f"{r['index_ms']:.2f} | {r['index_gib']:.2f} | {r['tile_coverage']:.2f} | {r['impl']} |")
        if "error" in r:
            lines.append(f"{head} error: {r['error'][:80]} | | |")
            continue
        o = ours.get((r["N"], r["block_size"]))
        ms = f"{r['fwd_bwd_ms']:.2f}" + ("*" if r["timing"] == "one run" else "")
        lines.append(f"{head} {ms} | {r['moba_tflops']:.0f} | "
                     f"{r['fwd_bwd_ms'] / o['fwd_bwd_ms']:.2f}x |" if o else f"{head} {ms} | | |")
    return "\n".join(lines) + "\n"


def shapes(spec: str) -> list[tuple[int, int]]:
    """--shapes: a named set or N:block pairs."""
    if spec in SHAPES:
        return SHAPES[spec]
    try:
        pairs = [tuple(int(x) for x in pair.split(":")) for pair in spec.split(",")]
    except ValueError:
        pairs = []
    if not pairs or any(len(pair) != 2 for pair in pairs):
        sys.exit(f"bench/moba.py: --shapes {spec!r}: expected one of {sorted(SHAPES)} or N:block pairs like 8192:128")
    return pairs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="all", help=f"one of {sorted(SHAPES)}, or N:block pairs, comma-separated "
                        "(e.g. 8192:128,131072:128)")
    parser.add_argument("--impls", default="", help="comma-separated substrings of the implementations to run "
                        "(ours always runs first: the others are compared with it); default all")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    todo = shapes(args.shapes)
    if not torch.cuda.is_available():
        sys.exit("bench/moba.py: needs CUDA (a GPU); nothing was measured")
    meta = run_meta()
    impls = ["(ours)", *args.impls.split(",")] if args.impls else []
    rows = []
    for shape in todo:  # results written after each shape: a run cut short keeps what it measured
        rows += bench_shape(*shape, impls)
        write_results(args.out_dir, "moba", meta, rows, markdown(rows, meta))


if __name__ == "__main__":
    main()
