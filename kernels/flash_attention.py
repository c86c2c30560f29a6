"""Flash attention (FlashAttention-2) for grouped-query attention, forward and backward, in Triton.

`flash_attention(q, k, v, causal, window, sm_scale)` must equal `attention_reference(...)` below, i.e.
`torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)` with a
sliding-window mask when `window > 0`. q is (B, Hq, N, D), k and v are (B, Hkv, N, D) with Hq % Hkv == 0;
query head h reads key/value head h // (Hq // Hkv) without repeating K/V in memory. Tiles move through
tensor descriptors (TMA on Hopper), which zero-fill rows past N and clip stores. Softmax runs in base 2
(log2(e) folded into the scale); the forward saves the base-2 log-sum-exp, and the backward recomputes P:
one kernel owns each key block and sums dK/dV over its group's query heads in one loop (no atomics),
another owns each query block and writes dQ. Fully masked blocks are skipped; the forward and dQ split
the rest into unmasked blocks and edge blocks (causal diagonal, window edge, ragged tail). On Hopper at
D = 128 (16-bit, no window) the forward is the Gluon kernel beside this file, which overlaps the softmax
with the tensor cores; it writes the same O and LSE, so this backward serves both.
"""
import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128)
from .runtime import GLUON, INTERPRET, runs_kernels

if GLUON:
    from .flash_attention_gluon import flash_attention_forward_gluon
_QUERY_SIDE = ("Q", "O", "DO", "DQ")  # descriptors tiled by BLOCK_M; the others (K, V, DK, DV) by BLOCK_N


def _set_block_shapes(nargs):
    """Autotune pre-hook: give each tensor descriptor the tile of the config being run."""
    for name, arg in nargs.items():
        if isinstance(arg, TensorDescriptor):
            arg.block_shape = [1, 1, nargs["BLOCK_M" if name in _QUERY_SIDE else "BLOCK_N"], nargs["HEAD_DIM"]]


def _configs(tiles, fp32_tile, interpreted):
    """Autotune space of (BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg]): the fp32 tile first, then the
    16-bit tiles (_prune picks by dtype); a single small tile under the interpreter. A register cap lets two
    CTAs share an SM, so one's softmax runs while the other's matmuls do (ping-pong by occupancy)."""
    if INTERPRET:
        tiles, fp32_tile = [], interpreted
    return [triton.Config({"BLOCK_M": t[0], "BLOCK_N": t[1]}, num_warps=t[2], num_stages=t[3],
                          maxnreg=t[4] if len(t) > 4 else None, pre_hook=_set_block_shapes)
            for t in [fp32_tile, *tiles]]


def _prune(configs, named_args, **kwargs):
    """fp32 operands triple registers and shared memory: they get the first (small) tile, 16-bit the rest."""
    if named_args["Q"].base.dtype == torch.float32 or len(configs) == 1:
        return configs[:1]
    return configs[1:]


_KEY = ["N_BUCKET", "HEAD_DIM", "CAUSAL", "PRECISION"]  # PRECISION tells fp32 inputs from 16-bit ones
_TUNING = dict(key=_KEY, prune_configs_by={"early_config_prune": _prune})
# Forward and dQ own BLOCK_M queries and stream keys (BLOCK_M % BLOCK_N == 0); dK/dV owns BLOCK_N keys and
# streams queries (BLOCK_N % BLOCK_M == 0), so every range stays aligned to the streamed block.
_FWD_CONFIGS = _configs([(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3),
                         (64, 64, 4, 2), (64, 128, 4, 2), (128, 64, 4, 3), (128, 64, 8, 2, 128)],
                        fp32_tile=(64, 32, 4, 2), interpreted=(32, 16, 4, 1))
_DQ_CONFIGS = _configs([(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2),
                        (128, 32, 4, 3), (128, 32, 8, 2)], fp32_tile=(64, 32, 4, 2), interpreted=(32, 16, 4, 1))
_DKDV_CONFIGS = _configs([(32, 128, 8, 3), (32, 128, 8, 2), (64, 128, 8, 2), (64, 128, 8, 3), (32, 64, 8, 3),
                          (32, 64, 4, 3), (32, 64, 4, 2), (64, 64, 4, 3), (64, 64, 4, 2)],
                         fp32_tile=(16, 32, 4, 2), interpreted=(16, 32, 4, 1))


# ----------------------------------------------------------------------------------------------------
# Block ranges. A window W lets query i see keys j with i - W < j <= i (the host passes W = N + 256 for
# plain causal); ranges are multiples of the streamed block size, clamped so that they never overlap.


