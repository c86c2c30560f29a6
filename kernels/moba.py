"""MoBA (mixture of block attention) in Triton: the gate, a block-sparse forward, and its backward.

`moba_attention(q, k, v, block_size, top_k)` must equal `dist_moe.model.moba.moba_attention_reference`:
dense softmax attention under the MoBA mask, where query i sees the top_k past complete key blocks its gate
chose (by q . mean(K_block)) and, causally, its own block. q is (B, Hq, N, D), k and v (B, Hkv, N, D);
query head h reads key/value head h // (Hq // Hkv), and gates on its own (per query head, as MoBA does).
Fp32 accumulation throughout; 16-bit operands go to the tensor cores as they are, fp32 ones in full precision.

Gate: `_block_means` averages each complete key block; `_gate` scores a tile of queries against all past
blocks, chunk by chunk, keeping a running top-k per query in registers (no (N, N / block) score matrix).

Attention: one program per query tile walks the union of its queries' choices with a per-query mask
(`_moba_fwd`, `_moba_dq`); `_moba_dkdv` finds its query tiles in a (tile x block) bitmap. No index, no
scratch, but a tile's union is nearly every past block when neighbouring queries choose independently
(0.99 of the past blocks on random inputs at N = 8K): near-dense work. Tiles per kernel are in TILES
(module top). K/V tiles of the forward and dQ load through tensor descriptors (TMA on Hopper).
A "gathered" order (FlashMoBA's collect and densify) was tried and dropped: wrong on an H200 and 50x slower;
bench/results/experiments/moba_gathered_order.md.
"""
import math
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# (query rows, keys, num_warps, num_stages) per kernel, guessed for 16-bit inputs on an H200. fp32 inputs (ieee
# dots, 3x the shared memory) take FP32_TILES. _tiles() cuts a side to divide block_size.
TILES = {"forward": (64, 64, 4, 3), "dq": (64, 64, 4, 2), "dkdv": (64, 64, 8, 2)}
FP32_TILES = {kernel: (32, 32, 4, 2) for kernel in ("forward", "dq", "dkdv")}
if _INTERPRET:  # small tiles, rows and keys unequal both ways, so that tests reach every tile shape
    TILES = {"forward": (16, 32, 4, 1), "dq": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1)}
    FP32_TILES = TILES


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
    """Adds the share of the query tile offs_m where row_mask, query i seeing keys up to last_key[i]; the
    scores are transposed, (BLOCK_N keys, BLOCK_M queries)."""
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
# Launchers and the autograd Function


def _precision(q: torch.Tensor) -> str:
    return "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 inputs in full precision


def select_blocks(q: torch.Tensor, k: torch.Tensor, block_size: int, top_k: int) -> torch.Tensor:
    """The gate: (B, Hq, N, next_power_of_2(top_k)) int32 block indices, -1 padded, in no particular order;
    the same blocks as model.moba.select_blocks (up to ties)."""
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    num_blocks = N // block_size
    means = torch.zeros((B, Hkv, max(num_blocks, 1), D), device=q.device, dtype=torch.float32)
    if num_blocks:
        _block_means[(num_blocks, B * Hkv)](k, means, N, num_blocks, block_size, HEAD_DIM=D, ROWS=16)
    topk_pad = triton.next_power_of_2(top_k)
    chosen = torch.empty((B, Hq, N, topk_pad), device=q.device, dtype=torch.int32)
    tile = _gate_tile(block_size)
    _gate[(triton.cdiv(N, tile), B * Hq)](q, means, chosen, Hq, N, max(num_blocks, 1), Hq // Hkv, block_size,
                                          HEAD_DIM=D, TOPK=top_k, TOPK_PAD=topk_pad, BLOCK_M=tile,
                                          BLOCK_B=16 if _INTERPRET else 64)
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


def _tiles(kernel: str, block_size: int, dtype: torch.dtype) -> tuple[int, int, dict]:
    """(BLOCK_M, BLOCK_N, launch options) of one kernel: TILES (FP32_TILES for fp32 inputs), each side cut to
    the largest power of two dividing block_size, so that no tile straddles a MoBA block."""
    rows, keys, num_warps, num_stages = (FP32_TILES if dtype == torch.float32 else TILES)[kernel]
    return (math.gcd(rows, block_size), math.gcd(keys, block_size),
            dict(num_warps=num_warps, num_stages=num_stages))


