"""The expert MLP's kernels: a grouped GEMM over expert-ordered rows, and the SwiGLU activation between GEMMs.

`grouped_mm(x, w, offsets)`: row segment g of x (M, K), rows [offsets[g-1], offsets[g]), times w[g] (K, N);
must equal `grouped_mm_reference` (a loop of matmuls, what torch._grouped_mm computes). One launch for all
experts, no host sync: each program owns one BLOCK_M x BLOCK_N output tile of one expert; tiles are numbered
expert after expert (the per-expert tile counts are prefix-summed on the device) and a grid sized for the
worst case lets the spare programs exit. Rows past offsets[-1] are not written. Forward only: it exists to
be measured against torch._grouped_mm (bench/moe_layer.py), the faster one runs in the layer.

`swiglu(h13, row_weight)` = row_weight * silu(h1) * h3 for h13 = [h1 | h3] (the output of one GEMM against
[w1 | w3]); the optional row weight is the gate weight, applied here rather than to the expert's output so
the combine needs no saved output rows. `swiglu_backward` returns the recomputed product, [d/dh1 | d/dh3]
and the row weights' gradient: one pass each, in fp32 registers, so the expert MLP saves only h13. The
backward may write over its inputs (in_place=True): the MLP's does, which keeps its peak at three (rows, F)
buffers.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _gemm_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
    tiles = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4),
             (128, 64, 64, 4, 4), (256, 128, 64, 8, 3)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in tiles]


@triton.autotune(configs=_gemm_configs(), key=["N", "K", "M_BUCKET", "G"])
@triton.jit
def _grouped_mm_kernel(X, W, OUT, OFFSETS, N, K, M_BUCKET, G,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tile_m, tile_n = pid // tiles_n, pid % tiles_n
    # Find the expert owning M-tile tile_m: walk the groups, counting each one's tiles (G is small).
    group, first_tile, row_start, row_end = G, 0, 0, 0
    tiles_before, previous_end = 0, 0
    for g in range(G):
        end = tl.load(OFFSETS + g)
        tiles = tl.cdiv(end - previous_end, BLOCK_M)
        hit = (tile_m >= tiles_before) & (tile_m < tiles_before + tiles)
        group = tl.where(hit, g, group)
        first_tile = tl.where(hit, tiles_before, first_tile)
        row_start = tl.where(hit, previous_end, row_start)
        row_end = tl.where(hit, end, row_end)
        tiles_before += tiles
        previous_end = end
    if group == G:  # a spare program of the worst-case grid
        return
    rows = row_start + (tile_m - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = X + rows.to(tl.int64)[:, None] * K + ks[None, :]
    w_ptrs = W + group.to(tl.int64) * K * N + ks[:, None] * N + cols[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(x_ptrs, mask=(rows[:, None] < row_end) & (ks[None, :] + k < K), other=0.0)
        b = tl.load(w_ptrs, mask=(ks[:, None] + k < K) & (cols[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * N
    out_ptrs = OUT + rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=(rows[:, None] < row_end) & (cols[None, :] < N))


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x (M, K) rows sorted by group, w (G, K, N), offsets (G,) int32 group ends -> (M, N) in x's dtype."""
    (M, K), (G, _, N) = x.shape, w.shape
    out = x.new_empty(M, N)
    grid = lambda meta: ((triton.cdiv(M, meta["BLOCK_M"]) + G) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _grouped_mm_kernel[grid](x.contiguous(), w.contiguous(), out, offsets.contiguous(), N, K,
                             triton.next_power_of_2(max(M, 1)), G)
    return out


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The loop grouped_mm must equal, in x's dtype; rows past offsets[-1] come out zero here."""
    out = x.new_zeros(x.shape[0], w.shape[2])
    start = 0
    for g, end in enumerate(offsets.tolist()):
        out[start:end] = x[start:end] @ w[g]
        start = end
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