@triton.jit
def _key_ranges(start_m, N, WINDOW, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys for queries [start_m, start_m + BLOCK_M): [lo, mid_lo) edge, [mid_lo, mid_hi) full, [mid_hi, hi) edge."""
    if CAUSAL:
        lo = (tl.maximum(start_m - WINDOW + 1, 0) // BLOCK_N) * BLOCK_N
        mid_lo = tl.minimum(tl.cdiv(tl.maximum(start_m + BLOCK_M - WINDOW, 0), BLOCK_N) * BLOCK_N, start_m)
        mid_hi = start_m
        hi = tl.minimum(start_m + BLOCK_M, N)
    else:
        lo = 0
        mid_lo = 0
        mid_hi = (N // BLOCK_N) * BLOCK_N
        hi = N
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _visible(offs_m, offs_n, N, WINDOW, CAUSAL: tl.constexpr):
    """(BLOCK_M, BLOCK_N) mask of key j visible to query i, both inside [0, N)."""
    keep = (offs_m[:, None] < N) & (offs_n[None, :] < N)
    if CAUSAL:
        keep &= (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] > offs_m[:, None] - WINDOW)
    return keep


@triton.jit
def _tile(desc, b, h, start, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """(ROWS, HEAD_DIM) rows [start, start + ROWS) of head (b, h); rows past N read as zeros."""
    return desc.load([b, h, start, 0]).reshape(ROWS, HEAD_DIM)


# ----------------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, K, V, b, h_kv, offs_m, lo, hi, N, WINDOW, qk_scale, EDGE: tl.constexpr,
                    CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        k = _tile(K, b, h_kv, start_n, BLOCK_N, HEAD_DIM)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        if EDGE:
            # finite, so a row whose first block is all masked gives exp2(0) garbage that alpha later zeroes
            offs_n = start_n + tl.arange(0, BLOCK_N)
            qk = tl.where(_visible(offs_m, offs_n, N, WINDOW, CAUSAL), qk * qk_scale, -1.0e30)
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            qk -= m_ij[:, None]
        else:
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale - m_ij[:, None]
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _tile(V, b, h_kv, start_n, BLOCK_N, HEAD_DIM)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_ij
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, **_TUNING)
@triton.jit
def _attn_fwd(Q, K, V, O, LSE, qk_scale, Hq, N, N_BUCKET, WINDOW, GROUP, HEAD_DIM: tl.constexpr,
              CAUSAL: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_M queries of one (batch, query head); writes O rows and their base-2 LSE."""
    pid_m = tl.program_id(0)
    if CAUSAL:  # longest rows first, so the short ones fill the tail of the launch
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    h_kv = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _tile(Q, b, h, start_m, BLOCK_M, HEAD_DIM)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    lo, mid_lo, mid_hi, hi = _key_ranges(start_m, N, WINDOW, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, b, h_kv, offs_m, lo, mid_lo, N, WINDOW, qk_scale, True,
                                    CAUSAL, BLOCK_N, HEAD_DIM, PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, b, h_kv, offs_m, mid_lo, mid_hi, N, WINDOW, qk_scale,
                                    False, CAUSAL, BLOCK_N, HEAD_DIM, PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, b, h_kv, offs_m, mid_hi, hi, N, WINDOW, qk_scale, True,
                                    CAUSAL, BLOCK_N, HEAD_DIM, PRECISION)
    o = (acc / l_i[:, None]).to(q.dtype)
    O.store([b, h, start_m, 0], o.reshape(1, 1, BLOCK_M, HEAD_DIM))
    tl.store(LSE + bh.to(tl.int64) * N + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < N)


# ----------------------------------------------------------------------------------------------------
# Backward: delta = rowsum(dO * O), then dK/dV per key block and dQ per query block.


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don, Hq, N,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None] < N
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :], mask=rows,
                other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :], mask=rows,
                 other=0.0)
    tl.store(DELTA + bh.to(tl.int64) * N + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs_m < N)


