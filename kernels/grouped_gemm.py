"""The expert MLP's kernels: a grouped GEMM over expert-ordered rows, and the SwiGLU activation between GEMMs.

`grouped_mm(x, w, expert_tiles(sizes))`: row segment e of x (R, K) times w[e] (K, N) (or a transposed view
of (E, N, K) weights); must equal `grouped_mm_reference` (a loop of matmuls, what torch._grouped_mm
computes). One persistent launch for all experts, no host sync: operands move by TMA, every BLOCK_M x
BLOCK_N output tile belongs to one expert (an expert's rows start a fresh tile; a binary search over the
prefix-summed tile counts finds it), and a tile whose last rows are the next expert's is stored through a
descriptor clipped at the expert's end. Rows past the segments are not written. On Hopper the experts run
their four row-grouped GEMMs (forward and input gradients) through it on Triton versions other than 3.6; on
3.6, through the warp-specialised Gluon kernel of grouped_gemm_gluon.py (same contract and tile map, which also
has the weight gradients' kernel): both are faster there than torch._grouped_mm
(bench/results/moe_gemm_shapes_*).

`swiglu(h13, row_weight)` = row_weight * silu(h1) * h3 for h13 = [h1 | h3] (the output of one GEMM against
[w1 | w3]); the optional row weight is the gate weight, applied here rather than to the expert's output so
the combine needs no saved output rows. `swiglu_backward` returns the recomputed product, [d/dh1 | d/dh3]
and the row weights' gradient: one pass each, in fp32 registers, so the expert MLP saves only h13. The
backward may write over its inputs (in_place=True): the MLP's does, which keeps its peak at three (rows, F)
buffers.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .runtime import GLUON, INTERPRET, descriptor_scratch

if GLUON:
    from .grouped_gemm_gluon import grouped_mm_gluon, grouped_mm_weight_grad_gluon  # noqa: F401


# The best tile of those timed (bench/results/moe_notes.md); small ones under the interpreter.
_HOPPER_TILE = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_stages=3, num_warps=8)
_INTERPRETER_TILE = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, num_stages=1, num_warps=4)
_GROUP_M = 8  # M-tiles that sweep N together, so their A rows and the expert's weights stay in L2


def _tile() -> dict:
    return dict(_INTERPRETER_TILE if INTERPRET else _HOPPER_TILE)


def tma_applies(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether grouped_mm runs for rows x and these weights: on a Hopper GPU, 16-bit, every dimension a multiple of
    8 (TMA's 16-byte strides)."""
    if INTERPRET or not x.is_cuda or torch.cuda.get_device_capability(x.device)[0] != 9:
        return False
    dims = [x.shape[-1]] + [d for w in weights for d in w.shape[1:]]
    return (x.dtype in (torch.float16, torch.bfloat16) and all(w.dtype == x.dtype for w in weights)
            and all(d % 8 == 0 for d in dims))


