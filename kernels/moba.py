"""MoBA (mixture of block attention) in Triton: the gate, a block-sparse forward, and its backward.

`moba_attention(q, k, v, block_size, top_k)` must equal `dist_moe.model.moba.moba_attention_reference`:
dense softmax attention under the MoBA mask, where query i sees the top_k past complete key blocks its gate
chose (by q . mean(K_block)) and, causally, its own block. q is (B, Hq, N, D), k and v (B, Hkv, N, D);
query head h reads key/value head h // (Hq // Hkv), and gates on its own (per query head, as MoBA does).
Fp32 accumulation throughout; 16-bit operands go to the tensor cores as they are, fp32 ones in full precision.

Gate: `_block_means` averages each complete key block; `_gate` scores a tile of queries against all past
blocks, chunk by chunk, keeping a running top-k per query in registers (no (N, N / block) score matrix).

Attention, two orders (`order=`, default ORDER). "tile" is the default: it passed on an H200. "gather" has
passed under the interpreter and its sm_90 IR was read with the H200's Triton 3.6, but it has not run on a GPU
since its fix (bench/results/experiments/moba_gathered_order.md); it becomes the default if bench/moba.py
shows it right and faster there.
- "gather", FlashMoBA's collect and densify: the work scales with the (query, chosen block) pairs.
  `column_index` turns the choice around on the device (a stable sort per head: for each key block the
  queries that chose it, ascending, cut at range boundaries). `_moba_fwd_gathered`: a program owns a range
  of GATHER_RANGE_ROWS queries (whole MoBA blocks) of one head; for each past block it gathers the range's
  queries that chose it into dense tiles (row offsets loaded from the index), runs them against the block,
  and merges them into their running (m, l, acc) in an fp32 scratch (B, Hq, N, D + 2) that only this
  program touches: an exact online softmax, no partial output per pair, no races. A last step runs the
  range's own blocks causally through the same loop (one copy of the step's registers), then a pass
  normalises and saves the base-2 log-sum-exp. `_moba_dq_gathered` walks the same way with a dQ scratch
  (deterministic; fp32 atomics from the dK/dV kernel would save recomputing S and dP but add N * top_k * D
  atomic adds per head and lose determinism). `_moba_dkdv_gathered` owns a key tile: for each query head
  of its group, the own block's query tiles (causally) and then the block's whole column, gathered into
  tiles, in one loop; dK, dV summed in registers, written once.
- "tile": one program per query tile walks the union of its queries' choices with a per-query mask
  (`_moba_fwd`, `_moba_dq`); `_moba_dkdv` finds its query tiles in a (tile x block) bitmap. No index, no
  scratch, but a tile's union is nearly every past block when neighbouring queries choose independently.
  Kept because it may win where the union is small (short N, correlated choices).
Tiles per kernel are in TILES (module top). Compiled for sm_90 (triton 3.9, cuobjdump -res-usage, D = 128,
bf16) the gathered kernels fit without spills: forward 64 x 64, 8 warps, 254 registers (wgmma); dQ 32 x 128,
8 warps, 214; dK/dV 32 x 64, 4 warps, 239. K/V tiles of the forward and dQ load through tensor descriptors.

Cost of "gather" per (query, chosen block) pair, D = 128, block 128, bf16, ranges of 512 rows, where a
block gathers ~32 of a range's rows at 1/16 density (FLOPs: 4 * block * D = 65.5K forward, 14 * block * D
backward):
- forward: the gathered q row (2D bytes), its fp32 state read and written (8D + 16), its share of the
  block's K and V (4 * block * D / 32 rows = 2 KB): ~3.3 KB, 20 FLOP/byte (28 with full 64-row tiles).
  That is below an H200's compute/HBM ratio (~200): the forward leans on L2 holding a range's scratch
  (512 rows * D * 4 = 256 KB per program) and the block's K/V (read by every range of the head in turn).
- dQ (32-row tiles): q and dO (4D), scratch (8D), the K/V share (2 KB): ~3.6 KB for 6 * block * D FLOPs.
- dK/dV: q and dO per key tile of 64 (4D bytes, twice per block of 128): ~1 KB for 8 * block * D FLOPs.
- the index: rows (B * Hq, N * top_k) int32, 1 GB at N = 128K (block 128, top_k 64, B * Hq = 32), starts
  (B * Hq, N / block, N / range + 1) int32, 34 MB there; the sort runs 2^25 pairs at a time (~1 GB of
  temporaries). FlashMoBA uses 1024-row ranges at this sparsity (fuller tiles, twice the scratch per
  program): GATHER_RANGE_ROWS is the knob, and bench/moba.py times both.
"""
import math
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128)
ORDERS = ("gather", "tile")
ORDER = "tile"  # moba_attention's default order (module doc)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# (query rows, keys, num_warps, num_stages) per order and kernel, guessed for 16-bit inputs on an H200:
# compiled for sm_90 (triton 3.9) the gathered kernels fit these in registers without spilling, and 64-row
# tiles run on wgmma. fp32 inputs (ieee dots, 3x the shared memory) take FP32_TILES. _tiles() cuts a side
# to divide block_size.
TILES = {"gather": {"forward": (64, 64, 8, 2), "dq": (32, 128, 8, 2), "dkdv": (32, 64, 4, 2)},
         "tile": {"forward": (64, 64, 4, 3), "dq": (64, 64, 4, 2), "dkdv": (64, 64, 8, 2)}}
FP32_TILES = {kernel: (32, 32, 4, 2) for kernel in ("forward", "dq", "dkdv")}
if _INTERPRET:  # small tiles, rows and keys unequal both ways, so that tests reach every tile shape
    TILES = {order: {"forward": (16, 32, 4, 1), "dq": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1)} for order in ORDERS}
    FP32_TILES = TILES["gather"]
