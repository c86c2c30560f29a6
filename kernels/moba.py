"""MoBA (mixture of block attention) in Triton: the gate, and a block-sparse forward and backward whose work
scales with the (query, chosen block) pairs (FlashMoBA's "collect and densify" order).

`moba_attention` equals `dist_moe.model.moba.moba_attention_reference` (dense attention under the MoBA mask) in
fp32 accumulation. docs/moba.md says how the kernels work, what they cost and what they measured.
"""
import math

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .runtime import INTERPRET, runs_kernels

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128)
# (query rows, keys, num_warps, num_stages) per kernel for 16-bit inputs: the tiles measured fastest on an
# H100 (docs/moba.md); 64-row tiles run on wgmma. fp32 inputs (ieee dots, 3x the shared memory) take
# FP32_TILES. _tiles() cuts a side to divide block_size.
TILES = {"forward": (64, 64, 8, 2), "dq": (32, 128, 8, 2), "dkdv": (32, 64, 4, 2)}
FP32_TILES = {kernel: (32, 32, 4, 2) for kernel in ("forward", "dq", "dkdv")}
if INTERPRET:  # small tiles, rows and keys unequal both ways, so that tests reach every tile shape
    TILES = {"forward": (16, 32, 4, 1), "dq": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1)}
    FP32_TILES = TILES
# Queries one program owns (rounded to whole MoBA blocks): enough that a key block gathers a tile of them at
# 1/16 density, few enough that their fp32 state stays near L2.
GATHER_RANGE_ROWS = 32 if INTERPRET else 512
# The gate's method (select_blocks): "kernel" (running top-k in registers) or "topk" (chunked scores + torch.topk).
GATE_METHOD = "topk"


def _gate_tile(block_size: int) -> tuple[int, int]:
    """(query rows, num_warps) of the gate: 32 rows on 8 warps keep the running top-k in registers up to
    top_k 256 on sm_90 (64 rows on 4 warps spilled); 16 rows where the block needs it."""
    if INTERPRET:
        return 16, 4
    return (32, 8) if block_size % 32 == 0 else (16, 4)


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
        top = tl.max(scores, axis=1)  # (BLOCK_M,)
        worst = tl.min(best, axis=1)
        # insert the chunk's best score while it beats some row's worst kept one: after the first chunks few
        # scores do, so the loop runs far fewer than TOPK times (a fixed TOPK loop grew the gate with top_k)
        while tl.max((top > worst).to(tl.int32), axis=0) > 0:
            top_index = tl.argmax(scores, axis=1)
            worst_slot = tl.argmin(best, axis=1)
            replace = (slots == worst_slot[:, None]) & (top > worst)[:, None]
            best = tl.where(replace, top[:, None], best)
            best_index = tl.where(replace, start + top_index[:, None], best_index)
            scores = tl.where(tl.arange(0, BLOCK_B)[None, :] == top_index[:, None], float("-inf"), scores)
            top = tl.max(scores, axis=1)
            worst = tl.min(best, axis=1)
    best_index = tl.where(best == float("-inf"), -1, best_index)
    tl.store(CHOSEN + (bh * N + offs_m[:, None]) * TOPK_PAD + slots, best_index, mask=offs_m[:, None] < N)


# ----------------------------------------------------------------------------------------------------
# One key tile against a tile of queries (gathered or contiguous): forward, dQ, dK/dV


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
    tile, num_warps = _gate_tile(block_size)
    _gate[(triton.cdiv(N, tile), B * Hq)](q, means, chosen, Hq, N, max(num_blocks, 1), Hq // Hkv, block_size,
                                          HEAD_DIM=D, TOPK=top_k, TOPK_PAD=topk_pad, BLOCK_M=tile,
                                          BLOCK_B=16 if INTERPRET else 64, num_warps=num_warps, num_stages=2)
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


def _tiles(kernel: str, block_size: int, dtype: torch.dtype) -> tuple[int, int, dict]:
    """(BLOCK_M, BLOCK_N, launch options) of one kernel: TILES (FP32_TILES for fp32 inputs), each side cut to
    the largest power of two dividing block_size, so that no tile straddles a MoBA block."""
    rows, keys, num_warps, num_stages = (FP32_TILES if dtype == torch.float32 else TILES)[kernel]
    return (math.gcd(rows, block_size), math.gcd(keys, block_size),
            dict(num_warps=num_warps, num_stages=num_stages))


def _forward(q, k, v, rows, starts, block_size, range_rows, sm_scale):
    B, Hq, N, D = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((B, Hq, N), device=q.device, dtype=torch.float32)
    block_m, block_n, launch = _tiles("forward", block_size, q.dtype)
    kv = _key_tiles(k, block_n), _key_tiles(v, block_n)
    acc = torch.zeros((B, Hq, N, D), device=q.device, dtype=torch.float32)  # the running softmax state
    m = torch.full((B, Hq, N), float("-inf"), device=q.device, dtype=torch.float32)
    l = torch.zeros((B, Hq, N), device=q.device, dtype=torch.float32)
    ranges = starts.shape[2] - 1
    _moba_fwd_gathered[(ranges, B * Hq)](q, *kv, rows, starts, acc, m, l, o, lse, sm_scale * LOG2E, Hq, N,
                                         Hq // k.shape[1], block_size, starts.shape[1], ranges, range_rows,
                                         rows.shape[1], HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n,
                                         PRECISION=_precision(q), **launch)
    return o, lse


