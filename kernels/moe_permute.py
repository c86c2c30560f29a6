"""MoE token permutation and the gate-weighted combine, by a row map (no atomics, no scatter-add).

A routing plan gives every token's k choices a row of the expert-ordered buffer: `row_index` (T, k), -1
where the choice was dropped. Both directions then run over a token's k rows, one program per token:
    permute(x, token_index, row_index) = x[token_index]                       (R, D), backward: gather_sum
    combine(rows, row_index, weights)  = sum_j weights[t, j] * rows[row_index[t, j]]   (T, D)
`scatter_rows` (the permutation) reads each token once and writes its kept rows; `gather_sum` reads a
token's kept rows and accumulates in fp32, so the combine never materialises (T, k, D) and the backward of
the permutation needs no atomic adds. `combine_backward` writes each kept row's gradient exactly once and
the weight gradients (dot products) in the same pass. Rows that no kept choice points to (dropped ones) are
never read. The PyTorch functions (`x.index_select`, `_gather_sum_torch`, `_combine_backward_torch`) are
what the kernels must equal."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _gather_sum_kernel(ROWS, ROW_INDEX, WEIGHTS, OUT, D, K: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(K):
        row = tl.load(ROW_INDEX + t * K + j).to(tl.int64)
        if row >= 0:
            value = tl.load(ROWS + row * D + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_WEIGHTS:
                value = value * tl.load(WEIGHTS + t * K + j).to(tl.float32)
            acc += value
    tl.store(OUT + t * D + offs, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _scatter_rows_kernel(X, ROW_INDEX, ROWS, D, K: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < D
    value = tl.load(X + t * D + offs, mask=mask)
    for j in tl.static_range(K):
        row = tl.load(ROW_INDEX + t * K + j).to(tl.int64)
        if row >= 0:
            tl.store(ROWS + row * D + offs, value, mask=mask)


@triton.jit
def _combine_backward_kernel(GRAD_Y, ROWS, ROW_INDEX, WEIGHTS, GRAD_ROWS, GRAD_WEIGHTS, D, K: tl.constexpr,
                             K_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    choice = tl.arange(0, K_PAD)
    dots = tl.zeros([K_PAD], dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        offs = start + tl.arange(0, BLOCK_D)
        mask = offs < D
        grad = tl.load(GRAD_Y + t * D + offs, mask=mask, other=0.0).to(tl.float32)
        for j in tl.static_range(K):
            row = tl.load(ROW_INDEX + t * K + j).to(tl.int64)
            if row >= 0:
                weight = tl.load(WEIGHTS + t * K + j).to(tl.float32)
                value = tl.load(ROWS + row * D + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(GRAD_ROWS + row * D + offs, (weight * grad).to(GRAD_ROWS.dtype.element_ty), mask=mask)
                dots = tl.where(choice == j, dots + tl.sum(grad * value, axis=0), dots)
    tl.store(GRAD_WEIGHTS + t * K + choice, dots, mask=choice < K)


def _block_d(D: int) -> int:
    return min(triton.next_power_of_2(D), 1024)


def _gather_sum_triton(rows: torch.Tensor, row_index: torch.Tensor, weights: Optional[torch.Tensor],
                       num_tokens: int) -> torch.Tensor:
    D, K = rows.shape[1], row_index.shape[1]
    out = rows.new_empty(num_tokens, D)
    block = _block_d(D)
    _gather_sum_kernel[(num_tokens, triton.cdiv(D, block))](
        rows, row_index, weights if weights is not None else row_index, out, D, K=K,
        HAS_WEIGHTS=weights is not None, BLOCK_D=block, num_warps=4)
    return out


def _gather_sum_torch(rows: torch.Tensor, row_index: torch.Tensor, weights: Optional[torch.Tensor],
                      num_tokens: int) -> torch.Tensor:
    acc_dtype = torch.promote_types(rows.dtype, torch.float32)
    picked = rows[row_index.clamp(min=0)].to(acc_dtype)  # (T, k, D)
    if weights is not None:
        picked = picked * weights[..., None].to(acc_dtype)
    picked = torch.where((row_index >= 0)[..., None], picked, 0)  # where, not *: unread rows may hold NaN
    return picked.sum(1).to(rows.dtype)


def gather_sum(rows: torch.Tensor, row_index: torch.Tensor, use_triton: Optional[bool] = None) -> torch.Tensor:
    """(T, D): out[t] = sum over kept j of rows[row_index[t, j]] for rows (R, D), summed in fp32: the backward
    of the permutation, and the expert MLP's combine once the gate weights are on its hidden rows."""
    gather = _gather_sum_triton if _use_triton(rows, use_triton) else _gather_sum_torch
    return gather(rows.contiguous(), row_index.contiguous(), None, row_index.shape[0])


