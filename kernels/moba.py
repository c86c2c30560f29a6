"""MoBA (mixture of block attention) in Triton: the gate, a block-sparse forward, and its backward.

`moba_attention(q, k, v, block_size, top_k)` must equal `dist_moe.model.moba.moba_attention_reference`:
dense softmax attention under the MoBA mask, where query i sees the top_k past complete key blocks its gate
chose (by q . mean(K_block)) and, causally, its own block. q is (B, Hq, N, D), k and v (B, Hkv, N, D);
query head h reads key/value head h // (Hq // Hkv), and gates on its own (per query head, as MoBA does).

Three steps, each a kernel (fp32 accumulation throughout; 16-bit operands go to the tensor cores as they
are, fp32 ones in full precision):
- gate: `_block_means` averages each complete key block; `_gate` scores a tile of queries against all
  past blocks, chunk by chunk, keeping a running top-k per query in registers (no (N, N / block) score
  matrix in memory).
- forward, per query tile ("iterate over the selected KV blocks"): a tile lies inside one MoBA block, so it
  walks the past blocks, skips those none of its queries chose, and runs the online softmax over the rest
  with a per-query mask, then over its own block causally. FlashMoBA gathers the queries of each KV block
  instead ("collect and densify"), which fills the tensor cores better when top_k is small relative to the
  tile; this order needs no gather and shares the backward's dQ loop. The base-2 log-sum-exp is saved.
- backward: delta = rowsum(dO * O); `_dq` walks the forward's blocks per query tile; `_dkdv` owns one key
  tile and sums dK, dV over its group's query heads and the query tiles that chose its block (read from a
  per-tile bitmap built from the gate's choice), so dK/dV are written once each, without atomics.
"""
import math
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _tile(block_size: int) -> int:
    """Query and key tile: the largest of 64, 32, 16 dividing block_size (a tile never straddles a block),
    16 under the interpreter."""
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
        for _ in tl.static_range(TOPK):
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
def _fwd_step(acc, l_i, m_i, q, K, V, bh_kv, offs_m, start_n, visible_rows, N, qk_scale, CAUSAL: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile of the online softmax (base 2). Rows that see nothing yet keep m = -inf safely."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_mask = offs_n[:, None] < N
    k = tl.load(K + (bh_kv * N + offs_n[:, None]) * HEAD_DIM + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + (bh_kv * N + offs_n[:, None]) * HEAD_DIM + offs_d[None, :], mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
    visible = visible_rows[:, None] & (offs_n[None, :] < N)
    if CAUSAL:
        visible &= offs_n[None, :] <= offs_m[:, None]
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
    bh_kv = b * (Hq // GROUP) + h // GROUP
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
    for block in range(0, own):
        hit = _chose(chosen, block)
        if tl.max(hit.to(tl.int32), axis=0) > 0:  # skip blocks no query of this tile chose
            for start_n in range(block * BLOCK_SIZE, (block + 1) * BLOCK_SIZE, BLOCK_N):
                acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K, V, bh_kv, offs_m, start_n, hit, N, qk_scale,
                                          False, HEAD_DIM, BLOCK_N, PRECISION)
    for start_n in range(own * BLOCK_SIZE, tl.minimum(start_m + BLOCK_M, N), BLOCK_N):
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, K, V, bh_kv, offs_m, start_n, row_mask, N, qk_scale,
                                  True, HEAD_DIM, BLOCK_N, PRECISION)
    l_i = tl.where(row_mask, l_i, 1.0)  # rows past N saw nothing and are not stored
    acc = acc / l_i[:, None]
    tl.store(O + (bh * N + offs_m[:, None]) * HEAD_DIM + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=row_mask[:, None])
    tl.store(LSE + bh * N + offs_m, m_i + tl.log2(l_i), mask=row_mask)


@triton.jit
def _dq_step(dq, q, do, lse, delta, K, V, bh_kv, offs_m, start_n, visible_rows, N, qk_scale,
             CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_mask = offs_n[:, None] < N
    k = tl.load(K + (bh_kv * N + offs_n[:, None]) * HEAD_DIM + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + (bh_kv * N + offs_n[:, None]) * HEAD_DIM + offs_d[None, :], mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    visible = visible_rows[:, None] & (offs_n[None, :] < N)
    if CAUSAL:
        visible &= offs_n[None, :] <= offs_m[:, None]
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
    bh_kv = b * (Hq // GROUP) + h // GROUP
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
    for block in range(0, own):
        hit = _chose(chosen, block)
        if tl.max(hit.to(tl.int32), axis=0) > 0:
            for start_n in range(block * BLOCK_SIZE, (block + 1) * BLOCK_SIZE, BLOCK_N):
                dq = _dq_step(dq, q, do, lse, delta, K, V, bh_kv, offs_m, start_n, hit, N, qk_scale, False,
                              HEAD_DIM, BLOCK_N, PRECISION)
    for start_n in range(own * BLOCK_SIZE, tl.minimum(start_m + BLOCK_M, N), BLOCK_N):
        dq = _dq_step(dq, q, do, lse, delta, K, V, bh_kv, offs_m, start_n, row_mask, N, qk_scale, True,
                      HEAD_DIM, BLOCK_N, PRECISION)
    tl.store(DQ + rows, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_mask[:, None])


# ----------------------------------------------------------------------------------------------------
# dK, dV: one program per (key tile, batch x KV head), looping over the group's query heads


@triton.jit
def _dkdv_step(dk, dv, k, v, Q, DO, LSE, DELTA, bh, offs_n, start_m, visible_rows, N, qk_scale,
               CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    """Adds one query tile's share: the scores are transposed, (BLOCK_N keys, BLOCK_M queries)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_mask = offs_m < N
    rows = (bh * N + offs_m[:, None]) * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + rows, mask=row_mask[:, None], other=0.0)
    do = tl.load(DO + rows, mask=row_mask[:, None], other=0.0)
    lse = tl.load(LSE + bh * N + offs_m, mask=row_mask, other=0.0)
    delta = tl.load(DELTA + bh * N + offs_m, mask=row_mask, other=0.0)
    s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
    visible = (visible_rows & row_mask)[None, :] & (offs_n[:, None] < N)
    if CAUSAL:
        visible &= offs_n[:, None] <= offs_m[None, :]
    p_t = tl.where(visible, tl.exp2(s_t - lse[None, :]), 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
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
    every_row = tl.full([BLOCK_M], 1, dtype=tl.int1)
    for g in range(0, GROUP):
        bh = b * Hq + h_kv * GROUP + g
        # queries of this block see these keys causally; the tile holding start_n is the first that can
        for start_m in range((start_n // BLOCK_M) * BLOCK_M, own_end, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, Q, DO, LSE, DELTA, bh, offs_n, start_m, every_row, N, qk_scale,
                                True, HEAD_DIM, BLOCK_M, PRECISION)
        # later queries see them only if their gate chose this block: the bitmap skips tiles where none did
        for tile in range(own_end // BLOCK_M, NUM_TILES):
            if tl.load(TILE_CHOSE + (bh * NUM_TILES + tile) * NUM_BLOCKS + block) != 0:
                offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
                chosen = tl.load(CHOSEN + (bh * N + offs_m[:, None]) * TOPK_PAD + tl.arange(0, TOPK_PAD)[None, :],
                                 mask=offs_m[:, None] < N, other=-1)
                dk, dv = _dkdv_step(dk, dv, k, v, Q, DO, LSE, DELTA, bh, offs_n, tile * BLOCK_M,
                                    _chose(chosen, block), N, qk_scale, False, HEAD_DIM, BLOCK_M, PRECISION)
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
    tile = _tile(block_size)
    _gate[(triton.cdiv(N, tile), B * Hq)](q, means, chosen, Hq, N, max(num_blocks, 1), Hq // Hkv, block_size,
                                          HEAD_DIM=D, TOPK=top_k, TOPK_PAD=topk_pad, BLOCK_M=tile,
                                          BLOCK_B=16 if _INTERPRET else 64)
    return chosen


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


def _forward(q, k, v, chosen, block_size, sm_scale):
    B, Hq, N, D = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((B, Hq, N), device=q.device, dtype=torch.float32)
    tile = _tile(block_size)
    _moba_fwd[(triton.cdiv(N, tile), B * Hq)](q, k, v, chosen, o, lse, sm_scale * LOG2E, Hq, N, Hq // k.shape[1],
                                              block_size, HEAD_DIM=D, TOPK_PAD=chosen.shape[-1], BLOCK_M=tile,
                                              BLOCK_N=tile, PRECISION=_precision(q))
    return o, lse


def _backward(do, q, k, v, o, lse, chosen, block_size, sm_scale):
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    tile = _tile(block_size)
    delta = (do.float() * o.float()).sum(-1)  # (B, Hq, N)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = dict(HEAD_DIM=D, TOPK_PAD=chosen.shape[-1], BLOCK_M=tile, BLOCK_N=tile, PRECISION=_precision(q))
    _moba_dq[(triton.cdiv(N, tile), B * Hq)](q, k, v, chosen, do, lse, delta, dq, sm_scale * LOG2E, sm_scale, Hq,
                                             N, Hq // Hkv, block_size, **common)
    num_blocks = triton.cdiv(N, block_size)
    tile_chose = _tile_chose(chosen, tile, num_blocks)
    _moba_dkdv[(triton.cdiv(N, tile), B * Hkv)](q, k, v, chosen, tile_chose, do, lse, delta, dk, dv,
                                                sm_scale * LOG2E, sm_scale, Hq, Hkv, N, Hq // Hkv, block_size,
                                                tile_chose.shape[2], num_blocks, **common)
    return dq, dk, dv


class MoBAAttention(torch.autograd.Function):
    """Autograd wrapper over fixed block choices: the gate is a selection and carries no gradient (as in
    MoBA); dq, dk, dv come back in the inputs' dtypes."""

    @staticmethod
    def forward(ctx, q, k, v, chosen, block_size, sm_scale):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        chosen = _padded(chosen)
        o, lse = _forward(q, k, v, chosen, block_size, sm_scale)
        ctx.save_for_backward(q, k, v, o, lse, chosen)
        ctx.block_size, ctx.sm_scale = block_size, sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, chosen = ctx.saved_tensors
        dq, dk, dv = _backward(do.contiguous(), q, k, v, o, lse, chosen, ctx.block_size, ctx.sm_scale)
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
    (B, Hq, N, K) overrides the gate (tests feed the reference's choice to both paths)."""
    if not supports(q, k, v, block_size):
        raise ValueError(f"moba_attention: unsupported q {tuple(q.shape)} {q.dtype} {q.device}, k {tuple(k.shape)}, "
                         f"block_size {block_size}; expected (B, Hq, N, D) / (B, Hkv, N, D), D in {HEAD_DIMS}, "
                         "block_size a multiple of 16, check supports()")
    if chosen is None:
        with torch.no_grad():
            chosen = select_blocks(q.contiguous(), k.contiguous(), block_size, top_k)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return MoBAAttention.apply(q, k, v, chosen, block_size, scale)
