"""Flash attention forward for Hopper (sm_90) in Gluon, FlashAttention-3 style: `kernels/flash_attention.py`
runs it instead of its Triton forward at D = 128 in 16 bits without a window, on Triton 3.6.

`flash_attention_forward_gluon(q, k, v, causal, sm_scale)` returns (o, lse) with the conventions of
`kernels.flash_attention._attn_fwd`: q (B, Hq, N, 128), k/v (B, Hkv, N, 128) in bf16/fp16, Hq % Hkv == 0
(query head h reads kv head h // (Hq // Hkv), K/V never repeated); o like q; lse (B, Hq, N) fp32, the base-2
log-sum-exp of the scaled scores (softmax in base 2, log2(e) folded into the scale), so the Triton backward
consumes it unchanged. Any N: TMA zero-fills rows past N and clips the O store.

Why Gluon: Triton 3.6 waits on every wgmma before the softmax after it (bench/results/attention_notes.md). Here a consumer warpgroup
issues S_j = Q K_j^T and O += P_{j-1} V_{j-1} as async wgmma, waits for S_j alone (`warpgroup_mma_wait(1)`) and
runs the softmax of S_j while P_{j-1} V_{j-1} is on the tensor cores. K/V stream through STAGES shared-memory
slots filled by TMA, from a one-warp producer partition or issued by the consumer itself. With CONSUMERS=2 two
warpgroup partitions own 64 query rows each; PINGPONG makes them take turns issuing their wgmma, so one's
softmax runs under the other's matmuls.
"""
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

LOG2E = 1.4426950408889634
HEAD_DIM = 128

# Kernel arguments travel in three tuples: descs = (q, k, v, o) tensor descriptors over (B, H, N, D);
# smem = (q tiles (CONSUMERS, 1, 1, BLOCK_M / CONSUMERS, D), k and v slots (STAGES, 1, 1, BLOCK_N, D));
# bars = (q_ready[CONSUMERS], k_ready, v_ready, k_empty, v_empty [STAGES], turn[2]) mbarriers.


# ----------------------------------------------------------------------------------------------------
# Loads: K_j and V_j land in slot j % STAGES, each with its own ready barrier so that S_j can start before
# V_j lands; a slot is refilled once every wgmma that read it has completed.


@gluon.jit
def _load_tile(desc, bufs, ready, b, h, blk, STAGES: gl.constexpr, pred):
    """TMA rows [blk * BLOCK, (blk + 1) * BLOCK) of head (b, h) into slot blk % STAGES (skipped if not pred)."""
    slot = blk % STAGES
    mbarrier.expect(ready.index(slot), desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(desc, [b, h, blk * desc.block_type.shape[2], 0], ready.index(slot),
                                    bufs.index(slot), pred=pred)


@gluon.jit
def _load_q(descs, smem, bars, b, h, start_m):
    """Each consumer's query rows into its own tile."""
    q_desc = descs[0]
    CONSUMERS: gl.constexpr = smem[0].type.shape[0]
    for c in gl.static_range(CONSUMERS):
        mbarrier.expect(bars[0].index(c), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [b, h, start_m + c * q_desc.block_type.shape[2], 0],
                                        bars[0].index(c), smem[0].index(c))


@gluon.jit
def _producer(descs, smem, bars, b, h, h_kv, start_m, n_blocks, STAGES: gl.constexpr):
    """One warp: Q, then K_j and V_j for every key block, each once the consumers have freed its slot."""
    _load_q(descs, smem, bars, b, h, start_m)
    for j in range(n_blocks):
        phase = (j // STAGES) & 1
        mbarrier.wait(bars[3].index(j % STAGES), phase ^ 1)  # the first pass waits on the pre-completed phase
        _load_tile(descs[1], smem[1], bars[1], b, h_kv, j, STAGES, True)
        mbarrier.wait(bars[4].index(j % STAGES), phase ^ 1)
        _load_tile(descs[2], smem[2], bars[2], b, h_kv, j, STAGES, True)


@gluon.jit
def _free(which: gl.constexpr, descs, smem, bars, b, h_kv, blk, n_blocks, STAGES: gl.constexpr,
          PRODUCER: gl.constexpr):
    """The wgmma that read block blk's K (which=1) or V (which=2) slot is complete: hand the slot to the
    producer, or (no producer) refill it with block blk + STAGES right away."""
    if PRODUCER:
        mbarrier.arrive(bars[which + 2].index(blk % STAGES), count=1)
    else:
        _load_tile(descs[which], smem[which], bars[which], b, h_kv, blk + STAGES, STAGES, blk + STAGES < n_blocks)


@gluon.jit
def _wait_turn(bars, C: gl.constexpr, it, PINGPONG: gl.constexpr):
    """Ping-pong: consumer C waits until the other one has issued its wgmma of the previous turn (C=0 first)."""
    if PINGPONG:
        mbarrier.wait(bars[5].index(C), (it & 1) ^ (1 - C))


@gluon.jit
def _pass_turn(bars, C: gl.constexpr, PINGPONG: gl.constexpr):
    if PINGPONG:
        mbarrier.arrive(bars[5].index(1 - C), count=1)


# ----------------------------------------------------------------------------------------------------
# Consumer: softmax and the two wgmma per key block, for BLOCK_M / CONSUMERS query rows.


@gluon.jit
def _softmax(s, m_i, l_i, offs_m, start_n, N, qk_scale, MASKED: gl.constexpr, CAUSAL: gl.constexpr):
    """Online softmax of one (rows, BLOCK_N) score block in base 2: returns P (fp32), m, l and alpha, the factor
    that rescales the previous accumulator. Masked scores are -1e30 (finite: a row whose first block is all
    masked gets exp2(0) garbage that a later alpha of 0 wipes)."""
    if MASKED:
        BLOCK_N: gl.constexpr = s.type.shape[1]
        offs_n = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s.type.layout))
        if CAUSAL:  # keys past N are visible only to rows past N, which are never stored
            keep = offs_n[None, :] <= offs_m[:, None]
        else:
            keep = (offs_n < N)[None, :] & (offs_m >= 0)[:, None]  # the row term only broadcasts to 2-D
        s = gl.where(keep, s * qk_scale, -1.0e30)
        m_new = gl.maximum(m_i, gl.max(s, 1))
        s = s - m_new[:, None]
    else:
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        s = s * qk_scale - m_new[:, None]
    p = gl.exp2(s)
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, m_new, l_i, alpha


