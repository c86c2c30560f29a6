"""SwiGLU experts stored as stacked weights, computed on expert-ordered rows by per-expert GEMMs.

`SwiGLUExperts` holds this rank's E_local experts (w13 = [w1 | w3]: (E_local, D, 2F); w2: (E_local, F, D)) and
runs them on rows already sorted by expert: one GEMM per contiguous segment, one launch and no host sync on
CUDA (our TMA grouped GEMM on Hopper for the row-grouped products, `torch._grouped_mm` for the rest and on
other GPUs) and a loop over local experts elsewhere. Rows past the last segment (a routing plan's dropped
assignments) are not computed. Gate and up projection share one GEMM (twice as wide, so better shaped for
narrow experts), and so does their input gradient, whose two halves the GEMM sums over K = 2F. The backward is
written out (`_SwiGLUMLP`): it saves x and h13 = x w13 only, recomputes silu(h1) * h3 with the gradients in
one pass, and writes those over h13, so the MLP holds at most three (rows, F) buffers at once. Given a routing
plan, the experts also permute their rows and combine them, with the gate weights scaling the hidden rows (see
_SwiGLUMLP). Checkpoints keep DeepSpeed's separate w1 / w3 (layer.py splits them).
Expert parameters carry DeepSpeed's MoE marks (`allreduce=False`, `group_name`) so ZeRO reduces them over
the expert-data-parallel group only.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dist_moe.kernels import grouped_gemm
from dist_moe.kernels.grouped_gemm import swiglu, swiglu_backward
from dist_moe.kernels.moe_permute import gather_sum, scatter_rows
from dist_moe.parallel.groups import expert_group_name


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN `w2(silu(w1 x) * w3 x)` (Shazeer 2020): the shared expert and DeepSpeed's expert."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)  # gate
        self.w3 = nn.Linear(d_model, d_ff, bias=False)  # up
        self.w2 = nn.Linear(d_ff, d_model, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def expert_init(num_experts: int, d_model: int, d_ff: int, std: float) -> Iterator[tuple[int, torch.Tensor, ...]]:
    """Yields (e, w1 (D, F), w3 (D, F), w2 (F, D)) for every global expert e, drawn in one fixed order from
    the global RNG, so a rank holding experts [a, b) gets the same weights whatever the EP size."""
    for e in range(num_experts):
        yield (e, torch.randn(d_model, d_ff) * std, torch.randn(d_model, d_ff) * std,
               torch.randn(d_ff, d_model) * std)


def _cuda_grouped_mm(x: torch.Tensor, w: torch.Tensor) -> bool:
    aligned = x.shape[-1] % 8 == 0 and w.shape[-1] % 8 == 0
    return x.is_cuda and x.dtype == w.dtype == torch.bfloat16 and aligned and hasattr(torch, "_grouped_mm")


def grouped_mm(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor,
               tiles: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Row segment i of x (R, K) times w[i] (K, M) -> (R, M); segment sizes tokens_per_expert (G,) sum to
    N <= R. Rows past N are left unwritten on CUDA (zero on the loop path): callers must not read them.
    tiles = expert_tiles(tokens_per_expert) where our TMA grouped GEMMs apply (Hopper), which are faster there
    than torch._grouped_mm: the warp-specialised Gluon kernel on Triton 3.6, the Triton kernel on other Triton
    versions (both tile by 128 rows, so they share the map)."""
    if tiles is not None:
        kernel = grouped_gemm.grouped_mm_gluon if grouped_gemm.GLUON else grouped_gemm.grouped_mm
        return kernel(x, w, tiles)
    if _cuda_grouped_mm(x, w):
        offsets = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)
        return torch._grouped_mm(x, w, offs=offsets)
    sizes = tokens_per_expert.tolist()
    out = [segment @ w[i] for i, segment in enumerate(x[:sum(sizes)].split(sizes))]
    return torch.cat(out + [x.new_zeros(x.shape[0] - sum(sizes), w.shape[2])])


_GLUON_WEIGHT_GRAD_FASTER: dict[tuple, bool] = {}  # shape -> measured verdict, see _gluon_weight_grad_faster


