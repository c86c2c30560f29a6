"""The experts' grouped GEMMs for Hopper (sm_90) in Gluon, warp specialised; the experts run them on Triton 3.6.
`grouped_mm_gluon(x, w, tiles)` equals `kernels.grouped_gemm.grouped_mm` (same tile map) and
`grouped_mm_weight_grad_gluon(x, grad, ends)` equals torch._grouped_mm(x.t(), grad, offs=ends). Why: one producer
warp streams every tile's blocks through a ring of STAGES slots, so the next tile's loads land while the consumers
run the epilogue (the Triton kernel starts each tile empty). Measurements: bench/results/moe_notes.md.
"""
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .runtime import descriptor_scratch

# Kernel arguments travel in tuples: descs = (a, b, c) tensor descriptors; smem = (a slots, b slots (STAGES, ...),
# the output tile); bars = (ready, empty) mbarriers, one each a slot; plan = (ENDS, TILE_ENDS, E, N, K), the
# segment and M-tile ends of `expert_tiles` and the GEMM's sizes.


@gluon.jit
def _tile(t, plan, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr,
          SEARCH_STEPS: gl.constexpr):
    """Tile number t -> (expert, first row, the expert's end row, first column): GROUP_M M-tiles sweep N
    together; a binary search over the prefix-summed tile counts finds the M-tile's expert."""
    ENDS, TILE_ENDS, E, N = plan[0], plan[1], plan[2], plan[3]
    num_m_tiles = gl.load(TILE_ENDS + E - 1)
    per_group = GROUP_M * gl.cdiv(N, BLOCK_N)
    first_m = (t // per_group) * GROUP_M
    size_m = gl.minimum(num_m_tiles - first_m, GROUP_M)
    tm = first_m + (t % per_group) % size_m
    lo = tm * 0
    hi = lo + E
    for _ in gl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        right = gl.load(TILE_ENDS + gl.minimum(mid, E - 1)) <= tm
        lo = gl.where(right, mid + 1, lo)
        hi = gl.where(right, hi, mid)
    end = gl.load(ENDS + lo)
    start = gl.load(ENDS + gl.maximum(lo - 1, 0), mask=lo > 0, other=0)
    first_tile = gl.load(TILE_ENDS + lo) - gl.cdiv(end - start, BLOCK_M)
    return lo, start + (tm - first_tile) * BLOCK_M, end, (t % per_group) // size_m * BLOCK_N


# ----------------------------------------------------------------------------------------------------
# The ring: block number `count` (counted over all of a program's tiles) goes through slot count % STAGES; its
# ready barrier flips when both TMA loads have landed, its empty barrier when the wgmma that read it is done.


@gluon.jit
def _allocate(a_desc, b_desc, c_desc, STAGES: gl.constexpr):
    """Shared memory (STAGES A and B slots, the output tile) and the slots' ready and empty barriers."""
    smem = (gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout),
            gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout),
            gl.allocate_shared_memory(c_desc.dtype, c_desc.block_type.shape, c_desc.layout))
    bars = (gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout()),
            gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout()))
    for s in gl.static_range(STAGES):
        mbarrier.init(bars[0].index(s), count=1)
        mbarrier.init(bars[1].index(s), count=1)
    return smem, bars