@triton.autotune(configs=_DKDV_CONFIGS, **_TUNING)
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, qk_scale, sm_scale, Hq, Hkv, N, N_BUCKET, WINDOW, GROUP,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_N keys of one (batch, kv head). A single loop runs over (query head of the group,
    query block) pairs, masking only blocks on the causal diagonal or window edge: one pipelined loop rather
    than a loop per range keeps K and V from being copied into registers once per loop."""
    bh = tl.program_id(1)
    b = bh // Hkv
    h_kv = bh % Hkv
    start_n = tl.program_id(0) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _tile(K, b, h_kv, start_n, BLOCK_N, HEAD_DIM)
    v = _tile(V, b, h_kv, start_n, BLOCK_N, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    if CAUSAL:  # queries that see these keys: start_n <= i < start_n + BLOCK_N + WINDOW - 1
        lo = start_n
        hi = tl.minimum(start_n + BLOCK_N + WINDOW - 1, N)
    else:
        lo = 0
        hi = N
    n_blocks = tl.cdiv(hi - lo, BLOCK_M)
    for step in range(GROUP * n_blocks):
        g = step // n_blocks
        h = h_kv * GROUP + g
        start_m = lo + (step - g * n_blocks) * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        rows = (b * Hq + h).to(tl.int64) * N + offs_m
        q = _tile(Q, b, h, start_m, BLOCK_M, HEAD_DIM)
        lse = tl.load(LSE + rows, mask=offs_m < N, other=0.0)
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])  # (BN, BM)
        # rows past N need no mask here: their zero q, do and delta add nothing to dK/dV
        if CAUSAL:
            if (start_m < start_n + BLOCK_N) | (start_m + BLOCK_M - WINDOW > start_n):  # diagonal | window edge
                p_t = tl.where(tl.trans(_visible(offs_m, offs_n, N, WINDOW, CAUSAL)), p_t, 0.0)
        do = _tile(DO, b, h, start_m, BLOCK_M, HEAD_DIM)
        delta = tl.load(DELTA + rows, mask=offs_m < N, other=0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M)
        ds_t = (p_t * (dp_t - delta[None, :]) * sm_scale).to(q.dtype)  # dS^T, softmax scale folded in
        dk = tl.dot(ds_t, q, dk, input_precision=PRECISION)
    DK.store([b, h_kv, start_n, 0], dk.to(k.dtype).reshape(1, 1, BLOCK_N, HEAD_DIM))
    DV.store([b, h_kv, start_n, 0], dv.to(v.dtype).reshape(1, 1, BLOCK_N, HEAD_DIM))


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, K, V, b, h_kv, offs_m, lo, hi, N, WINDOW, qk_scale,
                       EDGE: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                       PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        k = _tile(K, b, h_kv, start_n, BLOCK_N, HEAD_DIM)
        v = _tile(V, b, h_kv, start_n, BLOCK_N, HEAD_DIM)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])  # (BM, BN)
        if EDGE:
            p = tl.where(_visible(offs_m, start_n + tl.arange(0, BLOCK_N), N, WINDOW, CAUSAL), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.autotune(configs=_DQ_CONFIGS, **_TUNING)
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, qk_scale, sm_scale, Hq, N, N_BUCKET, WINDOW, GROUP,
                 HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_M queries of one (batch, query head); streams keys and writes dQ."""
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    h_kv = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _tile(Q, b, h, start_m, BLOCK_M, HEAD_DIM)
    do = _tile(DO, b, h, start_m, BLOCK_M, HEAD_DIM)
    lse = tl.load(LSE + bh.to(tl.int64) * N + offs_m, mask=offs_m < N, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * N + offs_m, mask=offs_m < N, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    lo, mid_lo, mid_hi, hi = _key_ranges(start_m, N, WINDOW, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, K, V, b, h_kv, offs_m, lo, mid_lo, N, WINDOW, qk_scale, True,
                            CAUSAL, BLOCK_N, HEAD_DIM, PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, K, V, b, h_kv, offs_m, mid_lo, mid_hi, N, WINDOW, qk_scale, False,
                            CAUSAL, BLOCK_N, HEAD_DIM, PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, K, V, b, h_kv, offs_m, mid_hi, hi, N, WINDOW, qk_scale, True,
                            CAUSAL, BLOCK_N, HEAD_DIM, PRECISION)
    DQ.store([b, h, start_m, 0], (dq * sm_scale).to(q.dtype).reshape(1, 1, BLOCK_M, HEAD_DIM))


# ----------------------------------------------------------------------------------------------------
# Launchers and the autograd Function


def _desc(x: torch.Tensor) -> TensorDescriptor:
    """Descriptor over a (B, H, N, D) tensor; the tile shape is set per config by _set_block_shapes."""
    return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, 16, x.shape[3]])


