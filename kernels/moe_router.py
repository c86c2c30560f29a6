"""The MoE router and routing plan on GPU in a handful of launches (instead of ~a hundred small aten ops).

router_logits(x, w): (T, E) fp32 logits of bf16 x (T, D) and w (E, D) on tensor cores, no fp32 copy of x.
fused_router(logits, k): softmax, top-k, chosen weights, both router losses and the routing statistics in
    one pass over blocks of tokens plus a one-program reduction; one backward kernel. It must equal
    `dist_moe.model.moe.router.top_k_gating` (the PyTorch path: CPU, and every policy beside the baseline
    softmax top-k with the micro-batch aux loss: rsample, sigmoid, selection bias, sequence/global-batch aux
    loss, rerouting and expert choice run the PyTorch router on GPU too; docs/routing.md).
fused_route(indices, weights, E, capacity, normalize): the routing plan of `dist_moe.model.moe.dispatch.route`
    for drop_policy="position" (also after `dispatch.reroute`, which only rewrites the indices), bit-equal in its
    integers: per-block expert histograms, one exclusive scan over (choice, block, expert), then each
    assignment's rank within its expert gives its slot and row.
No atomics and no host sync: every output is written once, by one program, whatever the launch order.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


class _BF16RouterLogits(torch.autograd.Function):
    """logits (T, E) fp32 = x (T, D) @ w (E, D)^T for bf16 x and w: bf16 products are exact in fp32, so only
    the summation order differs from the fp32 GEMM. The backward splits d logits into bf16 hi + lo (16 of
    fp32's 24 mantissa bits, where one bf16 would keep 8) and runs both halves as one bf16 GEMM each way
    with fp32 accumulation: d x in bf16, d w summed in fp32 then cast to bf16."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return torch.mm(x, w.t(), out_dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_logits):
        x, w = ctx.saved_tensors
        high = grad_logits.to(x.dtype)
        split = torch.cat([high, (grad_logits - high.float()).to(x.dtype)], 1)  # (T, 2E): hi | lo
        grad_x = torch.mm(split, torch.cat([w, w])) if ctx.needs_input_grad[0] else None  # (T, D)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.mm(split.t(), x, out_dtype=torch.float32).view(2, *w.shape).sum(0).to(w.dtype)
        return grad_x, grad_w


def router_logits(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(T, E) fp32 = x (T, D) @ w (E, D)^T: tensor cores for bf16 x and w on CUDA, else the fp32 GEMM."""
    if x.is_cuda and x.dtype == w.dtype == torch.bfloat16:
        return _BF16RouterLogits.apply(x, w)
    return torch.nn.functional.linear(x.float(), w.float())


# ---------------------------------------------------------------------------------------------- router


@triton.jit
def _router_forward_kernel(LOGITS, PROBS, LSE, WEIGHTS, INDICES, PROB_SUMS, COUNTS, SCALARS, T, E,
                           K: tl.constexpr, BLOCK_T: tl.constexpr, E_PAD: tl.constexpr):
    block = tl.program_id(0)
    tokens = block * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, E_PAD)
    valid = tokens < T
    mask = valid[:, None] & (experts[None, :] < E)
    logits = tl.load(LOGITS + tokens[:, None] * E + experts[None, :], mask=mask, other=-float("inf"))
    row_max = tl.where(valid, tl.max(logits, 1), 0.0)
    exp = tl.exp(logits - row_max[:, None])
    total = tl.where(valid, tl.sum(exp, 1), 1.0)
    probs = exp / total[:, None]  # (BLOCK_T, E_PAD), 0 on padding
    lse = row_max + tl.log(total)
    tl.store(PROBS + tokens[:, None] * E + experts[None, :], probs, mask=mask)
    tl.store(LSE + tokens, lse, mask=valid)
    scores = tl.where(mask, probs, -1.0)
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    top1 = tl.zeros([BLOCK_T], dtype=tl.float32)
    for j in tl.static_range(K):  # most probable first; ties to the lowest expert id
        best = tl.max(scores, 1)
        choice = tl.min(tl.where(scores == best[:, None], experts[None, :], E_PAD), 1)
        chosen = (experts[None, :] == choice[:, None]) & valid[:, None]
        tl.store(WEIGHTS + tokens * K + j, best, mask=valid)
        tl.store(INDICES + tokens * K + j, choice.to(tl.int64), mask=valid)
        if j == 0:
            top1 = tl.where(valid, best, 0.0)
        if j == 0 or K > 2:  # load_balancing_loss: f counts first choices for k <= 2, all assignments beyond
            counts += tl.sum(chosen.to(tl.int32), 0)
        scores = tl.where(chosen, -1.0, scores)
    entropy = -probs * tl.log(tl.where(probs > 0, probs, 1.0))  # entr: 0 at p = 0
    tl.store(PROB_SUMS + block * E_PAD + experts, tl.sum(probs, 0))
    tl.store(COUNTS + block * E_PAD + experts, counts)
    tl.store(SCALARS + block * 3 + 0, tl.sum(tl.where(valid, lse * lse, 0.0), 0))
    tl.store(SCALARS + block * 3 + 1, tl.sum(tl.sum(entropy, 1), 0))
    tl.store(SCALARS + block * 3 + 2, tl.sum(top1, 0))


@triton.jit
def _router_reduce_kernel(PROB_SUMS, COUNTS, SCALARS, FRACTIONS, AUX, Z, STATS, num_blocks, T, E, num_chosen,
                          E_PAD: tl.constexpr, BLOCK_B: tl.constexpr):
    """One program: the blocks' partial sums, in block order -> aux, z, (entropy sum, top-1 sum), f (E,)."""
    experts = tl.arange(0, E_PAD)
    prob_sum = tl.zeros([E_PAD], dtype=tl.float32)
    count = tl.zeros([E_PAD], dtype=tl.int32)
    scalars = tl.zeros([4], dtype=tl.float32)
    columns = tl.arange(0, 4)
    for start in range(0, num_blocks, BLOCK_B):
        blocks = start + tl.arange(0, BLOCK_B)
        live = blocks < num_blocks
        at = blocks[:, None] * E_PAD + experts[None, :]
        prob_sum += tl.sum(tl.load(PROB_SUMS + at, mask=live[:, None], other=0.0), 0)
        count += tl.sum(tl.load(COUNTS + at, mask=live[:, None], other=0), 0)
        scalar_mask = live[:, None] & (columns[None, :] < 3)
        scalars += tl.sum(tl.load(SCALARS + blocks[:, None] * 3 + columns[None, :], mask=scalar_mask, other=0.0), 0)
    fraction = count.to(tl.float32) / num_chosen
    tl.store(FRACTIONS + experts, fraction, mask=experts < E)
    tl.store(AUX, E * tl.sum(fraction * (prob_sum / T), 0))
    tl.store(Z, tl.sum(tl.where(columns == 0, scalars, 0.0), 0) / T)
    tl.store(STATS + tl.maximum(columns - 1, 0), scalars, mask=(columns >= 1) & (columns < 3))


@triton.jit
def _router_backward_kernel(PROBS, LSE, INDICES, GRAD_WEIGHTS, FRACTIONS, GRAD_AUX, GRAD_Z, GRAD_LOGITS, T, E,
                            K: tl.constexpr, BLOCK_T: tl.constexpr, E_PAD: tl.constexpr):
    """d logits = p * (g - sum_e p g) + 2 lse dz / T * p, with g = d probs = E f / T * d aux + the chosen
    experts' d weights (softmax, aux-loss and z-loss backward in closed form)."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, E_PAD)
    valid = tokens < T
    mask = valid[:, None] & (experts[None, :] < E)
    probs = tl.load(PROBS + tokens[:, None] * E + experts[None, :], mask=mask, other=0.0)
    fraction = tl.load(FRACTIONS + experts, mask=experts < E, other=0.0)
    grad_probs = tl.zeros([BLOCK_T, E_PAD], dtype=tl.float32) + (E * tl.load(GRAD_AUX) / T) * fraction[None, :]
    for j in tl.static_range(K):
        choice = tl.load(INDICES + tokens * K + j, mask=valid, other=-1)
        grad_weight = tl.load(GRAD_WEIGHTS + tokens * K + j, mask=valid, other=0.0)
        grad_probs += tl.where(experts[None, :] == choice[:, None], grad_weight[:, None], 0.0)
    lse = tl.load(LSE + tokens, mask=valid, other=0.0)
    inner = tl.sum(probs * grad_probs, 1)
    grad = probs * (grad_probs - inner[:, None] + (2.0 * tl.load(GRAD_Z) / T) * lse[:, None])
    tl.store(GRAD_LOGITS + tokens[:, None] * E + experts[None, :], grad, mask=mask)


# The one-program reduction and scan walk their (blocks, E_PAD) input this many values a step (timings:
# bench/results/moe_notes.md).
_SERIAL_TILE = 4096


def _block_tokens(num_experts: int, elements: int) -> int:
    """Tokens per program so that one (tokens, E_PAD) tile holds about `elements` values."""
    return max(16, elements // triton.next_power_of_2(num_experts))


class _FusedRouter(torch.autograd.Function):

    @staticmethod
    def forward(ctx, logits, top_k):
        T, E = logits.shape
        e_pad, block = triton.next_power_of_2(E), _block_tokens(E, 1024)
        num_blocks = triton.cdiv(T, block)
        new = lambda *shape, dtype=torch.float32: torch.empty(shape, dtype=dtype, device=logits.device)  # noqa: E731
        probs, lse, weights, indices = new(T, E), new(T), new(T, top_k), new(T, top_k, dtype=torch.int64)
        prob_sums, scalars = new(num_blocks, e_pad), new(num_blocks, 3)  # per block: sum of p; lse^2, entropy, top-1
        counts = new(num_blocks, e_pad, dtype=torch.int32)
        _router_forward_kernel[(num_blocks,)](logits, probs, lse, weights, indices, prob_sums, counts, scalars, T, E,
                                              K=top_k, BLOCK_T=block, E_PAD=e_pad, num_warps=4)
        fractions, aux, z, stats = new(E), new(), new(), new(2)
        num_chosen = T if top_k <= 2 else T * top_k
        _router_reduce_kernel[(1,)](prob_sums, counts, scalars, fractions, aux, z, stats, num_blocks, T, E, num_chosen,
                                    E_PAD=e_pad, BLOCK_B=max(1, _SERIAL_TILE // e_pad), num_warps=4)
        ctx.save_for_backward(probs, lse, indices, fractions)
        ctx.mark_non_differentiable(indices, stats)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the integer outputs
        return weights, indices, aux, z, stats

    @staticmethod
    def backward(ctx, grad_weights, _indices, grad_aux, grad_z, _stats):
        probs, lse, indices, fractions = ctx.saved_tensors
        T, E = probs.shape
        grad_weights = torch.zeros_like(indices, dtype=probs.dtype) if grad_weights is None else grad_weights
        grad_aux, grad_z = (torch.zeros_like(lse[0]) if g is None else g for g in (grad_aux, grad_z))
        block = _block_tokens(E, 1024)
        grad_logits = torch.empty_like(probs)
        _router_backward_kernel[(triton.cdiv(T, block),)](
            probs, lse, indices, grad_weights.contiguous(), fractions, grad_aux, grad_z, grad_logits, T, E,
            K=indices.shape[1], BLOCK_T=block, E_PAD=triton.next_power_of_2(E), num_warps=4)
        return grad_logits, None


def fused_router(logits: torch.Tensor, top_k: int):
    """logits (T, E) fp32, E <= 256 -> (weights (T, k) fp32, indices (T, k) int64, aux_loss () fp32,
    z_loss () fp32, stats (2,) fp32 = (sum of routing entropies, sum of top-1 probabilities), no grad).
    Same contract and values as router.top_k_gating; differentiable in logits through weights, aux, z."""
    assert logits.dtype == torch.float32 and logits.shape[1] <= 256, (logits.dtype, logits.shape)
    return _FusedRouter.apply(logits.contiguous(), top_k)


# ---------------------------------------------------------------------------------------------- routing plan


@triton.jit
def _route_histogram_kernel(INDICES, HIST, T, K: tl.constexpr, BLOCK_T: tl.constexpr, E_PAD: tl.constexpr):
    """HIST[(j, block), e] = how many of this block's tokens chose e as their j-th choice."""
    block, num_blocks = tl.program_id(0), tl.num_programs(0)
    tokens = block * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, E_PAD)
    for j in tl.static_range(K):
        choice = tl.load(INDICES + tokens * K + j, mask=tokens < T, other=-1)
        hits = (choice[:, None] == experts[None, :]).to(tl.int32)
        tl.store(HIST + (j * num_blocks + block) * E_PAD + experts, tl.sum(hits, 0))


@triton.jit
def _route_scan_kernel(HIST, OFFSETS, TOKENS_PER_EXPERT, STARTS, DROPPED, num_groups, E, capacity, num_rows,
                       E_PAD: tl.constexpr, BLOCK_G: tl.constexpr):
    """One program. OFFSETS = exclusive scan of HIST over its (choice, block) groups, per expert (the slot of
    each group's first assignment); per expert: kept = min(routed, capacity), row of its first kept
    assignment (STARTS[e]) and of its first dropped one (STARTS[E_PAD + e], after all N kept rows)."""
    experts = tl.arange(0, E_PAD)
    routed = tl.zeros([E_PAD], dtype=tl.int32)
    for start in range(0, num_groups, BLOCK_G):
        groups = start + tl.arange(0, BLOCK_G)
        at = groups[:, None] * E_PAD + experts[None, :]
        live = (groups < num_groups)[:, None]
        hist = tl.load(HIST + at, mask=live, other=0)
        tl.store(OFFSETS + at, routed[None, :] + tl.cumsum(hist, 0) - hist, mask=live)
        routed += tl.sum(hist, 0)
    kept = tl.minimum(routed, capacity)
    dropped = routed - kept
    num_kept = tl.sum(kept, 0)
    tl.store(TOKENS_PER_EXPERT + experts, kept.to(tl.int64), mask=experts < E)
    tl.store(STARTS + experts, tl.cumsum(kept, 0) - kept)
    tl.store(STARTS + E_PAD + experts, num_kept + tl.cumsum(dropped, 0) - dropped)
    tl.store(DROPPED, (num_rows - num_kept).to(tl.int64))


@triton.jit
def _route_kernel(INDICES, WEIGHTS, OFFSETS, STARTS, TOKEN_INDEX, ROW_INDEX, COMBINE, KEPT, T, capacity, eps,
                  K: tl.constexpr, K_PAD: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr,
                  E_PAD: tl.constexpr):
    """Slot of assignment (t, j) = OFFSETS[(j, block), e] + its rank among this block's j-th choices of e:
    the rank in `route`'s stable sort of choice-major assignments. Kept if slot < capacity."""
    block, num_blocks = tl.program_id(0), tl.num_programs(0)
    tokens = block * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = tokens < T
    experts = tl.arange(0, E_PAD)
    choices = tl.arange(0, K_PAD)
    combine = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    for j in tl.static_range(K):
        expert = tl.load(INDICES + tokens * K + j, mask=valid, other=-1)
        hits = (expert[:, None] == experts[None, :]).to(tl.int32)  # (BLOCK_T, E_PAD) one-hot
        rank = tl.sum(tl.cumsum(hits, 0) * hits, 1) - 1  # earlier tokens of this block with the same choice
        expert = tl.maximum(expert, 0)
        slot = tl.load(OFFSETS + (j * num_blocks + block) * E_PAD + expert, mask=valid, other=0) + rank
        keep = slot < capacity
        row = tl.where(keep, tl.load(STARTS + expert, mask=valid, other=0) + slot,
                       tl.load(STARTS + E_PAD + expert, mask=valid, other=0) + slot - capacity)
        tl.store(TOKEN_INDEX + row, tokens.to(tl.int64), mask=valid)
        tl.store(ROW_INDEX + tokens * K + j, tl.where(keep, row, -1).to(tl.int64), mask=valid)
        tl.store(KEPT + tokens * K + j, keep, mask=valid)
        weight = tl.load(WEIGHTS + tokens * K + j, mask=valid, other=0.0)
        combine = tl.where(choices[None, :] == j, tl.where(keep, weight, 0.0)[:, None], combine)
    if NORMALIZE:
        combine = combine / tl.maximum(tl.sum(combine, 1), eps)[:, None]
    tl.store(COMBINE + tokens[:, None] * K + choices[None, :], combine, mask=valid[:, None] & (choices[None, :] < K))


@triton.jit
def _route_backward_kernel(WEIGHTS, KEPT, GRAD_COMBINE, GRAD_WEIGHTS, T, eps, K: tl.constexpr, K_PAD: tl.constexpr,
                           NORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr):
    """d weights of combine = kept * w / max(sum kept * w, eps): (dc - sum c dc) / S where S >= eps."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    choices = tl.arange(0, K_PAD)
    mask = (tokens < T)[:, None] & (choices[None, :] < K)
    at = tokens[:, None] * K + choices[None, :]
    kept = tl.load(KEPT + at, mask=mask, other=0) != 0
    grad = tl.where(kept, tl.load(GRAD_COMBINE + at, mask=mask, other=0.0), 0.0)
    if NORMALIZE:
        weights = tl.where(kept, tl.load(WEIGHTS + at, mask=mask, other=0.0), 0.0)
        total = tl.sum(weights, 1)
        inner = tl.sum(weights * grad, 1) / tl.maximum(total, eps)
        grad = tl.where((total >= eps)[:, None], (grad - inner[:, None]) / tl.maximum(total, eps)[:, None], grad / eps)
        grad = tl.where(kept, grad, 0.0)
    tl.store(GRAD_WEIGHTS + at, grad, mask=mask)


class _FusedRoute(torch.autograd.Function):

    @staticmethod
    def forward(ctx, indices, weights, num_experts, capacity, normalize):
        T, K = indices.shape
        e_pad, block = triton.next_power_of_2(num_experts), _block_tokens(num_experts, 4096)
        num_blocks = triton.cdiv(T, block)
        new = lambda *shape, dtype=torch.int32: torch.empty(shape, dtype=dtype, device=indices.device)  # noqa: E731
        hist, offsets = new(K * num_blocks, e_pad), new(K * num_blocks, e_pad)
        tokens_per_expert, starts, dropped = new(num_experts, dtype=torch.int64), new(2 * e_pad), new(dtype=torch.int64)
        _route_histogram_kernel[(num_blocks,)](indices, hist, T, K=K, BLOCK_T=block, E_PAD=e_pad, num_warps=4)
        _route_scan_kernel[(1,)](hist, offsets, tokens_per_expert, starts, dropped, K * num_blocks, num_experts,
                                 capacity, T * K, E_PAD=e_pad, BLOCK_G=max(1, _SERIAL_TILE // e_pad), num_warps=4)
        token_index, row_index = new(T * K, dtype=torch.int64), new(T, K, dtype=torch.int64)
        combine, kept = new(T, K, dtype=torch.float32), new(T, K, dtype=torch.bool)
        eps = torch.finfo(torch.float32).eps
        _route_kernel[(num_blocks,)](indices, weights, offsets, starts, token_index, row_index, combine, kept, T,
                                     capacity, eps, K=K, K_PAD=triton.next_power_of_2(K),
                                     NORMALIZE=normalize and K > 1, BLOCK_T=block, E_PAD=e_pad, num_warps=4)
        ctx.save_for_backward(weights, kept)
        ctx.normalize = normalize and K > 1
        ctx.mark_non_differentiable(token_index, row_index, tokens_per_expert, kept, dropped)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the integer outputs
        return token_index, row_index, combine, tokens_per_expert, kept, dropped

    @staticmethod
    def backward(ctx, _token_index, _row_index, grad_combine, *_):
        weights, kept = ctx.saved_tensors
        if grad_combine is None:
            return None, None, None, None, None
        T, K = weights.shape
        grad_weights = torch.empty_like(weights)
        block = 1024 // triton.next_power_of_2(K)
        _route_backward_kernel[(triton.cdiv(T, block),)](
            weights, kept, grad_combine.contiguous(), grad_weights, T, torch.finfo(torch.float32).eps, K=K,
            K_PAD=triton.next_power_of_2(K), NORMALIZE=ctx.normalize, BLOCK_T=block, num_warps=4)
        return None, grad_weights, None, None, None


def fused_route(indices: torch.Tensor, weights: torch.Tensor, num_experts: int, capacity: Optional[int],
                normalize_weights: bool = True):
    """`route(indices, weights, E, capacity, "position", normalize_weights)` as tensors: (token_index (k*T,),
    row_index (T, k), combine_weights (T, k) fp32 (differentiable in weights), tokens_per_expert (E,),
    kept (T, k) bool, dropped () int64). indices (T, k) int64 distinct per token, E <= 256."""
    assert num_experts <= 256, num_experts
    capacity = indices.shape[0] if capacity is None else capacity  # dropless: no expert gets more than T
    return _FusedRoute.apply(indices.contiguous(), weights.contiguous().float(), num_experts, capacity,
                             normalize_weights)