@gluon.jit
def _load_block(a_desc, a_coords, b_desc, b_coords, smem, bars, count):
    """Producer: TMA one A and one B block into the next slot once it is free. Returns count + 1."""
    STAGES: gl.constexpr = smem[0].type.shape[0]
    slot = count % STAGES
    mbarrier.wait(bars[1].index(slot), ((count // STAGES) & 1) ^ 1)  # a fresh slot passes at once
    ready = bars[0].index(slot)
    mbarrier.expect(ready, a_desc.block_type.nbytes + b_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(a_desc, a_coords, ready, smem[0].index(slot))
    tma.async_copy_global_to_shared(b_desc, b_coords, ready, smem[1].index(slot))
    return count + 1


@gluon.jit
def _main_loop(smem, bars, acc, count, n_k, TRANS_A: gl.constexpr, TRANS_B: gl.constexpr):
    """Consumer: the sum over n_k blocks from the ring of A (or A's transpose) times B (or B's transpose), into
    the fp32 acc (zeros: its values are not added). Keeps one wgmma in flight and frees each slot once the wgmma
    that read it is done. Returns (acc, count + n_k)."""
    STAGES: gl.constexpr = smem[0].type.shape[0]
    for kb in range(n_k):
        slot = count % STAGES
        mbarrier.wait(bars[0].index(slot), (count // STAGES) & 1)
        a = smem[0].index(slot)
        b = smem[1].index(slot)
        if TRANS_A:
            a = a.permute((1, 0))
        if TRANS_B:
            b = b.permute((1, 0))
        acc = warpgroup_mma(a, b, acc, use_acc=kb > 0, is_async=True)
        acc = warpgroup_mma_wait(1, deps=[acc])  # the previous block's wgmma is done: free its slot
        mbarrier.arrive(bars[1].index((count + STAGES - 1) % STAGES), pred=kb > 0)
        count += 1
    acc = warpgroup_mma_wait(0, deps=[acc])
    mbarrier.arrive(bars[1].index((count + STAGES - 1) % STAGES), pred=n_k > 0)
    return acc, count


@gluon.jit
def _producer(descs, smem, bars, plan, num_tiles, TRANS_B: gl.constexpr, GROUP_M: gl.constexpr,
              SEARCH_STEPS: gl.constexpr, NUM_PROGRAMS: gl.constexpr):
    """One warp: the A and B blocks of every tile of this program, in order, each into the next free slot."""
    a_desc, b_desc, c_desc = descs
    BLOCK_M: gl.constexpr = c_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = c_desc.block_type.shape[1]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    N, K = plan[3], plan[4]
    n_k = gl.cdiv(K, BLOCK_K)
    count = 0
    for t in range(gl.program_id(0), num_tiles, NUM_PROGRAMS):
        e, row0, _, col0 = _tile(t, plan, BLOCK_M, BLOCK_N, GROUP_M, SEARCH_STEPS)
        for kb in range(n_k):
            if TRANS_B:
                b_coords = [e * N + col0, kb * BLOCK_K]
            else:
                b_coords = [e * K + kb * BLOCK_K, col0]
            count = _load_block(a_desc, [row0, kb * BLOCK_K], b_desc, b_coords, smem, bars, count)


@gluon.jit
def _store_tile(c_desc, C, n_cols, ld, out, row0, col0, row_end):
    """TMA store of one output tile from shared memory into c_desc, the (rows, n_cols) matrix at C with leading
    dimension ld; when its last rows are the next expert's, through a descriptor made here that ends at row_end,
    which TMA clips to."""
    if row0 + c_desc.block_type.shape[0] <= row_end:
        tma.async_copy_shared_to_global(c_desc, [row0, col0], out)
    else:
        clipped = tma.make_tensor_descriptor(C, [row_end, n_cols], [ld, 1], c_desc.block_type.shape, c_desc.layout)
        tma.async_copy_shared_to_global(clipped, [row0, col0], out)


@gluon.jit
def _consumer(descs, C, smem, bars, plan, num_tiles, TRANS_B: gl.constexpr, GROUP_M: gl.constexpr,
              SEARCH_STEPS: gl.constexpr, NUM_PROGRAMS: gl.constexpr):
    """Two warpgroups (64 rows each): every tile of this program, main loop then epilogue."""
    a_desc, b_desc, c_desc = descs
    BLOCK_M: gl.constexpr = c_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = c_desc.block_type.shape[1]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout([3, 0], [gl.num_warps(), 1], [16, BLOCK_N, 16])
    N, K = plan[3], plan[4]
    n_k = gl.cdiv(K, BLOCK_K)
    out = smem[2]
    count = 0  # blocks taken from the ring so far
    for t in range(gl.program_id(0), num_tiles, NUM_PROGRAMS):
        _, row0, row_end, col0 = _tile(t, plan, BLOCK_M, BLOCK_N, GROUP_M, SEARCH_STEPS)
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_layout)
        acc, count = _main_loop(smem, bars, acc, count, n_k, False, TRANS_B)
        tma.store_wait(0)  # the previous tile has left shared memory
        out.store(acc.to(c_desc.dtype))
        fence_async_shared()
        _store_tile(c_desc, C, N, N, out, row0, col0, row_end)
    tma.store_wait(0)


@gluon.jit
def _grouped_mm_gluon_kernel(a_desc, b_desc, c_desc, C, ENDS, TILE_ENDS, E, N, K, TRANS_B: gl.constexpr,
                             STAGES: gl.constexpr, GROUP_M: gl.constexpr, SEARCH_STEPS: gl.constexpr,
                             NUM_PROGRAMS: gl.constexpr):
    BLOCK_N: gl.constexpr = c_desc.block_type.shape[1]
    smem, bars = _allocate(a_desc, b_desc, c_desc, STAGES)
    descs = (a_desc, b_desc, c_desc)
    plan = (ENDS, TILE_ENDS, E, N, K)
    num_tiles = gl.load(TILE_ENDS + E - 1) * gl.cdiv(N, BLOCK_N)
    gl.warp_specialize([
        (_consumer, (descs, C, smem, bars, plan, num_tiles, TRANS_B, GROUP_M, SEARCH_STEPS, NUM_PROGRAMS)),
        (_producer, (descs, smem, bars, plan, num_tiles, TRANS_B, GROUP_M, SEARCH_STEPS, NUM_PROGRAMS)),
    ], [1], [24])


# Both kernels: a 128 x 256 tile (128 accumulator registers a thread) over 64-wide K blocks, three 48 KB slots and
# the 64 KB output tile, 208 KB of shared memory; GROUP_M M-tiles sweep N together (alternatives timed:
# bench/results/moe_notes.md). BLOCK_M is the Triton kernel's, so that both read one expert_tiles map.
BM, BN, BK, STAGES, GROUP_M = 128, 256, 64, 3, 8


def _desc(t: torch.Tensor, block: list[int]) -> TensorDescriptor:
    """A TMA descriptor over t (16-bit) with its block's default NVMMA shared layout."""
    dtype = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, dtype))


def _persistent_programs(device: torch.device, max_tiles: int) -> int:
    """One program an SM (fewer if there are fewer tiles), each striding over the tiles. Also gives Triton the
    global memory the kernels' device-made descriptors need."""
    triton.set_allocator(descriptor_scratch)
    return max(1, min(torch.cuda.get_device_properties(device).multi_processor_count, max_tiles))


def grouped_mm_gluon(x: torch.Tensor, w: torch.Tensor, tiles: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Row segment e of x (R, K) times w[e] (K, N) -> (R, N) in x's dtype, for tiles = expert_tiles(segment
    sizes); w may be a transposed view of (E, N, K) weights. Rows past the segments are not written. Hopper
    only, 16-bit, K and N multiples of 8 (`kernels.grouped_gemm.tma_applies`)."""
    (R, K), (E, _, N) = x.shape, w.shape
    trans_b = w.stride(2) != 1
    b_desc = _desc(w.transpose(1, 2).reshape(E * N, K), [BN, BK]) if trans_b else _desc(w.reshape(E * K, N), [BK, BN])
    out = x.new_empty(R, N)
    programs = _persistent_programs(x.device, (triton.cdiv(R, BM) + E) * triton.cdiv(N, BN))
    _grouped_mm_gluon_kernel[(programs,)](_desc(x, [BM, BK]), b_desc, _desc(out, [BM, BN]), out, *tiles, E, N, K,
                                          TRANS_B=trans_b, STAGES=STAGES, GROUP_M=GROUP_M,
                                          SEARCH_STEPS=E.bit_length(), NUM_PROGRAMS=programs, num_warps=8)
    return out


# ----------------------------------------------------------------------------------------------------
# Weight gradient: per expert e, x_e^T grad_e (K, N), summed over the expert's rows (K-grouped).


@gluon.jit
def _weight_tile(t, ENDS, K, N, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """Tile t -> (expert, its first row, its end row, first row of the (K, N) gradient, first column). An expert's
    tiles are consecutive, so the programs working at once share its rows in L2."""
    n_tiles_n = gl.cdiv(N, BLOCK_N)
    per_expert = gl.cdiv(K, BLOCK_M) * n_tiles_n
    e = t // per_expert
    r = t % per_expert
    start = gl.load(ENDS + gl.maximum(e - 1, 0), mask=e > 0, other=0)
    return e, start, gl.load(ENDS + e), (r // n_tiles_n) * BLOCK_M, (r % n_tiles_n) * BLOCK_N


@gluon.jit
def _weight_producer(descs, X, G, smem, bars, ENDS, num_tiles, K, N, NUM_PROGRAMS: gl.constexpr):
    """One warp: the row blocks of x (BLOCK_K, BLOCK_M) and grad (BLOCK_K, BLOCK_N) of every tile, through
    descriptors made here that end at the expert's last row: past it TMA reads zeros, not the next expert's rows
    (or the unwritten rows past every segment)."""
    x_desc, g_desc, c_desc = descs
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[0]
    count = 0
    for t in range(gl.program_id(0), num_tiles, NUM_PROGRAMS):
        e, start, end, m0, n0 = _weight_tile(t, ENDS, K, N, c_desc.block_type.shape[1], c_desc.block_type.shape[2])
        rows = gl.maximum(end, 1)  # a descriptor needs one row; an empty first expert loads none
        x_e = tma.make_tensor_descriptor(X, [rows, K], [K, 1], x_desc.block_type.shape, x_desc.layout)
        g_e = tma.make_tensor_descriptor(G, [rows, N], [N, 1], g_desc.block_type.shape, g_desc.layout)
        for kb in range(gl.cdiv(end - start, BLOCK_K)):
            count = _load_block(x_e, [start + kb * BLOCK_K, m0], g_e, [start + kb * BLOCK_K, n0], smem, bars, count)


@gluon.jit
def _weight_consumer(descs, smem, bars, ENDS, num_tiles, K, N, NUM_PROGRAMS: gl.constexpr):
    """Two warpgroups: every tile of this program, x_e^T grad_e block by block, then the TMA store."""
    x_desc, g_desc, c_desc = descs
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_M: gl.constexpr = c_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = c_desc.block_type.shape[2]
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout([3, 0], [gl.num_warps(), 1], [16, BLOCK_N, 16])
    out = smem[2]
    count = 0
    for t in range(gl.program_id(0), num_tiles, NUM_PROGRAMS):
        e, start, end, m0, n0 = _weight_tile(t, ENDS, K, N, BLOCK_M, BLOCK_N)
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_layout)
        acc, count = _main_loop(smem, bars, acc, count, gl.cdiv(end - start, BLOCK_K), True, False)
        tma.store_wait(0)
        out.reshape([BLOCK_M, BLOCK_N]).store(acc.to(c_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(c_desc, [e, m0, n0], out)  # clipped at K
    tma.store_wait(0)


@gluon.jit
def _weight_grad_gluon_kernel(x_desc, g_desc, c_desc, X, G, ENDS, E, K, N, STAGES: gl.constexpr,
                              NUM_PROGRAMS: gl.constexpr):
    smem, bars = _allocate(x_desc, g_desc, c_desc, STAGES)
    descs = (x_desc, g_desc, c_desc)
    num_tiles = E * gl.cdiv(K, c_desc.block_type.shape[1]) * gl.cdiv(N, c_desc.block_type.shape[2])
    gl.warp_specialize([
        (_weight_consumer, (descs, smem, bars, ENDS, num_tiles, K, N, NUM_PROGRAMS)),
        (_weight_producer, (descs, X, G, smem, bars, ENDS, num_tiles, K, N, NUM_PROGRAMS)),
    ], [1], [24])


def grouped_mm_weight_grad_gluon(x: torch.Tensor, grad: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Per expert e: x_e^T grad_e over its rows [ends[e - 1], ends[e]) -> (E, K, N) in x's dtype (zeros for an
    empty segment), for x (R, K), grad (R, N) and ends (E,) int32 the cumulative segment sizes (expert_tiles'
    first). What torch._grouped_mm(x.t(), grad, offs=ends) computes. Hopper only, 16-bit, K and N multiples of
    8."""
    K, N, E = x.shape[1], grad.shape[1], ends.shape[0]  # the tile: BM rows of K by BN columns, BK rows of x a block
    out = x.new_empty(E, K, N)
    programs = _persistent_programs(x.device, E * triton.cdiv(K, BM) * triton.cdiv(N, BN))
    _weight_grad_gluon_kernel[(programs,)](_desc(x, [BK, BM]), _desc(grad, [BK, BN]), _desc(out, [1, BM, BN]), x,
                                           grad, ends, E, K, N, STAGES=STAGES, NUM_PROGRAMS=programs, num_warps=8)
    return out