def _forward(q, k, v, chosen, block_size, sm_scale):
    B, Hq, N, D = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((B, Hq, N), device=q.device, dtype=torch.float32)
    block_m, block_n, launch = _tiles("forward", block_size, q.dtype)
    kv = _key_tiles(k, block_n), _key_tiles(v, block_n)
    _moba_fwd[(triton.cdiv(N, block_m), B * Hq)](q, *kv, chosen, o, lse, sm_scale * LOG2E, Hq, N, Hq // k.shape[1],
                                                 block_size, HEAD_DIM=D, TOPK_PAD=chosen.shape[-1], BLOCK_M=block_m,
                                                 BLOCK_N=block_n, PRECISION=_precision(q), **launch)
    return o, lse


def _backward(do, q, k, v, o, lse, chosen, block_size, sm_scale):
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    delta = (do.float() * o.float()).sum(-1)  # (B, Hq, N)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    scales = (sm_scale * LOG2E, sm_scale)
    dq_m, dq_n, dq_launch = _tiles("dq", block_size, q.dtype)
    kv = _key_tiles(k, dq_n), _key_tiles(v, dq_n)
    _moba_dq[(triton.cdiv(N, dq_m), B * Hq)](q, *kv, chosen, do, lse, delta, dq, *scales, Hq, N, Hq // Hkv,
                                             block_size, HEAD_DIM=D, TOPK_PAD=chosen.shape[-1], BLOCK_M=dq_m,
                                             BLOCK_N=dq_n, PRECISION=_precision(q), **dq_launch)
    dkdv_m, dkdv_n, dkdv_launch = _tiles("dkdv", block_size, q.dtype)
    num_blocks = triton.cdiv(N, block_size)
    tile_chose = _tile_chose(chosen, dkdv_m, num_blocks)
    _moba_dkdv[(triton.cdiv(N, dkdv_n), B * Hkv)](q, k, v, chosen, tile_chose, do, lse, delta, dk, dv, *scales,
                                                  Hq, Hkv, N, Hq // Hkv, block_size, tile_chose.shape[2],
                                                  num_blocks, HEAD_DIM=D, TOPK_PAD=chosen.shape[-1],
                                                  BLOCK_M=dkdv_m, BLOCK_N=dkdv_n, PRECISION=_precision(q),
                                                  **dkdv_launch)
    return dq, dk, dv


class MoBAAttention(torch.autograd.Function):
    """Autograd wrapper over fixed block choices: the gate is a selection and carries no gradient (as in
    MoBA); dq, dk, dv come back in the inputs' dtypes."""

    @staticmethod
    def forward(ctx, q, k, v, chosen, block_size, sm_scale):
        q, k, v, chosen = q.contiguous(), k.contiguous(), v.contiguous(), _padded(chosen)
        o, lse = _forward(q, k, v, chosen, block_size, sm_scale)
        ctx.save_for_backward(q, k, v, o, lse, chosen)
        ctx.args = block_size, sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, chosen = ctx.saved_tensors
        dq, dk, dv = _backward(do.contiguous(), q, k, v, o, lse, chosen, *ctx.args)
        return dq, dk, dv, None, None, None


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
                   chosen: torch.Tensor | None = None, sm_scale: float | None = None) -> torch.Tensor:
    """MoBA attention for q (B, Hq, N, D), k/v (B, Hkv, N, D) -> (B, Hq, N, D) in q's dtype. `chosen`
    (B, Hq, N, K) overrides the gate (tests feed the reference's choice to both paths): distinct past
    complete blocks per query, -1 for none, as the gate gives."""
    if not supports(q, k, v, block_size):
        raise ValueError(f"moba_attention: unsupported q {tuple(q.shape)} {q.dtype} {q.device}, k {tuple(k.shape)}, "
                         f"block_size {block_size}; expected (B, Hq, N, D) / (B, Hkv, N, D), D in {HEAD_DIMS}, "
                         "block_size a multiple of 16, check supports()")
    if chosen is None:
        with torch.no_grad():
            chosen = select_blocks(q.contiguous(), k.contiguous(), block_size, top_k)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return MoBAAttention.apply(q, k, v, chosen, block_size, scale)