def _common(q, k, causal, window):
    """Scalar kernel arguments shared by the three tuned kernels."""
    n = q.shape[2]
    return dict(N=n, N_BUCKET=max(1024, triton.next_power_of_2(n)),  # tune once per power-of-two bucket
                WINDOW=window if causal and window > 0 else n + 256,  # >= N + BLOCK_M masks nothing
                GROUP=q.shape[1] // k.shape[1], HEAD_DIM=q.shape[3], CAUSAL=causal,
                PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32")


def _gluon_forward_applies(q: torch.Tensor, window: int) -> bool:
    """The Gluon forward (flash_attention_gluon.py, FlashAttention-3 style) covers Hopper at D = 128 in 16 bits,
    causal or not, without a window; it is verified on Triton 3.6 only (Gluon's API moves between releases)."""
    return (GLUON and window == 0 and q.shape[3] == 128 and q.dtype in (torch.float16, torch.bfloat16)
            and q.is_cuda and torch.cuda.get_device_capability(q.device) == (9, 0))


def _forward(q, k, v, causal, window, sm_scale):
    if _gluon_forward_applies(q, window):
        return flash_attention_forward_gluon(q, k, v, causal, sm_scale)
    B, Hq, N, _ = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((B, Hq, N), device=q.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * Hq)
    _attn_fwd[grid](_desc(q), _desc(k), _desc(v), _desc(o), lse, sm_scale * LOG2E, Hq, **_common(q, k, causal, window))
    return o, lse


def _backward(do, q, k, v, o, lse, causal, window, sm_scale):
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    delta = torch.empty_like(lse)
    _attn_bwd_delta[(triton.cdiv(N, 64), B * Hq)](o, do, delta, *o.stride()[:3], *do.stride()[:3], Hq, N,
                                                  HEAD_DIM=D, BLOCK_M=64)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = _common(q, k, causal, window)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B * Hkv)
    _attn_bwd_dkdv[grid](_desc(q), _desc(k), _desc(v), _desc(do), lse, delta, _desc(dk), _desc(dv), sm_scale * LOG2E,
                         sm_scale, Hq, Hkv, **common)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * Hq)
    _attn_bwd_dq[grid](_desc(q), _desc(k), _desc(v), _desc(do), lse, delta, _desc(dq), sm_scale * LOG2E, sm_scale,
                       Hq, **common)
    return dq, dk, dv


def _tma_ready(x: torch.Tensor) -> torch.Tensor:
    """x itself if a tensor descriptor can address it (unit last stride, 16-byte aligned base and strides),
    else a contiguous copy."""
    aligned = x.data_ptr() % 16 == 0 and all(s * x.element_size() % 16 == 0 for s in x.stride()[:3])
    return x if x.stride(3) == 1 and aligned else x.clone(memory_format=torch.contiguous_format)


class FlashAttention(torch.autograd.Function):
    """Autograd wrapper: forward saves (q, k, v, o, lse); backward returns dq, dk, dv in the inputs' dtypes."""

    @staticmethod
    def forward(ctx, q, k, v, causal, window, sm_scale):
        q, k, v = _tma_ready(q), _tma_ready(k), _tma_ready(v)
        o, lse = _forward(q, k, v, causal, window, sm_scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.window, ctx.sm_scale = causal, window, sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(_tma_ready(do), q, k, v, o, lse, ctx.causal, ctx.window, ctx.sm_scale)
        return dq, dk, dv, None, None, None


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """True when the kernel handles these inputs: 4-D, same N, Hq % Hkv == 0, D in HEAD_DIMS, fp16/bf16/fp32,
    on CUDA (or on CPU under TRITON_INTERPRET=1)."""
    if not (q.dim() == k.dim() == v.dim() == 4 and k.shape == v.shape):
        return False
    (B, Hq, N, D), (Bk, Hkv, Nk, Dk) = q.shape, k.shape
    same = q.dtype == k.dtype == v.dtype and q.device == k.device == v.device
    on_device = runs_kernels(q)
    return (same and on_device and B == Bk and N == Nk and N > 0 and D == Dk and D in HEAD_DIMS
            and Hkv > 0 and Hq % Hkv == 0 and q.dtype in (torch.float16, torch.bfloat16, torch.float32))


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, window: int = 0,
                    sm_scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * sm_scale + mask) v for q (B, Hq, N, D), k/v (B, Hkv, N, D); returns (B, Hq, N, D) in q's
    dtype (and q's memory layout). window > 0 (needs causal) limits query i to keys i - window < j <= i."""
    if window < 0 or (window > 0 and not causal):
        raise ValueError(f"window={window}: expected 0 (off) or a positive window with causal=True")
    if sm_scale is not None and not sm_scale > 0:
        raise ValueError(f"sm_scale={sm_scale}: expected a positive softmax scale (or None for 1/sqrt(D))")
    if not supports(q, k, v):
        raise ValueError(f"flash_attention: unsupported q {tuple(q.shape)} {q.dtype} {q.device}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}; expected (B, Hq, N, D) / (B, Hkv, N, D), D in {HEAD_DIMS}, check supports()")
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return FlashAttention.apply(q, k, v, causal, window, scale)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, window: int = 0,
                        sm_scale: float | None = None) -> torch.Tensor:
    """The PyTorch function flash_attention must equal: SDPA with enable_gqa, plus a sliding-window mask."""
    if window <= 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=sm_scale, enable_gqa=True)
    i = torch.arange(q.shape[2], device=q.device)[:, None]
    j = torch.arange(k.shape[2], device=q.device)[None, :]
    mask = (j <= i) & (j > i - window)  # (N, N), True = attend
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=sm_scale, enable_gqa=True)