def expert_tiles(tokens_per_expert: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(segment ends, M-tile ends), both (E,) int32 and cumulative: how grouped_mm finds the expert of a tile.
    An expert's rows start a fresh BLOCK_M tile, so every tile belongs to one expert."""
    block_m = _tile()["BLOCK_M"]
    ends = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)
    return ends, torch.cumsum((tokens_per_expert + block_m - 1) // block_m, 0, dtype=torch.int32)


@triton.jit
def _tile_coords(tile, num_m_tiles, N, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Persistent tile number -> (M-tile, N-tile), GROUP_M M-tiles at a time sweeping N."""
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (tile // per_group) * GROUP_M
    size_m = tl.minimum(num_m_tiles - first_m, GROUP_M)
    return first_m + (tile % per_group) % size_m, (tile % per_group) // size_m


@triton.jit
def _expert_rows(tm, ENDS, TILE_ENDS, E, BLOCK_M: tl.constexpr, SEARCH_STEPS: tl.constexpr):
    """M-tile tm -> (its expert, its first row, the expert's end row); expert E past the last tile. A binary
    search for the first expert whose tiles end after tm."""
    lo = tm * 0
    hi = lo + E
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        right = tl.load(TILE_ENDS + mid, mask=mid < E, other=0x7FFFFFFF) <= tm
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(right, hi, mid)
    valid = lo < E
    end = tl.load(ENDS + lo, mask=valid, other=0)
    start = tl.load(ENDS + lo - 1, mask=valid & (lo > 0), other=0)
    first_tile = tl.load(TILE_ENDS + lo, mask=valid, other=0) - tl.cdiv(end - start, BLOCK_M)
    return lo, start + (tm - first_tile) * BLOCK_M, end


@triton.jit
def _mm_tile(a_desc, b_desc, e, row0, col0, K, N, TRANS_B: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 (BLOCK_M, BLOCK_N) tile of rows row0.. times expert e's weight (K, N) (stored (N, K) if TRANS_B),
    columns col0... Columns past K read zeros in a (so whatever the weight has there adds nothing)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k in range(0, K, BLOCK_K):
        a = a_desc.load([row0, k])
        if TRANS_B:
            b = b_desc.load([e * N + col0, k]).T
        else:
            b = b_desc.load([e * K + k, col0])
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _store_rows(desc, PTR, ld, tile, row0, col0, row_end, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Store a tile at (row0, col0) by TMA. When its last rows are the next expert's, through a descriptor made
    here that ends at row_end, which TMA clips to (a masked store would cost the epilogue ~130 registers)."""
    if row0 + BLOCK_M <= row_end:
        desc.store([row0, col0], tile)
    else:
        clipped = tl.make_tensor_descriptor(PTR, shape=[row_end, n_cols], strides=[ld, 1],
                                            block_shape=[BLOCK_M, BLOCK_N])
        clipped.store([row0, col0], tile)


@triton.jit
def _grouped_mm_kernel(a_desc, b_desc, c_desc, C, ENDS, TILE_ENDS, num_m_tiles, N, K, E, TRANS_B: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                       SEARCH_STEPS: tl.constexpr, NUM_PROGRAMS: tl.constexpr):
    for tile in tl.range(tl.program_id(0), num_m_tiles * tl.cdiv(N, BLOCK_N), NUM_PROGRAMS):
        tm, tn = _tile_coords(tile, num_m_tiles, N, BLOCK_N, GROUP_M)
        e, row0, row_end = _expert_rows(tm, ENDS, TILE_ENDS, E, BLOCK_M, SEARCH_STEPS)
        if e < E:
            acc = _mm_tile(a_desc, b_desc, e, row0, tn * BLOCK_N, K, N, TRANS_B, BLOCK_M, BLOCK_N, BLOCK_K)
            _store_rows(c_desc, C, N, acc.to(C.dtype.element_ty), row0, tn * BLOCK_N, row_end, N, BLOCK_M, BLOCK_N)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, tiles: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Row segment e of x (R, K) times w[e] (K, N) -> (R, N) in x's dtype, for tiles = expert_tiles(segment
    sizes); w may be a transposed view of (E, N, K) weights, as for an input gradient. Rows past the segments are
    not written. Equals `grouped_mm_reference` (and torch._grouped_mm)."""
    (R, K), (E, _, N) = x.shape, w.shape
    tile = _tile()
    BM, BN, BK = tile["BLOCK_M"], tile["BLOCK_N"], tile["BLOCK_K"]
    trans_b = w.stride(2) != 1
    desc = TensorDescriptor.from_tensor
    b_desc = desc(w.transpose(1, 2).reshape(E * N, K), [BN, BK]) if trans_b else desc(w.reshape(E * K, N), [BK, BN])
    out = x.new_empty(R, N)
    num_m_tiles = triton.cdiv(R, BM) + E  # static bound: each expert may start a fresh tile
    sms = 4 if INTERPRET else torch.cuda.get_device_properties(x.device).multi_processor_count
    programs = max(1, min(sms, num_m_tiles * triton.cdiv(N, BN)))  # persistent: each strides over the tiles
    if not INTERPRET:
        triton.set_allocator(descriptor_scratch)
    _grouped_mm_kernel[(programs,)](desc(x, [BM, BK]), b_desc, desc(out, [BM, BN]), out, *tiles, num_m_tiles, N, K,
                                    E, TRANS_B=trans_b, GROUP_M=_GROUP_M, SEARCH_STEPS=E.bit_length(),
                                    NUM_PROGRAMS=programs, **tile)
    return out


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """The loop grouped_mm must equal, in x's dtype; rows past the segments come out zero here."""
    out = x.new_zeros(x.shape[0], w.shape[2])
    start = 0
    for e, size in enumerate(tokens_per_expert.tolist()):
        out[start:start + size] = x[start:start + size] @ w[e]
        start += size
    return out


@triton.jit
def _swiglu_tile(H13, r, c, rows, F):
    """Rows r (int64) x columns c: their offsets in an (rows, F) buffer and in the (rows, 2F) buffer [h1 | h3],
    the mask, and h1, h3 in fp32."""
    mask = (r[:, None] < rows) & (c[None, :] < F)
    offs13 = r[:, None] * (2 * F) + c[None, :]
    h1 = tl.load(H13 + offs13, mask=mask, other=0.0).to(tl.float32)
    h3 = tl.load(H13 + offs13 + F, mask=mask, other=0.0).to(tl.float32)
    return r[:, None] * F + c[None, :], offs13, mask, h1, h3


@triton.jit
def _swiglu_kernel(H13, ROW_WEIGHT, OUT, rows, F, WEIGHTED: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_F: tl.constexpr):
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    c = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    offs, _, mask, h1, h3 = _swiglu_tile(H13, r, c, rows, F)
    out = h1 * tl.sigmoid(h1) * h3
    if WEIGHTED:
        out = out * tl.load(ROW_WEIGHT + r, mask=r < rows, other=0.0)[:, None]
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(H13, ROW_WEIGHT, GRAD, OUT, GRAD_H13, GRAD_ROW_WEIGHT, rows, F, WEIGHTED: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    """One program: BLOCK_R whole rows, so the weighted form can sum each row's weight gradient."""
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    if WEIGHTED:
        weight = tl.load(ROW_WEIGHT + r, mask=r < rows, other=0.0)[:, None]
    grad_weight = tl.zeros([BLOCK_R], tl.float32)
    for start in range(0, F, BLOCK_F):
        offs, offs13, mask, h1, h3 = _swiglu_tile(H13, r, start + tl.arange(0, BLOCK_F), rows, F)
        grad = tl.load(GRAD + offs, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(h1)
        silu = h1 * sig
        hidden = silu * h3
        if WEIGHTED:
            grad_weight += tl.sum(grad * hidden, 1)
            hidden = hidden * weight
            grad = grad * weight
        tl.store(OUT + offs, hidden.to(OUT.dtype.element_ty), mask=mask)
        tl.store(GRAD_H13 + offs13, (grad * h3 * sig * (1.0 + h1 * (1.0 - sig))).to(GRAD_H13.dtype.element_ty),
                 mask=mask)
        tl.store(GRAD_H13 + offs13 + F, (grad * silu).to(GRAD_H13.dtype.element_ty), mask=mask)
    if WEIGHTED:
        tl.store(GRAD_ROW_WEIGHT + r, grad_weight, mask=r < rows)


_BLOCK_R, _BLOCK_F = 8, 128  # 1024 elements a tile, 128 contiguous columns a row


def swiglu(h13: torch.Tensor, use_triton: bool, row_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """silu(h1) * h3 (rows, F) for h13 = [h1 | h3] (rows, 2F) contiguous, times row_weight (rows,) fp32 if given
    (the gate weight of each row), computed in fp32 (or wider) and returned in h13's dtype."""
    if not use_triton:
        h1, h3 = h13.to(torch.promote_types(h13.dtype, torch.float32)).chunk(2, dim=1)
        out = h1 * torch.sigmoid(h1) * h3  # the backward's recompute, operation for operation
        return (out if row_weight is None else out * row_weight[:, None].to(out.dtype)).to(h13.dtype)
    out = h13.new_empty(h13.shape[0], h13.shape[1] // 2)
    grid = (triton.cdiv(out.shape[0], _BLOCK_R), triton.cdiv(out.shape[1], _BLOCK_F))
    _swiglu_kernel[grid](h13, row_weight, out, out.shape[0], out.shape[1], WEIGHTED=row_weight is not None,
                         BLOCK_R=_BLOCK_R, BLOCK_F=_BLOCK_F, num_warps=4)
    return out


def swiglu_backward(h13: torch.Tensor, grad: torch.Tensor, use_triton: bool, row_weight: Optional[torch.Tensor] = None,
                    in_place: bool = False):
    """The backward of swiglu(h13, row_weight) given grad (rows, F) of its output: (its output recomputed,
    grad_h13 (rows, 2F), grad_row_weight (rows,) fp32 or None). in_place (Triton only) writes the first two
    over grad and h13."""
    if not use_triton:
        wide = torch.promote_types(h13.dtype, torch.float32)
        h1, h3 = h13.to(wide).chunk(2, dim=1)
        grad = grad.to(wide)
        sig = torch.sigmoid(h1)
        silu = h1 * sig
        hidden, grad_row_weight = silu * h3, None
        if row_weight is not None:
            grad_row_weight = (grad * hidden).sum(1).to(row_weight.dtype)
            hidden, grad = hidden * row_weight[:, None].to(wide), grad * row_weight[:, None].to(wide)
        grad_h13 = torch.cat([grad * h3 * sig * (1 + h1 * (1 - sig)), grad * silu], dim=1)
        return hidden.to(h13.dtype), grad_h13.to(h13.dtype), grad_row_weight
    out, grad_h13 = (grad, h13) if in_place else (torch.empty_like(grad), torch.empty_like(h13))
    grad_row_weight = None if row_weight is None else torch.empty_like(row_weight)
    _swiglu_backward_kernel[(triton.cdiv(h13.shape[0], _BLOCK_R),)](
        h13, row_weight, grad, out, grad_h13, grad_row_weight, h13.shape[0], grad.shape[1],
        WEIGHTED=row_weight is not None, BLOCK_R=_BLOCK_R, BLOCK_F=_BLOCK_F, num_warps=4)
    return out, grad_h13, grad_row_weight