# Queries one program of the gathered order owns (rounded to whole MoBA blocks): enough that a key block
# gathers a tile of them at 1/16 density, few enough that their fp32 state stays near L2.
GATHER_RANGE_ROWS = 32 if _INTERPRET else 512
# The gate's method (select_blocks): "kernel" (running top-k in registers) or "topk" (chunked scores + torch.topk).
GATE_METHOD = "kernel"


def _gate_tile(block_size: int) -> int:
    """The gate's query tile: the largest of 64, 32, 16 dividing block_size, 16 under the interpreter."""
    if _INTERPRET:
        return 16
    return next(t for t in (64, 32, 16) if block_size % t == 0)


# ----------------------------------------------------------------------------------------------------
# Gate


@triton.jit
def _block_means(K, MEANS, N, NUM_BLOCKS, BLOCK_SIZE, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr):
    """MEANS[bh, j] = mean of K[bh, j * BLOCK_SIZE : (j + 1) * BLOCK_SIZE] in fp32; one program per block."""
    j, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64 offsets: N * H * D passes 2^31 at 512K
    offs_d = tl.arange(0, HEAD_DIM)
    total = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for start in range(j * BLOCK_SIZE, (j + 1) * BLOCK_SIZE, ROWS):
        rows = start + tl.arange(0, ROWS)
        k = tl.load(K + (bh * N + rows[:, None]) * HEAD_DIM + offs_d[None, :])
        total += tl.sum(k.to(tl.float32), axis=0)
    tl.store(MEANS + (bh * NUM_BLOCKS + j) * HEAD_DIM + offs_d, total / BLOCK_SIZE)