@gluon.jit
def _fence_after(x):
    """x unchanged, behind a CTA memory fence that depends on it. ptxas hoists `wgmma.wait_group 0` above the
    softmax when nothing pins it (seen in the sm_90 SASS of the warp-specialized kernel), which serializes
    P V with the exponentials; a fence on the row sum (computed from every P) keeps the wait after them."""
    return gl.inline_asm_elementwise("fence.acq_rel.cta;\n\tmov.b32 $0, $2;\n\tmov.b32 $1, $3;", "=r,=r,r,r", [x],
                                     dtype=gl.float32, is_pure=False, pack=2)


@gluon.jit
def _qk(q2d, smem, bars, j, s_layout: gl.constexpr, STAGES: gl.constexpr):
    """Issue S_j = Q K_j^T (async) once K_j has landed."""
    ROWS: gl.constexpr = q2d.type.shape[0]
    HEAD_D: gl.constexpr = q2d.type.shape[1]
    BLOCK_N: gl.constexpr = smem[1].type.shape[3]
    mbarrier.wait(bars[1].index(j % STAGES), (j // STAGES) & 1)
    k_t = smem[1].index(j % STAGES).reshape([BLOCK_N, HEAD_D]).permute((1, 0))  # (D, BLOCK_N)
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
    return warpgroup_mma(q2d, k_t, s_zero, use_acc=False, is_async=True)


@gluon.jit
def _pv(p, o, smem, bars, j, STAGES: gl.constexpr):
    """Issue O += P_j V_j (async, P from registers) once V_j has landed."""
    BLOCK_N: gl.constexpr = smem[2].type.shape[3]
    HEAD_D: gl.constexpr = smem[2].type.shape[4]
    mbarrier.wait(bars[2].index(j % STAGES), (j // STAGES) & 1)
    v = smem[2].index(j % STAGES).reshape([BLOCK_N, HEAD_D])
    return warpgroup_mma(p, v, o, is_async=True)


@gluon.jit
def _overlapped_block(j, o, p, m_i, l_i, q2d, descs, smem, bars, b, h_kv, offs_m, n_blocks, N, qk_scale,
                      C: gl.constexpr, MASKED: gl.constexpr, CAUSAL: gl.constexpr, STAGES: gl.constexpr,
                      PRODUCER: gl.constexpr, PINGPONG: gl.constexpr):
    """Key block j >= 1: issue S_j and O += P_{j-1} V_{j-1}, wait for S_j only, softmax S_j while the P V wgmma
    runs, then wait for it and rescale O. Returns O, P_j (the next wgmma's A operand), m, l."""
    BLOCK_N: gl.constexpr = smem[1].type.shape[3]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout([3, 0], [gl.num_warps(), 1], [16, BLOCK_N, 16])
    _wait_turn(bars, C, j - 1, PINGPONG)
    s_tok = _qk(q2d, smem, bars, j, s_layout, STAGES)
    o_tok = _pv(p, o, smem, bars, j - 1, STAGES)
    _pass_turn(bars, C, PINGPONG)
    s = warpgroup_mma_wait(1, deps=[s_tok])  # S_j done; P_{j-1} V_{j-1} still in flight
    _free(1, descs, smem, bars, b, h_kv, j, n_blocks, STAGES, PRODUCER)
    p_new, m_i, l_i, alpha = _softmax(s, m_i, l_i, offs_m, j * BLOCK_N, N, qk_scale, MASKED, CAUSAL)
    l_i = _fence_after(l_i)
    o, p = warpgroup_mma_wait(0, deps=[o_tok, p])
    _free(2, descs, smem, bars, b, h_kv, j - 1, n_blocks, STAGES, PRODUCER)
    o = o * gl.convert_layout(alpha, gl.SliceLayout(1, o.type.layout), assert_trivial=True)[:, None]
    p = gl.convert_layout(p_new.to(q2d.dtype), p.type.layout)
    return o, p, m_i, l_i


@gluon.jit
def _serial_block(j, o, m_i, l_i, q2d, descs, smem, bars, b, h_kv, offs_m, n_blocks, N, qk_scale,
                  C: gl.constexpr, MASKED: gl.constexpr, CAUSAL: gl.constexpr, STAGES: gl.constexpr,
                  PRODUCER: gl.constexpr, PINGPONG: gl.constexpr):
    """Key block j in FlashAttention-2 order (the baseline): S, softmax, O += P V, each wgmma waited at once."""
    BLOCK_N: gl.constexpr = smem[1].type.shape[3]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout([3, 0], [gl.num_warps(), 1], [16, BLOCK_N, 16])
    _wait_turn(bars, C, j, PINGPONG)
    s_tok = _qk(q2d, smem, bars, j, s_layout, STAGES)
    _pass_turn(bars, C, PINGPONG)
    s = warpgroup_mma_wait(0, deps=[s_tok])
    _free(1, descs, smem, bars, b, h_kv, j, n_blocks, STAGES, PRODUCER)
    p, m_i, l_i, alpha = _softmax(s, m_i, l_i, offs_m, j * BLOCK_N, N, qk_scale, MASKED, CAUSAL)
    o = o * gl.convert_layout(alpha, gl.SliceLayout(1, o.type.layout), assert_trivial=True)[:, None]
    p = gl.convert_layout(p.to(q2d.dtype), gl.DotOperandLayout(0, o.type.layout, 2))
    o, p = warpgroup_mma_wait(0, deps=[_pv(p, o, smem, bars, j, STAGES), p])
    _free(2, descs, smem, bars, b, h_kv, j, n_blocks, STAGES, PRODUCER)
    return o, m_i, l_i


@gluon.jit
def _consumer(descs, smem, bars, LSE, b, h, h_kv, bh, start_m, n_full, n_blocks, N, qk_scale, C: gl.constexpr,
              CAUSAL: gl.constexpr, STAGES: gl.constexpr, OVERLAP: gl.constexpr, PRODUCER: gl.constexpr,
              PINGPONG: gl.constexpr):
    """Consumer C (num_warps warps, one warpgroup per 64 rows): the key loop for its query rows, then O, LSE."""
    q_smem = smem[0].index(C)  # (1, 1, ROWS, D)
    ROWS: gl.constexpr = q_smem.type.shape[2]
    HEAD_D: gl.constexpr = q_smem.type.shape[3]
    BLOCK_N: gl.constexpr = smem[1].type.shape[3]
    o_layout: gl.constexpr = gl.NVMMADistributedLayout([3, 0], [gl.num_warps(), 1], [16, HEAD_D, 16])
    s_layout: gl.constexpr = gl.NVMMADistributedLayout([3, 0], [gl.num_warps(), 1], [16, BLOCK_N, 16])
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    if not PRODUCER:  # issue Q and the first STAGES key blocks here
        _load_q(descs, smem, bars, b, h, start_m)
        for i in gl.static_range(STAGES):
            _load_tile(descs[1], smem[1], bars[1], b, h_kv, i, STAGES, i < n_blocks)
            _load_tile(descs[2], smem[2], bars[2], b, h_kv, i, STAGES, i < n_blocks)
    start_c = start_m + C * ROWS
    offs_m = start_c + gl.arange(0, ROWS, layout=s_rows)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, s_rows)
    l_i = gl.zeros([ROWS], gl.float32, s_rows)
    o = gl.zeros([ROWS, HEAD_D], gl.float32, o_layout)
    q2d = q_smem.reshape([ROWS, HEAD_D])
    mbarrier.wait(bars[0].index(C), 0)
    if OVERLAP:
        # block 0 alone, always through the mask (it is the diagonal block of the first query block)
        s = warpgroup_mma_wait(0, deps=[_qk(q2d, smem, bars, 0, s_layout, STAGES)])
        _free(1, descs, smem, bars, b, h_kv, 0, n_blocks, STAGES, PRODUCER)
        p, m_i, l_i, alpha = _softmax(s, m_i, l_i, offs_m, 0, N, qk_scale, True, CAUSAL)
        p = gl.convert_layout(p.to(q2d.dtype), gl.DotOperandLayout(0, o_layout, 2))
        for j in range(1, n_full):
            o, p, m_i, l_i = _overlapped_block(j, o, p, m_i, l_i, q2d, descs, smem, bars, b, h_kv, offs_m, n_blocks,
                                               N, qk_scale, C, False, CAUSAL, STAGES, PRODUCER, PINGPONG)
        for j in range(gl.maximum(n_full, 1), n_blocks):
            o, p, m_i, l_i = _overlapped_block(j, o, p, m_i, l_i, q2d, descs, smem, bars, b, h_kv, offs_m, n_blocks,
                                               N, qk_scale, C, True, CAUSAL, STAGES, PRODUCER, PINGPONG)
        o, p = warpgroup_mma_wait(0, deps=[_pv(p, o, smem, bars, n_blocks - 1, STAGES), p])
        _free(2, descs, smem, bars, b, h_kv, n_blocks - 1, n_blocks, STAGES, PRODUCER)
    else:
        for j in range(0, n_full):
            o, m_i, l_i = _serial_block(j, o, m_i, l_i, q2d, descs, smem, bars, b, h_kv, offs_m, n_blocks, N,
                                        qk_scale, C, False, CAUSAL, STAGES, PRODUCER, PINGPONG)
        for j in range(n_full, n_blocks):
            o, m_i, l_i = _serial_block(j, o, m_i, l_i, q2d, descs, smem, bars, b, h_kv, offs_m, n_blocks, N,
                                        qk_scale, C, True, CAUSAL, STAGES, PRODUCER, PINGPONG)
    o = o / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout), assert_trivial=True)[:, None]
    gl.store(LSE + bh.to(gl.int64) * N + offs_m, m_i + gl.log2(l_i), mask=offs_m < N)
    q2d.store(o.to(q2d.dtype))  # the Q tile is free once the last S wgmma is done: stage O there
    fence_async_shared()
    tma.async_copy_shared_to_global(descs[3], [b, h, start_c, 0], q_smem)
    tma.store_wait(0)


@gluon.jit
def _attn_fwd_gluon(q_desc, k_desc, v_desc, o_desc, LSE, qk_scale, Hq, N, GROUP, CAUSAL: gl.constexpr,
                    STAGES: gl.constexpr, CONSUMERS: gl.constexpr, OVERLAP: gl.constexpr, PRODUCER: gl.constexpr,
                    PINGPONG: gl.constexpr):
    """One program: CONSUMERS x (rows of q_desc) queries of one (batch, query head)."""
    BLOCK_M: gl.constexpr = CONSUMERS * q_desc.block_type.shape[2]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[2]
    gl.static_assert(PRODUCER or CONSUMERS == 1, "two consumer partitions need the producer partition")
    gl.static_assert(CONSUMERS == 2 or not PINGPONG, "ping-pong needs two consumers")
    pid_m = gl.program_id(0)
    if CAUSAL:  # longest rows first, so the short ones fill the tail of the launch
        pid_m = gl.num_programs(0) - 1 - pid_m
    bh = gl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    h_kv = h // GROUP
    start_m = pid_m * BLOCK_M
    if CAUSAL:  # keys [0, start_m) unmasked, [start_m, min(start_m + BLOCK_M, N)) through the mask
        n_full = start_m // BLOCK_N
        n_blocks = gl.cdiv(gl.minimum(start_m + BLOCK_M, N), BLOCK_N)
    else:
        n_full = N // BLOCK_N
        n_blocks = gl.cdiv(N, BLOCK_N)

    smem = (gl.allocate_shared_memory(q_desc.dtype, [CONSUMERS] + q_desc.block_type.shape, q_desc.layout),
            gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout),
            gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout))
    bars = (gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout()),
            gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout()),
            gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout()),
            gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout()),
            gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout()),
            gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout()))
    for c in gl.static_range(CONSUMERS):
        mbarrier.init(bars[0].index(c), count=1)
    for i in gl.static_range(STAGES):
        for r in gl.static_range(1, 5):  # k_empty / v_empty need an arrival from every consumer
            mbarrier.init(bars[r].index(i), count=1 if r < 3 else CONSUMERS)
    for c in gl.static_range(2):
        mbarrier.init(bars[5].index(c), count=1)
    descs = (q_desc, k_desc, v_desc, o_desc)

    if CONSUMERS == 2:
        gl.warp_specialize([
            (_consumer, (descs, smem, bars, LSE, b, h, h_kv, bh, start_m, n_full, n_blocks, N, qk_scale, 0, CAUSAL,
                         STAGES, OVERLAP, PRODUCER, PINGPONG)),
            (_consumer, (descs, smem, bars, LSE, b, h, h_kv, bh, start_m, n_full, n_blocks, N, qk_scale, 1, CAUSAL,
                         STAGES, OVERLAP, PRODUCER, PINGPONG)),
            (_producer, (descs, smem, bars, b, h, h_kv, start_m, n_blocks, STAGES)),
        ], [gl.num_warps(), 1], [240, 24])
    elif PRODUCER:
        gl.warp_specialize([
            (_consumer, (descs, smem, bars, LSE, b, h, h_kv, bh, start_m, n_full, n_blocks, N, qk_scale, 0, CAUSAL,
                         STAGES, OVERLAP, PRODUCER, PINGPONG)),
            (_producer, (descs, smem, bars, b, h, h_kv, start_m, n_blocks, STAGES)),
        ], [1], [24])
    else:
        _consumer(descs, smem, bars, LSE, b, h, h_kv, bh, start_m, n_full, n_blocks, N, qk_scale, 0, CAUSAL, STAGES,
                  OVERLAP, PRODUCER, PINGPONG)