def _row_dots(a: torch.Tensor, b: torch.Tensor, chunk_elements: int = 1 << 26) -> torch.Tensor:
    """(a * b).sum(-1) in fp32, a few heads at a time: upcasting whole 16-bit (B, Hq, N, D) tensors at once
    takes six times a's size in temporaries, the backward's peak at long N."""
    B, Hq, N, D = a.shape
    out = torch.empty((B * Hq, N), device=a.device, dtype=torch.float32)
    a, b = a.reshape(B * Hq, N, D), b.reshape(B * Hq, N, D)
    step = max(1, chunk_elements // (N * D))
    for lo in range(0, B * Hq, step):
        out[lo:lo + step] = (a[lo:lo + step].float() * b[lo:lo + step].float()).sum(-1)
    return out.view(B, Hq, N)


def _backward(do, q, k, v, o, lse, rows, starts, block_size, range_rows, sm_scale):
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    delta = _row_dots(do, o)  # (B, Hq, N)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    scales = (sm_scale * LOG2E, sm_scale)
    num_blocks, ranges = starts.shape[1], starts.shape[2] - 1
    dq_m, dq_n, dq_launch = _tiles("dq", block_size, q.dtype)
    kv = _key_tiles(k, dq_n), _key_tiles(v, dq_n)
    dq_acc = torch.zeros((B, Hq, N, D), device=q.device, dtype=torch.float32)
    _moba_dq_gathered[(ranges, B * Hq)](q, *kv, rows, starts, do, lse, delta, dq_acc, dq, *scales, Hq, N,
                                        Hq // Hkv, block_size, num_blocks, ranges, range_rows, rows.shape[1],
                                        HEAD_DIM=D, BLOCK_M=dq_m, BLOCK_N=dq_n, PRECISION=_precision(q), **dq_launch)
    del dq_acc
    dkdv_m, dkdv_n, dkdv_launch = _tiles("dkdv", block_size, q.dtype)
    _moba_dkdv_gathered[(triton.cdiv(N, dkdv_n), B * Hkv)](q, k, v, rows, starts, do, lse, delta, dk, dv, *scales,
                                                           Hq, Hkv, N, Hq // Hkv, block_size, N // block_size,
                                                           ranges, rows.shape[1], HEAD_DIM=D, BLOCK_M=dkdv_m,
                                                           BLOCK_N=dkdv_n, PRECISION=_precision(q), **dkdv_launch)
    return dq, dk, dv


class MoBAAttention(torch.autograd.Function):
    """Autograd wrapper over fixed block choices, given as their column index: the gate is a selection and
    carries no gradient (as in MoBA); dq, dk, dv come back in the inputs' dtypes."""

    @staticmethod
    def forward(ctx, q, k, v, rows, starts, block_size, range_rows, sm_scale):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse = _forward(q, k, v, rows, starts, block_size, range_rows, sm_scale)
        ctx.save_for_backward(q, k, v, o, lse, rows, starts)
        ctx.args = block_size, range_rows, sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, rows, starts = ctx.saved_tensors
        dq, dk, dv = _backward(do.contiguous(), q, k, v, o, lse, rows, starts, *ctx.args)
        return dq, dk, dv, None, None, None, None, None


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int) -> bool:
    """True when the kernels handle these inputs: 4-D, same N, Hq % Hkv == 0, D in HEAD_DIMS, fp16/bf16/fp32,
    block_size a multiple of 16, on CUDA (or on CPU under TRITON_INTERPRET=1)."""
    if not (q.dim() == k.dim() == v.dim() == 4 and k.shape == v.shape):
        return False
    (B, Hq, N, D), (Bk, Hkv, Nk, Dk) = q.shape, k.shape
    same = q.dtype == k.dtype == v.dtype and q.device == k.device == v.device
    on_device = runs_kernels(q)
    return (same and on_device and B == Bk and N == Nk and N > 0 and D == Dk and D in HEAD_DIMS and Hkv > 0
            and Hq % Hkv == 0 and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and block_size >= 16 and block_size % 16 == 0)


def moba_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, top_k: int,
                   chosen: torch.Tensor | None = None, sm_scale: float | None = None) -> torch.Tensor:
    """MoBA attention for q (B, Hq, N, D), k/v (B, Hkv, N, D) -> (B, Hq, N, D) in q's dtype. `chosen`
    (B, Hq, N, K) overrides the gate (tests feed the reference's choice to both paths): distinct past
    complete blocks per query, -1 for none, as the gate gives."""
    if not supports(q, k, v, block_size):
        raise ValueError(f"moba_attention: unsupported q {tuple(q.shape)} {q.dtype} {q.device}, k {tuple(k.shape)}, "
                         f"block_size {block_size}; expected (B, Hq, N, D) / (B, Hkv, N, D), D in {HEAD_DIMS}, "
                         "block_size a multiple of 16, check supports()")
    with torch.no_grad():
        if chosen is None:
            chosen = select_blocks(q.contiguous(), k.contiguous(), block_size, top_k)
        range_rows = _range_rows(block_size)  # the forward and the backward cut the index the same way
        rows, starts = column_index(chosen.to(torch.int32).contiguous(), q.shape[2] // block_size, range_rows)
    del chosen  # the index replaces it (as large as it): dropped before the forward's scratch is made
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return MoBAAttention.apply(q, k, v, rows, starts, block_size, range_rows, scale)