@triton.jit
def _gate(Q, MEANS, CHOSEN, Hq, N, NUM_BLOCKS, GROUP, BLOCK_SIZE, HEAD_DIM: tl.constexpr, TOPK: tl.constexpr,
          TOPK_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr):
    """CHOSEN[b, h, i, :TOPK_PAD] = the top TOPK past blocks of query i by q . mean(K_block), -1 padded, in no
    particular order. The running top-k replaces its smallest entry whenever a chunk holds a larger score."""
    pid_m, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = bh // Hq, bh % Hq
    bh_kv = b * (Hq // GROUP) + h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + (bh * N + offs_m[:, None]) * HEAD_DIM + offs_d[None, :], mask=offs_m[:, None] < N, other=0.0)
    q = q.to(tl.float32)
    own = (pid_m * BLOCK_M) // BLOCK_SIZE  # the tile lies in one block; past blocks are 0 .. own - 1
    slots = tl.arange(0, TOPK_PAD)[None, :]
    best = tl.where(slots < TOPK, float("-inf"), float("inf")) + tl.zeros([BLOCK_M, TOPK_PAD], dtype=tl.float32)
    best_index = tl.full([BLOCK_M, TOPK_PAD], -1, dtype=tl.int32)
    for start in range(0, own, BLOCK_B):
        offs_b = start + tl.arange(0, BLOCK_B)
        means = tl.load(MEANS + (bh_kv * NUM_BLOCKS + offs_b[:, None]) * HEAD_DIM + offs_d[None, :],
                        mask=offs_b[:, None] < own, other=0.0)
        scores = tl.dot(q, tl.trans(means), input_precision="ieee")  # (BLOCK_M, BLOCK_B)
        scores = tl.where(offs_b[None, :] < own, scores, float("-inf"))
        for _ in range(TOPK):  # a runtime loop: unrolled, top_k = 256 (512K tokens) compiles for minutes
            top = tl.max(scores, axis=1)  # (BLOCK_M,)
            top_index = tl.argmax(scores, axis=1)
            worst = tl.min(best, axis=1)
            worst_slot = tl.argmin(best, axis=1)
            replace = (slots == worst_slot[:, None]) & (top > worst)[:, None]
            best = tl.where(replace, top[:, None], best)
            best_index = tl.where(replace, start + top_index[:, None], best_index)
            scores = tl.where(tl.arange(0, BLOCK_B)[None, :] == top_index[:, None], float("-inf"), scores)
    best_index = tl.where(best == float("-inf"), -1, best_index)
    tl.store(CHOSEN + (bh * N + offs_m[:, None]) * TOPK_PAD + slots, best_index, mask=offs_m[:, None] < N)


# ----------------------------------------------------------------------------------------------------
# Forward and dQ: one program per (query tile, batch x query head)


@triton.jit
def _chose(chosen, block):
    """(BLOCK_M,) whether each query's choice (BLOCK_M, TOPK_PAD) contains block."""
    return tl.sum((chosen == block).to(tl.int32), axis=1) > 0


@triton.jit
def _fwd_step(acc, l_i, m_i, q, K, V, b, h_kv, start_n, visible_rows, last_key, qk_scale, HEAD_DIM: tl.constexpr,
              BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile of the online softmax (base 2): row i sees keys up to last_key[i] (itself in its own
    block, anything in a chosen past block). Rows that see nothing yet keep m = -inf safely."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = K.load([b, h_kv, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
    v = V.load([b, h_kv, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
    visible = visible_rows[:, None] & (offs_n[None, :] <= last_key[:, None])
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _moba_fwd(Q, K, V, CHOSEN, O, LSE, qk_scale, Hq, N, GROUP, BLOCK_SIZE, HEAD_DIM: tl.constexpr,
              TOPK_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = bh // Hq, bh % Hq
    b, h_kv = b.to(tl.int32), (h // GROUP).to(tl.int32)  # K/V descriptor coordinates
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_mask = offs_m < N
    q = tl.load(Q + (bh * N + offs_m[:, None]) * HEAD_DIM + offs_d[None, :], mask=row_mask[:, None], other=0.0)
    chosen = tl.load(CHOSEN + (bh * N + offs_m[:, None]) * TOPK_PAD + tl.arange(0, TOPK_PAD)[None, :],
                     mask=row_mask[:, None], other=-1)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    own = start_m // BLOCK_SIZE
    every_key = tl.full([BLOCK_M], N, dtype=tl.int32)  # a chosen past block is complete: all of it is visible
    for block in range(0, own):
        hit = _chose(chosen, block)
        if tl.max(hit.to(tl.int32), axis=0) > 0:  # skip blocks no query of this tile chose
            for start_n in range(block * BLOCK_SIZE, (block + 1) * BLOCK_SIZE, BLOCK_N):
                acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K, V, b, h_kv, start_n, hit, every_key, qk_scale,
                                          HEAD_DIM, BLOCK_N, PRECISION)
    for start_n in range(own * BLOCK_SIZE, tl.minimum(start_m + BLOCK_M, N), BLOCK_N):
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K, V, b, h_kv, start_n, row_mask, offs_m, qk_scale, HEAD_DIM,
                                  BLOCK_N, PRECISION)
    l_i = tl.where(row_mask, l_i, 1.0)  # rows past N saw nothing and are not stored
    acc = acc / l_i[:, None]
    tl.store(O + (bh * N + offs_m[:, None]) * HEAD_DIM + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=row_mask[:, None])
    tl.store(LSE + bh * N + offs_m, m_i + tl.log2(l_i), mask=row_mask)


@triton.jit
def _dq_step(dq, q, do, lse, delta, K, V, b, h_kv, start_n, visible_rows, last_key, qk_scale, HEAD_DIM: tl.constexpr,
             BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = K.load([b, h_kv, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
    v = V.load([b, h_kv, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    visible = visible_rows[:, None] & (offs_n[None, :] <= last_key[:, None])
    p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit
def _moba_dq(Q, K, V, CHOSEN, DO, LSE, DELTA, DQ, qk_scale, sm_scale, Hq, N, GROUP, BLOCK_SIZE,
             HEAD_DIM: tl.constexpr, TOPK_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             PRECISION: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = bh // Hq, bh % Hq
    b, h_kv = b.to(tl.int32), (h // GROUP).to(tl.int32)  # K/V descriptor coordinates
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_mask = offs_m < N
    rows = (bh * N + offs_m[:, None]) * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + rows, mask=row_mask[:, None], other=0.0)
    do = tl.load(DO + rows, mask=row_mask[:, None], other=0.0)
    lse = tl.load(LSE + bh * N + offs_m, mask=row_mask, other=0.0)
    delta = tl.load(DELTA + bh * N + offs_m, mask=row_mask, other=0.0)
    chosen = tl.load(CHOSEN + (bh * N + offs_m[:, None]) * TOPK_PAD + tl.arange(0, TOPK_PAD)[None, :],
                     mask=row_mask[:, None], other=-1)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    own = start_m // BLOCK_SIZE
    every_key = tl.full([BLOCK_M], N, dtype=tl.int32)  # a chosen past block is complete: all of it is visible
    for block in range(0, own):
        hit = _chose(chosen, block)
        if tl.max(hit.to(tl.int32), axis=0) > 0:
            for start_n in range(block * BLOCK_SIZE, (block + 1) * BLOCK_SIZE, BLOCK_N):
                dq = _dq_step(dq, q, do, lse, delta, K, V, b, h_kv, start_n, hit, every_key, qk_scale, HEAD_DIM,
                              BLOCK_N, PRECISION)
    for start_n in range(own * BLOCK_SIZE, tl.minimum(start_m + BLOCK_M, N), BLOCK_N):
        dq = _dq_step(dq, q, do, lse, delta, K, V, b, h_kv, start_n, row_mask, offs_m, qk_scale, HEAD_DIM,
                      BLOCK_N, PRECISION)
    tl.store(DQ + rows, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_mask[:, None])


# ----------------------------------------------------------------------------------------------------
# dK, dV: one program per (key tile, batch x KV head), looping over the group's query heads


@triton.jit
def _dkdv_step(dk, dv, k, v, Q, DO, LSE, DELTA, bh, offs_n, offs_m, row_mask, last_key, N, qk_scale,
               HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """Adds the share of the queries offs_m (a tile, or rows gathered from the column index) where row_mask,
    query i seeing keys up to last_key[i]; the scores are transposed, (BLOCK_N keys, BLOCK_M queries)."""
    offs_d = tl.arange(0, HEAD_DIM)
    rows = (bh * N + offs_m[:, None]) * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + rows, mask=row_mask[:, None], other=0.0)
    do = tl.load(DO + rows, mask=row_mask[:, None], other=0.0)
    lse = tl.load(LSE + bh * N + offs_m, mask=row_mask, other=0.0)
    delta = tl.load(DELTA + bh * N + offs_m, mask=row_mask, other=0.0)
    s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
    visible = row_mask[None, :] & (offs_n[:, None] <= last_key[None, :])
    p_t = tl.where(visible, tl.exp2(s_t - lse[None, :]), 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkdv_own_block(dk, dv, k, v, Q, DO, LSE, DELTA, bh, start_n, offs_n, N, BLOCK_SIZE, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    """The queries of the key tile's own block see it causally; the tile holding start_n is the first."""
    own_end = tl.minimum((start_n // BLOCK_SIZE + 1) * BLOCK_SIZE, N)
    for start_m in range((start_n // BLOCK_M) * BLOCK_M, own_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        dk, dv = _dkdv_step(dk, dv, k, v, Q, DO, LSE, DELTA, bh, offs_n, offs_m, offs_m < N, offs_m, N, qk_scale,
                            HEAD_DIM, PRECISION)
    return dk, dv


@triton.jit
def _moba_dkdv(Q, K, V, CHOSEN, TILE_CHOSE, DO, LSE, DELTA, DK, DV, qk_scale, sm_scale, Hq, Hkv, N, GROUP,
               BLOCK_SIZE, NUM_TILES, NUM_BLOCKS, HEAD_DIM: tl.constexpr, TOPK_PAD: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    pid_n, bh_kv = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h_kv = bh_kv // Hkv, bh_kv % Hkv
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_rows = (bh_kv * N + offs_n[:, None]) * HEAD_DIM + offs_d[None, :]
    k = tl.load(K + kv_rows, mask=offs_n[:, None] < N, other=0.0)
    v = tl.load(V + kv_rows, mask=offs_n[:, None] < N, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    block = start_n // BLOCK_SIZE
    own_end = tl.minimum((block + 1) * BLOCK_SIZE, N)
    for g in range(0, GROUP):
        bh = b * Hq + h_kv * GROUP + g
        dk, dv = _dkdv_own_block(dk, dv, k, v, Q, DO, LSE, DELTA, bh, start_n, offs_n, N, BLOCK_SIZE, qk_scale,
                                 HEAD_DIM, BLOCK_M, PRECISION)
        # later queries see them only if their gate chose this block: the bitmap skips tiles where none did
        for tile in range(own_end // BLOCK_M, NUM_TILES):
            if tl.load(TILE_CHOSE + (bh * NUM_TILES + tile) * NUM_BLOCKS + block) != 0:
                offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
                chosen = tl.load(CHOSEN + (bh * N + offs_m[:, None]) * TOPK_PAD + tl.arange(0, TOPK_PAD)[None, :],
                                 mask=offs_m[:, None] < N, other=-1)
                dk, dv = _dkdv_step(dk, dv, k, v, Q, DO, LSE, DELTA, bh, offs_n, offs_m, _chose(chosen, block),
                                    tl.full([BLOCK_M], N, dtype=tl.int32), N, qk_scale, HEAD_DIM, PRECISION)
    tl.store(DK + kv_rows, (dk * sm_scale).to(DK.dtype.element_ty), mask=offs_n[:, None] < N)
    tl.store(DV + kv_rows, dv.to(DV.dtype.element_ty), mask=offs_n[:, None] < N)


# ----------------------------------------------------------------------------------------------------
# "Collect and densify": the queries that chose a key block, gathered into dense tiles


@triton.jit
def _segment(STARTS, bh, block, first_range, end_range, NUM_BLOCKS, NUM_RANGES, valid=True):
    """[lo, hi): where the queries of ranges first_range .. end_range - 1 that chose block lie in ROWS[bh];
    empty unless valid."""
    row = STARTS + (bh * NUM_BLOCKS + block) * (NUM_RANGES + 1)
    return tl.load(row + first_range, mask=valid, other=0), tl.load(row + end_range, mask=valid, other=0)


@triton.jit
def _moba_fwd_gathered(Q, K, V, ROWS, STARTS, ACC, M, L, O, LSE, qk_scale, Hq, N, GROUP, BLOCK_SIZE, NUM_BLOCKS,
                       NUM_RANGES, RANGE_ROWS, PAIRS, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """One program owns the queries [r * RANGE_ROWS, (r + 1) * RANGE_ROWS) of one head and their running
    softmax state (ACC, M, L: fp32 scratch no other program touches). For each past block, the range's
    queries that chose it are gathered into dense tiles and run against the block; a last step runs the
    range's query tiles against their own blocks, causally; then each tile is normalised. One loop serves
    both kinds of tile, so the compiler keeps one copy of the step's registers."""
    r = tl.num_programs(0) - 1 - tl.program_id(0)  # the last ranges have the most past blocks: first
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // Hq, bh % Hq
    b, h_kv = b.to(tl.int32), (h // GROUP).to(tl.int32)  # K/V descriptor coordinates
    range_start = r * RANGE_ROWS
    range_end = tl.minimum(range_start + RANGE_ROWS, N)
    offs_d = tl.arange(0, HEAD_DIM)
    walk = (range_end - 1) // BLOCK_SIZE  # blocks 0 .. walk - 1 may have been chosen by the range's queries
    for step in range(0, walk + 1):
        own_blocks = step == walk
        # loaded in the step, not carried from the last one: triton 3.6's remove-layout-conversions pass drops
        # a loop-carried lo (every step then ran from block 0's lo: other ranges' rows, quadratic work)
        lo, hi = _segment(STARTS, bh, step, r, r + 1, NUM_BLOCKS, NUM_RANGES, step < walk)
        if own_blocks:
            lo, hi = range_start, range_end
        for t in range(lo, hi, BLOCK_M):
            index = t + tl.arange(0, BLOCK_M)
            row_mask = index < hi
            offs_m = tl.where(own_blocks, index, tl.load(ROWS + bh * PAIRS + index, mask=row_mask, other=0))
            last_key = tl.where(own_blocks, offs_m, N)  # causal in the own block; a chosen block is complete
            key_start = tl.where(own_blocks, (t // BLOCK_SIZE) * BLOCK_SIZE, step * BLOCK_SIZE)
            key_end = tl.where(own_blocks, tl.minimum(t + BLOCK_M, N), (step + 1) * BLOCK_SIZE)
            rows = (bh * N + offs_m[:, None]) * HEAD_DIM + offs_d[None, :]
            q = tl.load(Q + rows, mask=row_mask[:, None], other=0.0)
            acc = tl.load(ACC + rows, mask=row_mask[:, None], other=0.0)
            m_i = tl.load(M + bh * N + offs_m, mask=row_mask, other=float("-inf"))
            l_i = tl.load(L + bh * N + offs_m, mask=row_mask, other=0.0)
            for start_n in range(key_start, key_end, BLOCK_N):
                acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K, V, b, h_kv, start_n, row_mask, last_key, qk_scale,
                                          HEAD_DIM, BLOCK_N, PRECISION)
            tl.store(ACC + rows, acc, mask=row_mask[:, None])
            tl.store(M + bh * N + offs_m, m_i, mask=row_mask)
            tl.store(L + bh * N + offs_m, l_i, mask=row_mask)
            tl.debug_barrier()  # a later tile may hold the same rows: its loads must see these stores
    for start_m in range(range_start, range_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_mask = offs_m < N
        rows = (bh * N + offs_m[:, None]) * HEAD_DIM + offs_d[None, :]
        acc = tl.load(ACC + rows, mask=row_mask[:, None], other=0.0)
        l_i = tl.load(L + bh * N + offs_m, mask=row_mask, other=1.0)  # every row saw at least itself: l > 0
        m_i = tl.load(M + bh * N + offs_m, mask=row_mask, other=0.0)
        tl.store(O + rows, (acc / l_i[:, None]).to(O.dtype.element_ty), mask=row_mask[:, None])
        tl.store(LSE + bh * N + offs_m, m_i + tl.log2(l_i), mask=row_mask)


@triton.jit
def _moba_dq_gathered(Q, K, V, ROWS, STARTS, DO, LSE, DELTA, DQ_ACC, DQ, qk_scale, sm_scale, Hq, N, GROUP,
                      BLOCK_SIZE, NUM_BLOCKS, NUM_RANGES, RANGE_ROWS, PAIRS, HEAD_DIM: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """dQ with the forward's ownership and walk: a program sums its range's dQ in DQ_ACC (fp32 scratch),
    then scales and writes DQ once. Deterministic, no atomics."""
    r = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // Hq, bh % Hq
    b, h_kv = b.to(tl.int32), (h // GROUP).to(tl.int32)
    range_start = r * RANGE_ROWS
    range_end = tl.minimum(range_start + RANGE_ROWS, N)
    offs_d = tl.arange(0, HEAD_DIM)
    walk = (range_end - 1) // BLOCK_SIZE
    for step in range(0, walk + 1):
        own_blocks = step == walk
        # loaded in the step, not carried from the last one: triton 3.6's remove-layout-conversions pass drops
        # a loop-carried lo (every step then ran from block 0's lo: other ranges' rows, quadratic work)
        lo, hi = _segment(STARTS, bh, step, r, r + 1, NUM_BLOCKS, NUM_RANGES, step < walk)
        if own_blocks:
            lo, hi = range_start, range_end
        for t in range(lo, hi, BLOCK_M):
            index = t + tl.arange(0, BLOCK_M)
            row_mask = index < hi
            offs_m = tl.where(own_blocks, index, tl.load(ROWS + bh * PAIRS + index, mask=row_mask, other=0))
            last_key = tl.where(own_blocks, offs_m, N)
            key_start = tl.where(own_blocks, (t // BLOCK_SIZE) * BLOCK_SIZE, step * BLOCK_SIZE)
            key_end = tl.where(own_blocks, tl.minimum(t + BLOCK_M, N), (step + 1) * BLOCK_SIZE)
            rows = (bh * N + offs_m[:, None]) * HEAD_DIM + offs_d[None, :]
            q = tl.load(Q + rows, mask=row_mask[:, None], other=0.0)
            do = tl.load(DO + rows, mask=row_mask[:, None], other=0.0)
            lse = tl.load(LSE + bh * N + offs_m, mask=row_mask, other=0.0)
            delta = tl.load(DELTA + bh * N + offs_m, mask=row_mask, other=0.0)
            dq = tl.load(DQ_ACC + rows, mask=row_mask[:, None], other=0.0)
            for start_n in range(key_start, key_end, BLOCK_N):
                dq = _dq_step(dq, q, do, lse, delta, K, V, b, h_kv, start_n, row_mask, last_key, qk_scale,
                              HEAD_DIM, BLOCK_N, PRECISION)
            tl.store(DQ_ACC + rows, dq, mask=row_mask[:, None])
            tl.debug_barrier()
    for start_m in range(range_start, range_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        rows = (bh * N + offs_m[:, None]) * HEAD_DIM + offs_d[None, :]
        dq = tl.load(DQ_ACC + rows, mask=offs_m[:, None] < N, other=0.0)
        tl.store(DQ + rows, (dq * sm_scale).to(DQ.dtype.element_ty), mask=offs_m[:, None] < N)


@triton.jit
def _moba_dkdv_gathered(Q, K, V, ROWS, STARTS, DO, LSE, DELTA, DK, DV, qk_scale, sm_scale, Hq, Hkv, N, GROUP,
                        BLOCK_SIZE, NUM_BLOCKS, NUM_RANGES, PAIRS, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """One program per key tile: for each of its group's query heads, the own block's queries (causally),
    then every query that chose its block, gathered from the column index into dense tiles, in one loop.
    dK and dV are summed in registers and written once."""
    pid_n, bh_kv = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h_kv = bh_kv // Hkv, bh_kv % Hkv
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_rows = (bh_kv * N + offs_n[:, None]) * HEAD_DIM + offs_d[None, :]
    k = tl.load(K + kv_rows, mask=offs_n[:, None] < N, other=0.0)
    v = tl.load(V + kv_rows, mask=offs_n[:, None] < N, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    block = start_n // BLOCK_SIZE
    own_start = (start_n // BLOCK_M) * BLOCK_M  # the first query tile that sees these keys
    own_end = tl.minimum((block + 1) * BLOCK_SIZE, N)
    own_tiles = tl.cdiv(own_end - own_start, BLOCK_M)
    for g in range(0, GROUP):
        bh = b * Hq + h_kv * GROUP + g
        if block < NUM_BLOCKS:  # a complete block: later queries may have chosen it
            lo, hi = _segment(STARTS, bh, block, 0, NUM_RANGES, NUM_BLOCKS, NUM_RANGES)
        else:
            lo, hi = 0, 0
        for i in range(0, own_tiles + tl.cdiv(hi - lo, BLOCK_M)):
            own_block = i < own_tiles
            first = tl.where(own_block, own_start + i * BLOCK_M, lo + (i - own_tiles) * BLOCK_M)
            index = first + tl.arange(0, BLOCK_M)
            row_mask = index < tl.where(own_block, own_end, hi)
            offs_m = tl.where(own_block, index, tl.load(ROWS + bh * PAIRS + index, mask=row_mask, other=0))
            dk, dv = _dkdv_step(dk, dv, k, v, Q, DO, LSE, DELTA, bh, offs_n, offs_m, row_mask,
                                tl.where(own_block, offs_m, N), N, qk_scale, HEAD_DIM, PRECISION)
    tl.store(DK + kv_rows, (dk * sm_scale).to(DK.dtype.element_ty), mask=offs_n[:, None] < N)
    tl.store(DV + kv_rows, dv.to(DV.dtype.element_ty), mask=offs_n[:, None] < N)


# ----------------------------------------------------------------------------------------------------
# Launchers and the autograd Function


def _precision(q: torch.Tensor) -> str:
    return "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 inputs in full precision


def select_blocks(q: torch.Tensor, k: torch.Tensor, block_size: int, top_k: int,
                  method: str | None = None) -> torch.Tensor:
    """The gate: (B, Hq, N, next_power_of_2(top_k)) int32 block indices, -1 padded, in no particular order;
    the same blocks as model.moba.select_blocks (up to ties). `method` "kernel" keeps a running top-k in
    registers (`_gate`: no score matrix, but top_k reductions per chunk of 64 blocks); "topk" writes the
    scores of a chunk of queries (about 1 GiB) and takes torch.topk. Default: GATE_METHOD."""
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    num_blocks = N // block_size
    means = torch.zeros((B, Hkv, max(num_blocks, 1), D), device=q.device, dtype=torch.float32)
    if num_blocks:
        _block_means[(num_blocks, B * Hkv)](k, means, N, num_blocks, block_size, HEAD_DIM=D, ROWS=16)
    topk_pad = triton.next_power_of_2(top_k)
    if (method or GATE_METHOD) == "topk":
        return _gate_by_topk(q, means, block_size, top_k, topk_pad)
    chosen = torch.empty((B, Hq, N, topk_pad), device=q.device, dtype=torch.int32)
    tile = _gate_tile(block_size)
    _gate[(triton.cdiv(N, tile), B * Hq)](q, means, chosen, Hq, N, max(num_blocks, 1), Hq // Hkv, block_size,
                                          HEAD_DIM=D, TOPK=top_k, TOPK_PAD=topk_pad, BLOCK_M=tile,
                                          BLOCK_B=16 if _INTERPRET else 64)
    return chosen


def _gate_by_topk(q: torch.Tensor, means: torch.Tensor, block_size: int, top_k: int, topk_pad: int,
                  chunk_elements: int = 1 << 28) -> torch.Tensor:
    """The gate as fp32 scores and torch.topk, a chunk of queries at a time (about chunk_elements scores, each
    chunk scored against the blocks its last query can see)."""
    B, Hq, N, D = q.shape
    Hkv, num_blocks = means.shape[1], N // block_size
    chosen = torch.full((B, Hq, N, topk_pad), -1, device=q.device, dtype=torch.int32)
    group = Hq // Hkv
    chunk = max(block_size, chunk_elements // max(1, B * Hq * num_blocks) // block_size * block_size)
    for start in range(block_size, N, chunk):  # queries of block 0 have no past block
        end = min(N, start + chunk)
        seen = min(num_blocks, (end - 1) // block_size)  # blocks before the chunk's last query's own
        kept = min(top_k, seen)
        scores = q[:, :, start:end].float().view(B, Hkv, group, end - start, D) @ \
            means[:, :, None, :seen].transpose(-1, -2)  # (B, Hkv, group, C, seen)
        own = torch.arange(start, end, device=q.device) // block_size
        scores.masked_fill_(torch.arange(seen, device=q.device)[None, :] >= own[:, None], float("-inf"))
        best, index = scores.topk(kept, dim=-1)
        chosen[:, :, start:end, :kept] = index.masked_fill(best == float("-inf"), -1).view(B, Hq, end - start, kept)
    return chosen


def _key_tiles(x: torch.Tensor, block_n: int) -> TensorDescriptor:
    """k or v (B, Hkv, N, D) as a descriptor of (block_n, D) tiles: TMA loads on Hopper, with no pointer
    registers, zeros past N."""
    return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, block_n, x.shape[3]])


def _padded(chosen: torch.Tensor) -> torch.Tensor:
    """chosen (B, Hq, N, K) as contiguous int32 with a power-of-two last dimension, padded with -1."""
    width = triton.next_power_of_2(chosen.shape[-1])
    out = torch.full((*chosen.shape[:-1], width), -1, device=chosen.device, dtype=torch.int32)
    out[..., :chosen.shape[-1]] = chosen
    return out


def _tile_chose(chosen: torch.Tensor, block_m: int, num_blocks: int) -> torch.Tensor:
    """(B, Hq, N / block_m, num_blocks) uint8: whether any query of a tile chose a block (the dK/dV skip list)."""
    B, Hq, N, K = chosen.shape
    num_tiles = triton.cdiv(N, block_m)
    hits = torch.zeros((B, Hq, num_tiles, num_blocks + 1), device=chosen.device, dtype=torch.uint8)
    for h in range(Hq):  # one head at a time bounds the int64 copy scatter_ needs
        padded = torch.full((B, num_tiles * block_m, K), -1, device=chosen.device, dtype=torch.long)
        padded[:, :N] = chosen[:, h]
        hits[:, h].scatter_(-1, padded.view(B, num_tiles, block_m * K) + 1, 1)  # column 0 takes the -1s
    return hits[..., 1:].contiguous()


def column_index(chosen: torch.Tensor, num_blocks: int, range_rows: int,
                 max_pairs: int = 1 << 25) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate's choice (B, Hq, N, K) int32 (-1 = none) turned around, on the device without a host sync:
    rows (B * Hq, N * K) int32 holds, per head, the queries that chose block 0 in ascending order, then
    block 1, ..., then the -1 slots' queries; starts (B * Hq, num_blocks, N / range_rows + 1) int32:
    starts[bh, j, r] is where block j's queries from r * range_rows on begin in rows[bh], and
    starts[bh, j, -1] where its column ends. A stable sort per head, heads in batches of at most max_pairs
    (query, slot) pairs: about 30 bytes of temporaries per pair."""
    B, Hq, N, K = chosen.shape
    columns, ranges = max(num_blocks, 1), triton.cdiv(N, range_rows)
    device = chosen.device
    rows = torch.empty((B * Hq, N * K), device=device, dtype=torch.int32)
    starts = torch.empty((B * Hq, columns, ranges + 1), device=device, dtype=torch.int32)
    range_starts = (torch.arange(ranges + 1, device=device) * range_rows).clamp(max=N)
    bounds = (torch.arange(columns, device=device)[:, None] * N + range_starts[None, :]).view(1, -1)
    key_dtype = torch.int16 if columns < 2**15 - 1 else torch.int32  # fewer radix passes
    flat = chosen.view(B * Hq, N * K)
    step = max(1, max_pairs // (N * K))
    for lo in range(0, B * Hq, step):
        part = flat[lo:lo + step]
        key = torch.where(part < 0, columns, part).to(key_dtype)  # no choice sorts after every block
        block, order = torch.sort(key, dim=-1, stable=True)  # stable: queries ascend within a block
        query = torch.div(order, K, rounding_mode="floor")
        rows[lo:lo + step] = query
        position = torch.searchsorted(block.long() * N + query, bounds.expand(part.shape[0], -1).contiguous())
        starts[lo:lo + step] = position.view(-1, columns, ranges + 1)
    return rows, starts


def _range_rows(block_size: int) -> int:
    """Queries one gathered program owns: whole MoBA blocks, about GATHER_RANGE_ROWS of them."""
    return block_size * max(1, GATHER_RANGE_ROWS // block_size)


def _tiles(order: str, kernel: str, block_size: int, dtype: torch.dtype) -> tuple[int, int, dict]:
    """(BLOCK_M, BLOCK_N, launch options) of one kernel: TILES (FP32_TILES for fp32 inputs), each side cut to
    the largest power of two dividing block_size, so that no tile straddles a MoBA block."""
    rows, keys, num_warps, num_stages = (FP32_TILES if dtype == torch.float32 else TILES[order])[kernel]
    return (math.gcd(rows, block_size), math.gcd(keys, block_size),
            dict(num_warps=num_warps, num_stages=num_stages))


def _forward(q, k, v, index, block_size, range_rows, sm_scale, order):
    B, Hq, N, D = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((B, Hq, N), device=q.device, dtype=torch.float32)
    block_m, block_n, launch = _tiles(order, "forward", block_size, q.dtype)
    common = dict(HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=_precision(q), **launch)
    kv = _key_tiles(k, block_n), _key_tiles(v, block_n)
    if order == "tile":
        (chosen,) = index
        _moba_fwd[(triton.cdiv(N, block_m), B * Hq)](q, *kv, chosen, o, lse, sm_scale * LOG2E, Hq, N,
                                                     Hq // k.shape[1], block_size, TOPK_PAD=chosen.shape[-1],
                                                     **common)
        return o, lse
    rows, starts = index
    acc = torch.zeros((B, Hq, N, D), device=q.device, dtype=torch.float32)  # the running softmax state
    m = torch.full((B, Hq, N), float("-inf"), device=q.device, dtype=torch.float32)
    l = torch.zeros((B, Hq, N), device=q.device, dtype=torch.float32)
    ranges = starts.shape[2] - 1
    _moba_fwd_gathered[(ranges, B * Hq)](q, *kv, rows, starts, acc, m, l, o, lse, sm_scale * LOG2E, Hq, N,
                                         Hq // k.shape[1], block_size, starts.shape[1], ranges,
                                         range_rows, rows.shape[1], **common)
    return o, lse


def _backward(do, q, k, v, o, lse, index, block_size, range_rows, sm_scale, order):
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    delta = (do.float() * o.float()).sum(-1)  # (B, Hq, N)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    scales = (sm_scale * LOG2E, sm_scale)
    dq_m, dq_n, dq_launch = _tiles(order, "dq", block_size, q.dtype)
    dq_common = dict(HEAD_DIM=D, BLOCK_M=dq_m, BLOCK_N=dq_n, PRECISION=_precision(q), **dq_launch)
    kv = _key_tiles(k, dq_n), _key_tiles(v, dq_n)
    dkdv_m, dkdv_n, dkdv_launch = _tiles(order, "dkdv", block_size, q.dtype)
    dkdv_common = dict(HEAD_DIM=D, BLOCK_M=dkdv_m, BLOCK_N=dkdv_n, PRECISION=_precision(q), **dkdv_launch)
    if order == "tile":
        (chosen,) = index
        _moba_dq[(triton.cdiv(N, dq_m), B * Hq)](q, *kv, chosen, do, lse, delta, dq, *scales, Hq, N, Hq // Hkv,
                                                 block_size, TOPK_PAD=chosen.shape[-1], **dq_common)
        num_blocks = triton.cdiv(N, block_size)
        tile_chose = _tile_chose(chosen, dkdv_m, num_blocks)
        _moba_dkdv[(triton.cdiv(N, dkdv_n), B * Hkv)](q, k, v, chosen, tile_chose, do, lse, delta, dk, dv, *scales,
                                                      Hq, Hkv, N, Hq // Hkv, block_size, tile_chose.shape[2],
                                                      num_blocks, TOPK_PAD=chosen.shape[-1], **dkdv_common)
        return dq, dk, dv
    rows, starts = index
    num_blocks, ranges = starts.shape[1], starts.shape[2] - 1
    dq_acc = torch.zeros((B, Hq, N, D), device=q.device, dtype=torch.float32)
    _moba_dq_gathered[(ranges, B * Hq)](q, *kv, rows, starts, do, lse, delta, dq_acc, dq, *scales, Hq, N,
                                        Hq // Hkv, block_size, num_blocks, ranges, range_rows, rows.shape[1],
                                        **dq_common)
    del dq_acc
    _moba_dkdv_gathered[(triton.cdiv(N, dkdv_n), B * Hkv)](q, k, v, rows, starts, do, lse, delta, dk, dv, *scales,
                                                           Hq, Hkv, N, Hq // Hkv, block_size, N // block_size,
                                                           ranges, rows.shape[1], **dkdv_common)
    return dq, dk, dv


class MoBAAttention(torch.autograd.Function):
    """Autograd wrapper over fixed block choices: the gate is a selection and carries no gradient (as in
    MoBA); dq, dk, dv come back in the inputs' dtypes."""

    @staticmethod
    def forward(ctx, q, k, v, chosen, block_size, sm_scale, order):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        range_rows = _range_rows(block_size)  # fixed here: the backward must cut the index the same way
        if order == "tile":
            index = (_padded(chosen),)
        else:
            index = column_index(chosen.to(torch.int32).contiguous(), q.shape[2] // block_size, range_rows)
        o, lse = _forward(q, k, v, index, block_size, range_rows, sm_scale, order)
        ctx.save_for_backward(q, k, v, o, lse, *index)
        ctx.args = block_size, range_rows, sm_scale, order
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, *index = ctx.saved_tensors
        dq, dk, dv = _backward(do.contiguous(), q, k, v, o, lse, index, *ctx.args)
        return dq, dk, dv, None, None, None, None


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int) -> bool:
    """True when the kernels handle these inputs: 4-D, same N, Hq % Hkv == 0, D in HEAD_DIMS, fp16/bf16/fp32,
    block_size a multiple of 16, on CUDA (or on CPU under TRITON_INTERPRET=1)."""
    if not (q.dim() == k.dim() == v.dim() == 4 and k.shape == v.shape):
        return False
    (B, Hq, N, D), (Bk, Hkv, Nk, Dk) = q.shape, k.shape
    same = q.dtype == k.dtype == v.dtype and q.device == k.device == v.device
    on_device = q.is_cuda or (_INTERPRET and q.device.type == "cpu")
    return (same and on_device and B == Bk and N == Nk and N > 0 and D == Dk and D in HEAD_DIMS and Hkv > 0
            and Hq % Hkv == 0 and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and block_size >= 16 and block_size % 16 == 0)


def moba_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, top_k: int,
                   chosen: torch.Tensor | None = None, sm_scale: float | None = None,
                   order: str | None = None) -> torch.Tensor:
    """MoBA attention for q (B, Hq, N, D), k/v (B, Hkv, N, D) -> (B, Hq, N, D) in q's dtype. `chosen`
    (B, Hq, N, K) overrides the gate (tests feed the reference's choice to both paths): distinct past
    complete blocks per query, -1 for none, as the gate gives. `order` is "gather" (collect and densify)
    or "tile" (per query tile over the union of its choices), ORDER when None; see the module doc."""
    order = order or ORDER
    if not supports(q, k, v, block_size):
        raise ValueError(f"moba_attention: unsupported q {tuple(q.shape)} {q.dtype} {q.device}, k {tuple(k.shape)}, "
                         f"block_size {block_size}; expected (B, Hq, N, D) / (B, Hkv, N, D), D in {HEAD_DIMS}, "
                         "block_size a multiple of 16, check supports()")
    if order not in ORDERS:
        raise ValueError(f"moba_attention: order {order!r}; expected one of {ORDERS}")
    if chosen is None:
        with torch.no_grad():
            chosen = select_blocks(q.contiguous(), k.contiguous(), block_size, top_k)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return MoBAAttention.apply(q, k, v, chosen, block_size, scale, order)
