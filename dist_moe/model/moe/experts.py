"""SwiGLU experts stored as stacked weights, computed on expert-ordered rows by per-expert GEMMs.

`SwiGLUExperts` holds this rank's E_local experts (w13 = [w1 | w3]: (E_local, D, 2F); w2: (E_local, F, D)) and
runs them on rows already sorted by expert: one grouped GEMM per product, on the backend that
kernels/expert_gemm.py picks for the shape (one launch and no host sync on CUDA, a loop over local experts
elsewhere). Rows past the last segment (a routing plan's dropped
assignments) are not computed. Gate and up projection share one GEMM (twice as wide, so better shaped for
narrow experts), and so does their input gradient, whose two halves the GEMM sums over K = 2F. The backward is
written out (`_SwiGLUMLP`): it saves x and h13 = x w13 only, recomputes silu(h1) * h3 with the gradients in
one pass, and writes those over h13, so the MLP holds at most three (rows, F) buffers at once. Given a routing
plan, the experts also permute their rows and combine them, with the gate weights scaling the hidden rows (see
_SwiGLUMLP). stack_w13 / split_w13 own the [w1 | w3] layout: DeepSpeed's checkpoints (train/deepspeed_keys.py)
and transformers' names (hf/adapter.py) keep w1 and w3 apart.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dist_moe.kernels.expert_gemm import expert_tiles, grouped_mm, grouped_mm_weight_grad
from dist_moe.kernels.grouped_gemm import swiglu, swiglu_backward
from dist_moe.kernels.moe_permute import gather_sum, scatter_rows


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN `w2(silu(w1 x) * w3 x)` (Shazeer 2020): the shared expert and DeepSpeed's expert."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)  # gate
        self.w3 = nn.Linear(d_model, d_ff, bias=False)  # up
        self.w2 = nn.Linear(d_ff, d_model, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def stack_w13(w1: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """SwiGLUExperts.w13 from gate and up weights in (..., D, F) (input-major, as w13 holds them): (..., D, 2F)."""
    return torch.cat([w1, w3], dim=-1)


def split_w13(w13: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(w1, w3), each (..., D, F), of a (..., D, 2F) w13: the inverse of stack_w13 (views, not copies)."""
    w1, w3 = w13.chunk(2, dim=-1)
    return w1, w3


def expert_init(num_experts: int, d_model: int, d_ff: int, std: float) -> Iterator[tuple[int, torch.Tensor, ...]]:
    """Yields (e, w1 (D, F), w3 (D, F), w2 (F, D)) for every global expert e, drawn in one fixed order from
    the global RNG, so a rank holding experts [a, b) gets the same weights whatever the EP size."""
    for e in range(num_experts):
        yield (e, torch.randn(d_model, d_ff) * std, torch.randn(d_model, d_ff) * std,
               torch.randn(d_ff, d_model) * std)


class _SwiGLUMLP(torch.autograd.Function):
    """y = (silu(x w1) * (x w3)) w2 per expert segment, with the lean backward described above.

    Given a routing plan (token_index, row_index, row_weight (R,)), x holds the (T, D) tokens and the result is
    each token's gate-weighted sum over its kept rows (T, D): the rows are scattered from the tokens, the gate
    weight scales the hidden rows (so the combine is a plain sum and keeps no output rows for its backward),
    and the backward sums the rows' gradients straight into the tokens. Without one, x are the rows."""

    @staticmethod
    def forward(ctx, x, w13, w2, tokens_per_expert, token_index, row_index, row_weight):
        use_triton = x.is_cuda and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
        routed = row_index is not None
        rows = scatter_rows(x, token_index, row_index, use_triton) if routed else x.contiguous()  # (R, D)
        tiles = ctx.tiles = expert_tiles(rows, w13, w2, tokens_per_expert)  # reused by the backward
        h13 = grouped_mm(rows, w13, tokens_per_expert, tiles)  # (R, 2F) = [x w1 | x w3]
        out = grouped_mm(swiglu(h13, use_triton, row_weight), w2, tokens_per_expert, tiles)  # (R, D)
        ctx.save_for_backward(rows, w13, w2, h13, tokens_per_expert, token_index, row_index, row_weight)
        ctx.use_triton = use_triton
        return gather_sum(out, row_index, use_triton) if routed else out

    @staticmethod
    def backward(ctx, grad_y):
        rows, w13, w2, h13, counts, token_index, row_index, row_weight = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        routed = row_index is not None
        grad_out = scatter_rows(grad_y, token_index, row_index, ctx.use_triton) if routed else grad_y  # (R, D)
        tiles = ctx.tiles
        grad_hidden = grouped_mm(grad_out, w2.transpose(1, 2), counts, tiles)  # (R, F)
        hidden, grad_h13, grad_row_weight = swiglu_backward(h13, grad_hidden, ctx.use_triton, row_weight,
                                                            in_place=ctx.use_triton)  # hidden: w2's input
        grad_w2 = grouped_mm_weight_grad(hidden, grad_out, counts, tiles)
        grad_rows = grouped_mm(grad_h13, w13.transpose(1, 2), counts, tiles)  # (R, D), both halves summed over K = 2F
        grad_w13 = grouped_mm_weight_grad(rows, grad_h13, counts, tiles)
        grad_x = gather_sum(grad_rows, row_index, ctx.use_triton) if routed else grad_rows
        return grad_x, grad_w13, grad_w2, None, None, None, grad_row_weight


def swiglu_experts(rows: torch.Tensor, tokens_per_expert: torch.Tensor, w13: torch.Tensor,
                   w2: torch.Tensor) -> torch.Tensor:
    """rows (R, D) sorted by expert -> (R, D) through experts (w13, w2) stacked along dim 0: what the EP
    exchange runs on each chunk's slice of the local experts."""
    return _SwiGLUMLP.apply(rows, w13, w2, tokens_per_expert, None, None, None)


class SwiGLUExperts(nn.Module):
    """Experts [first_expert, first_expert + num_local_experts) of num_experts, as stacked SwiGLU weights.

    forward(x: (R, D) rows sorted by local expert, tokens_per_expert: (E_local,) int64 summing to N <= R)
    -> (R, D); rows past N are not computed (unwritten on CUDA). With routing=(token_index (R,), row_index
    (T, k), row_weights (R,)) from a routing plan, x is the (T, D) tokens, the rows are x[token_index], and the
    result is the (T, D) gate-weighted sum of each token's expert outputs.
    """

    def __init__(self, num_experts: int, num_local_experts: int, first_expert: int, d_model: int, d_ff: int):
        super().__init__()
        self.num_experts, self.first_expert = num_experts, first_expert
        self.w13 = nn.Parameter(torch.empty(num_local_experts, d_model, 2 * d_ff))  # [w1 (gate) | w3 (up)]
        self.w2 = nn.Parameter(torch.empty(num_local_experts, d_ff, d_model))

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        local = range(self.first_expert, self.first_expert + self.w13.shape[0])
        for e, w1, w3, w2 in expert_init(self.num_experts, self.w2.shape[2], self.w2.shape[1], std):
            if e in local:
                i = e - self.first_expert
                self.w13[i].copy_(stack_w13(w1, w3)), self.w2[i].copy_(w2)

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor,
                routing: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        token_index, row_index, row_weights = routing if routing is not None else (None, None, None)
        return _SwiGLUMLP.apply(x, self.w13, self.w2, tokens_per_expert, token_index, row_index, row_weights)