def _cuda_ms(fn, reps: int = 3) -> float:
    fn()  # compiles on first use
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def _gluon_weight_grad_faster(x: torch.Tensor, grad: torch.Tensor, ends: torch.Tensor) -> bool:
    """Whether the Gluon weight-gradient kernel beats torch._grouped_mm at this shape: timed once per shape (the
    first backward syncs for it) and remembered, since neither wins everywhere (H100, shape (b): Gluon 10% faster
    for w2's gradient, 8% slower for w13's). torch._grouped_mm takes bf16 only."""
    key = (x.shape, grad.shape, ends.numel(), x.dtype)
    if key not in _GLUON_WEIGHT_GRAD_FASTER:
        gluon_ms = _cuda_ms(lambda: grouped_gemm.grouped_mm_weight_grad_gluon(x, grad, ends))
        torch_ms = _cuda_ms(lambda: torch._grouped_mm(x.t(), grad, offs=ends)) if _cuda_grouped_mm(x, grad) else 1e9
        _GLUON_WEIGHT_GRAD_FASTER[key] = gluon_ms <= torch_ms
    return _GLUON_WEIGHT_GRAD_FASTER[key]


def grouped_mm_weight_grad(x: torch.Tensor, grad: torch.Tensor, tokens_per_expert: torch.Tensor,
                           tiles: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Per expert i: x_i^T grad_i over its row segment -> (G, K, M) for x (R, K), grad (R, M); empty segments
    give zeros. The weight gradient of grouped_mm: given its tiles on Triton 3.6, by the Gluon kernel where that
    measures faster than torch._grouped_mm."""
    if tiles is not None and grouped_gemm.GLUON and _gluon_weight_grad_faster(x, grad, tiles[0]):
        return grouped_gemm.grouped_mm_weight_grad_gluon(x, grad, tiles[0])
    if _cuda_grouped_mm(x, grad):  # the tile map's first half is these offsets already
        offsets = tiles[0] if tiles is not None else torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)
        return torch._grouped_mm(x.t(), grad, offs=offsets)
    sizes = tokens_per_expert.tolist()
    pairs = zip(x[:sum(sizes)].split(sizes), grad[:sum(sizes)].split(sizes))
    return torch.stack([a.t() @ b for a, b in pairs])


def _tma_tiles(rows: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, tokens_per_expert: torch.Tensor):
    """Our TMA grouped GEMMs' tile map where they apply (built once per step), None elsewhere."""
    if grouped_gemm.tma_applies(rows, w13, w2):
        return grouped_gemm.expert_tiles(tokens_per_expert)
    return None


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
        tiles = ctx.tiles = _tma_tiles(rows, w13, w2, tokens_per_expert)  # reused by the backward
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


class SwiGLUExperts(nn.Module):
    """Experts [first_expert, first_expert + num_local_experts) of num_experts, as stacked SwiGLU weights.

    forward(x: (R, D) rows sorted by local expert, tokens_per_expert: (E_local,) int64 summing to N <= R)
    -> (R, D); rows past N are not computed (unwritten on CUDA). With routing=(token_index (R,), row_index
    (T, k), row_weights (R,)) from a routing plan, x is the (T, D) tokens, the rows are x[token_index], and the
    result is the (T, D) gate-weighted sum of each token's expert outputs.
    """

    def __init__(self, num_experts: int, num_local_experts: int, first_expert: int, d_model: int, d_ff: int,
                 ep_size: int):
        super().__init__()
        self.num_experts, self.first_expert = num_experts, first_expert
        self.w13 = nn.Parameter(torch.empty(num_local_experts, d_model, 2 * d_ff))  # [w1 (gate) | w3 (up)]
        self.w2 = nn.Parameter(torch.empty(num_local_experts, d_ff, d_model))
        for p in self.parameters():  # DeepSpeed's convention (deepspeed/moe/experts.py)
            p.allreduce = False
            p.group_name = expert_group_name(ep_size)

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        local = range(self.first_expert, self.first_expert + self.w13.shape[0])
        for e, w1, w3, w2 in expert_init(self.num_experts, self.w2.shape[2], self.w2.shape[1], std):
            if e in local:
                i = e - self.first_expert
                self.w13[i].copy_(torch.cat([w1, w3], dim=1)), self.w2[i].copy_(w2)

    def w1_w3(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w1, w3), each (E_local, D, F): views of w13."""
        return self.w13.chunk(2, dim=2)

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor,
                routing: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        token_index, row_index, row_weights = routing if routing is not None else (None, None, None)
        return _SwiGLUMLP.apply(x, self.w13, self.w2, tokens_per_expert, token_index, row_index, row_weights)