# ----------------------------------------------------------------------------------------------------
# Launcher

# (BLOCK_M, BLOCK_N, STAGES, CONSUMERS, OVERLAP, PRODUCER, PINGPONG); CONSUMERS=1 runs BLOCK_M / 16 warps in one
# partition, CONSUMERS=2 one warpgroup per partition (+ the producer warp: 168 registers at launch, 240 per
# consumer after setmaxnreg, no spills, 164 KB shared memory at 128x128 with 2 stages). The other settings are
# the alternatives bench/gluon_fwd_check.py times (results: bench/results/attention_notes.md).
DEFAULT_CONFIG = (128, 128, 2, 2, True, True, True)


def flash_attention_forward_gluon(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                                  sm_scale: float | None = None, config: tuple = DEFAULT_CONFIG):
    """(o, lse) for q (B, Hq, N, 128), k/v (B, Hkv, N, 128) bf16/fp16 on an sm_90 GPU; o (B, Hq, N, 128) like q,
    lse (B, Hq, N) fp32 base-2 log-sum-exp of q k^T * sm_scale (as `kernels.flash_attention._forward`)."""
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    if not (D == HEAD_DIM and k.shape == v.shape == (B, Hkv, N, D) and Hq % Hkv == 0
            and q.dtype == k.dtype == v.dtype and q.dtype in (torch.bfloat16, torch.float16) and q.is_cuda):
        raise ValueError(f"flash_attention_forward_gluon: q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}; expected CUDA bf16/fp16 (B, Hq, N, {HEAD_DIM}) / (B, Hkv, N, "
                         f"{HEAD_DIM}) with Hq % Hkv == 0")
    block_m, block_n, stages, consumers, overlap, producer, pingpong = config
    scale = sm_scale if sm_scale is not None else D ** -0.5
    o = torch.empty_like(q)  # q's strides: any layout a tensor descriptor can address (16-byte aligned, unit last)
    lse = torch.empty((B, Hq, N), device=q.device, dtype=torch.float32)
    dtype = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16

    def desc(x, rows):
        block = [1, 1, rows, D]
        return TensorDescriptor(x, list(x.shape), list(x.stride()), block,
                                gl.NVMMASharedLayout.get_default_for(block, dtype))

    rows = block_m // consumers
    _attn_fwd_gluon[(triton.cdiv(N, block_m), B * Hq)](
        desc(q, rows), desc(k, block_n), desc(v, block_n), desc(o, rows), lse, scale * LOG2E, Hq, N, Hq // Hkv,
        CAUSAL=causal, STAGES=stages, CONSUMERS=consumers, OVERLAP=overlap, PRODUCER=producer, PINGPONG=pingpong,
        num_warps=4 if consumers == 2 else block_m // 16)
    return o, lse