def scatter_rows(x: torch.Tensor, token_index: torch.Tensor, row_index: torch.Tensor,
                 use_triton: Optional[bool] = None) -> torch.Tensor:
    """rows (R, D) = x[token_index] for x (T, D). Triton reads each token once and writes it to its kept rows
    (row_index (T, k)): T reads instead of R, for k = 8 half the bytes of the index_select the torch path runs.
    Rows no kept choice points to (the dropped tail) are left unwritten there."""
    if not _use_triton(x, use_triton):
        return x.index_select(0, token_index)
    x, row_index = x.contiguous(), row_index.contiguous()
    rows = x.new_empty(token_index.shape[0], x.shape[1])
    block = _block_d(x.shape[1])
    _scatter_rows_kernel[(x.shape[0], triton.cdiv(x.shape[1], block))](x, row_index, rows, x.shape[1],
                                                                       K=row_index.shape[1], BLOCK_D=block, num_warps=4)
    return rows


def _combine_backward_triton(grad_y, rows, row_index, weights):
    T, K = row_index.shape
    grad_rows = torch.empty_like(rows)  # rows no kept choice points to get no gradient: they are never read
    grad_weights = torch.empty(T, K, dtype=torch.float32, device=rows.device)
    _combine_backward_kernel[(T,)](grad_y, rows, row_index, weights, grad_rows, grad_weights, rows.shape[1], K=K,
                                   K_PAD=triton.next_power_of_2(K), BLOCK_D=_block_d(rows.shape[1]), num_warps=4)
    return grad_rows, grad_weights


def _combine_backward_torch(grad_y, rows, row_index, weights):
    acc_dtype = torch.promote_types(rows.dtype, torch.float32)
    kept = row_index >= 0
    safe = row_index.clamp(min=0)
    grad = grad_y.to(acc_dtype)[:, None, :]  # (T, 1, D)
    num_rows = rows.shape[0]
    spare = rows.new_zeros(num_rows + 1, rows.shape[1])  # dropped choices write to a spare row past the end; no mask
    grad_rows = spare.index_copy_(0, torch.where(kept, row_index, num_rows).flatten(),
                                  (weights[..., None].to(acc_dtype) * grad).to(rows.dtype).flatten(0, 1))[:-1]
    dots = (rows[safe].to(acc_dtype) * grad).sum(-1)  # (T, k)
    return grad_rows, torch.where(kept, dots, 0).to(weights.dtype)


def _use_triton(x: torch.Tensor, use_triton: Optional[bool]) -> bool:
    """Triton on CUDA by default; tests force it on CPU under TRITON_INTERPRET=1."""
    return (x.is_cuda if use_triton is None else use_triton) and x.dtype in DTYPES


class _Permute(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, token_index, row_index, use_triton):
        ctx.save_for_backward(row_index)
        ctx.use_triton = use_triton
        return scatter_rows(x, token_index, row_index, use_triton)

    @staticmethod
    def backward(ctx, grad_rows):
        (row_index,) = ctx.saved_tensors
        return gather_sum(grad_rows, row_index, ctx.use_triton), None, None, None


class _Combine(torch.autograd.Function):

    @staticmethod
    def forward(ctx, rows, row_index, weights, use_triton):
        ctx.save_for_backward(rows, row_index, weights)
        ctx.use_triton = use_triton
        gather = _gather_sum_triton if use_triton else _gather_sum_torch
        return gather(rows, row_index, weights, row_index.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        rows, row_index, weights = ctx.saved_tensors
        backward = _combine_backward_triton if ctx.use_triton else _combine_backward_torch
        grad_rows, grad_weights = backward(grad_y.contiguous(), rows, row_index, weights)
        return grad_rows, None, grad_weights, None


def permute(x: torch.Tensor, token_index: torch.Tensor, row_index: torch.Tensor,
            use_triton: Optional[bool] = None) -> torch.Tensor:
    """rows (R, D) = x[token_index] for x (T, D), token_index (R,) int64. row_index (T, k) int64 is the
    inverse map (row of each token's choice, -1 if dropped): the backward sums each token's kept rows."""
    return _Permute.apply(x, token_index, row_index.contiguous(), _use_triton(x, use_triton))


def combine(rows: torch.Tensor, row_index: torch.Tensor, weights: torch.Tensor,
            use_triton: Optional[bool] = None) -> torch.Tensor:
    """y (T, D) in rows' dtype: y[t] = sum over kept j of weights[t, j] * rows[row_index[t, j]], summed in
    fp32 (or rows' dtype if wider). rows (R, D); row_index (T, k) int64, -1 = dropped; weights (T, k) fp32."""
    return _Combine.apply(rows.contiguous(), row_index.contiguous(), weights.contiguous(), _use_triton(rows, use_triton))
