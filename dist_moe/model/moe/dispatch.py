"""Sort-based token permutation with capacity dropping: from (T, k) expert choices to expert-ordered rows.

No one-hot (T, E, C) tensors: the k*T assignments are stably sorted by expert, each one's rank within its
expert is its slot, and slots >= capacity are dropped. Priority inside an expert ("drop_policy"):
  position: first choices before second choices, then earlier tokens first (DeepSpeed's top1gating and
            top2gating cumsum order: all first choices, then all second choices), so later tokens and
            lower-ranked choices overflow first;
  probs:    higher router probability first (DeepSpeed's topkgating default), so the lowest gates overflow.
(For k >= 3 no DeepSpeed function uses the position order: topkgating's own "position" counts token-major,
all of a token's choices before the next token's; and top1gating keeps the `capacity` tokens torch.topk
picks among equal mask values, which need not be the earliest. docs/routing.md has the details.)
Capacity is per expert over the T tokens given to one `route` call, i.e. one rank's local tokens; the
drop decision therefore does not depend on how experts are spread over ranks. Two policies build on it:
  reroute:        before `route`, assignments over capacity move to their token's next-best expert that
                  still has room (`reroute`), so `route` then drops only what found no room;
  expert choice:  each expert takes its top-C tokens (`expert_choice_route`, Zhou et al. 2022).

`route` gives every one of the k*T assignments a row, kept ones first (by expert), dropped ones after
them, so every size is static and nothing waits on the host: this is the single-GPU hot path. On CUDA,
drop_policy="position" runs as three Triton kernels (`kernels/moe_router.py: fused_route`), which must
give the same plan as the PyTorch code below bit for bit. The plan also moves the rows: `permute` gathers
them from the tokens and `combine` sums the experts' outputs back (kernels/moe_permute.py, Triton on
CUDA). `dispatch` is a compacted view of a plan (kept rows only, one host sync) that the tests compare
against DeepSpeed's gating; the layer does not use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from dist_moe.kernels.moe_permute import combine, permute
from dist_moe.kernels.moe_router import fused_route
from dist_moe.model.moe.router import gate_weights


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float,
                    min_capacity: int) -> int:
    """max(ceil(T / E * capacity_factor * k), min_capacity), computed in float32 like DeepSpeed's
    `_capacity` (fed `capacity_factor * k` by top2gating/topkgating), so both agree on rounding edges."""
    capacity = torch.ceil((num_tokens / num_experts) * torch.tensor(capacity_factor * top_k))
    return max(int(capacity), min_capacity)


@dataclass
class Routing:
    """The routing plan of one MoE forward, of static size R = k*T rows; N = kept assignments (a tensor).

    token_index (R,) int64: source token of each row. Rows [0, N) are the kept assignments ordered by
        expert, then priority; rows [N, R) the dropped ones, which no one computes or reads.
    row_index (T, k) int64: row of each token's j-th choice, -1 where it was dropped.
    combine_weights (T, k) fp32: gate weight of each choice, 0 where dropped (renormalised over kept ones
        if asked).
    tokens_per_expert (E,) int64: kept assignments per expert (segment sizes of rows [0, N)).
    kept (T, k) bool: which of each token's k choices survived the capacity limit.
    dropped () int64: assignments over capacity, R - N.
    capacity: per-expert limit that was applied (dropless: T, the most an expert can receive).
    """

    token_index: torch.Tensor
    row_index: torch.Tensor
    combine_weights: torch.Tensor
    tokens_per_expert: torch.Tensor
    kept: torch.Tensor
    dropped: torch.Tensor
    capacity: int

    def row_weights(self) -> torch.Tensor:
        """(R,) each kept choice's combine weight at its row, 0 at rows no kept choice points to. Differentiable,
        no host sync: dropped choices write to a spare slot past the end, which is cut off."""
        num_rows = len(self.token_index)
        index = torch.where(self.row_index >= 0, self.row_index, num_rows).flatten()
        spare = self.combine_weights.new_zeros(num_rows + 1)
        return spare.scatter(0, index, self.combine_weights.flatten())[:num_rows]

    def permute(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (T, D) -> rows (R, D) = tokens[token_index]: kept rows by expert, then the dropped ones."""
        return permute(tokens, self.token_index, self.row_index)

    def combine(self, rows: torch.Tensor) -> torch.Tensor:
        """Expert outputs (R, D) in plan order -> (T, D): each token's gate-weighted sum over its kept rows."""
        return combine(rows, self.row_index, self.combine_weights)


def route(indices: torch.Tensor, weights: torch.Tensor, num_experts: int, capacity: Optional[int],
          drop_policy: str = "position", normalize_weights: bool = True) -> Routing:
    """Plan the permutation for `indices`/`weights` (T, k) from the router; capacity None = dropless.

    Renormalisation (k >= 2) divides each token's kept weights by their sum after dropping, as DeepSpeed's
    top2gating/topkgating do: a token whose second choice overflowed gets weight 1 on its first.
    """
    num_tokens, top_k = indices.shape
    if indices.is_cuda and drop_policy == "position" and num_experts <= 256:
        token_index, row_index, combine, tokens_per_expert, kept, dropped = fused_route(
            indices, weights, num_experts, capacity, normalize_weights)
        return Routing(token_index, row_index, combine, tokens_per_expert, kept, dropped,
                       num_tokens if capacity is None else capacity)
    num_rows = num_tokens * top_k
    flat_expert = indices.t().reshape(-1)  # (k*T,) choice-major: assignment a = choice * T + token
    order = _priority(flat_expert, weights.t().reshape(-1), drop_policy)  # by expert, then by priority
    sorted_expert = flat_expert[order]
    experts = torch.arange(num_experts + 1, device=indices.device)
    segment_start = torch.searchsorted(sorted_expert, experts)  # (E+1,) no bincount: that syncs on CUDA
    routed_per_expert = segment_start.diff()
    rank = torch.arange(num_rows, device=indices.device)
    if capacity is None:
        capacity, tokens_per_expert = num_tokens, routed_per_expert
        keep_sorted = torch.ones_like(order, dtype=torch.bool)
        row = rank
    else:
        keep_sorted = rank - segment_start[sorted_expert] < capacity  # slot within the expert < capacity
        tokens_per_expert = routed_per_expert.clamp(max=capacity)
        kept_before = torch.cumsum(keep_sorted, 0) - 1
        num_kept = tokens_per_expert.sum()
        row = torch.where(keep_sorted, kept_before, num_kept + rank - kept_before - 1)  # kept first, then dropped
    kept_flat = torch.empty_like(keep_sorted).scatter_(0, order, keep_sorted)
    row_of = torch.empty_like(order).scatter_(0, order, row)  # row of each assignment
    kept = kept_flat.view(top_k, num_tokens).t()
    combine = weights * kept
    if normalize_weights and top_k > 1:
        combine = combine / combine.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(combine.dtype).eps)
    return Routing(token_index=torch.empty_like(order).scatter_(0, row, order % num_tokens),
                   row_index=torch.where(kept_flat, row_of, -1).view(top_k, num_tokens).t().contiguous(),
                   combine_weights=combine,
                   tokens_per_expert=tokens_per_expert,
                   kept=kept,
                   dropped=num_rows - tokens_per_expert.sum(),
                   capacity=capacity)


def _priority(flat_expert: torch.Tensor, flat_weight: torch.Tensor, drop_policy: str) -> torch.Tensor:
    """Permutation of the assignments by expert, then by priority within the expert (see the docstring)."""
    if drop_policy == "probs":
        priority = torch.argsort(flat_weight.detach(), descending=True, stable=True)
        return priority[torch.argsort(flat_expert[priority], stable=True)]
    if drop_policy == "position":
        return torch.argsort(flat_expert, stable=True)
    raise ValueError(f"drop_policy={drop_policy!r}: expected position | probs")


def _accept(experts: torch.Tensor, weights: torch.Tensor, room: torch.Tensor, drop_policy: str) -> torch.Tensor:
    """experts (T, k) with -1 = no request, room (E,): which requests fit, taken in priority order. (T, k) bool."""
    num_tokens, num_experts = experts.shape[0], len(room)
    flat = torch.where(experts >= 0, experts, num_experts).t().reshape(-1)  # choice-major; E = no request
    order = _priority(flat, weights.t().reshape(-1), drop_policy)
    sorted_expert = flat[order]
    start = torch.searchsorted(sorted_expert, torch.arange(num_experts + 1, device=flat.device))
    slot = torch.arange(len(flat), device=flat.device) - start[sorted_expert]
    fits = (sorted_expert < num_experts) & (slot < torch.cat([room, room.new_zeros(1)])[sorted_expert])
    return torch.empty_like(fits).scatter_(0, order, fits).view(-1, num_tokens).t()


def reroute(indices: torch.Tensor, scores: torch.Tensor, selection: torch.Tensor, capacity: int, tries: int,
            drop_policy: str = "position", *, score: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move assignments over capacity to their token's next-best expert with room -> (indices (T, k),
    weights (T, k) = the router's gate_weights at the new indices, rerouted (T, k) bool). `scores` are the
    router's raw scores (Gating.scores) and `score` its moe.score (keyword only: a default would silently
    weigh sigmoid scores as probabilities). Feed the result to `route`, which then keeps every moved
    assignment and drops only at the experts that overflowed.

    First the capacity decision of `route`. Then `tries` rounds: each still-overflowing assignment asks,
    in the token's preference order (`selection`, ties to the lower expert id), for the best expert the
    token does not use yet and that has room left at the start of the round (a token's i-th overflowing
    choice asks for its i-th such expert); each expert grants its room to the requests in the drop-policy
    priority (probs: the token's score for the requested expert). Experts that overflowed keep their
    first decision, which `route` repeats, except under probs with sigmoid scores and k >= 2: there a
    token's gates change when one of its choices moves, and `route` ranks by the new ones.
    Deterministic, and local to the rank's tokens like capacity, so independent of the EP size.
    """
    num_tokens, num_experts = selection.shape
    weights = gate_weights(scores, indices, score)
    full = torch.full((num_experts,), capacity, device=indices.device, dtype=torch.long)
    kept = _accept(indices, weights, full, drop_policy)
    room = full - torch.zeros_like(full).index_add_(0, indices[kept], torch.ones_like(indices[kept]))
    used = torch.zeros_like(selection, dtype=torch.bool).scatter_(1, indices, True)
    ranking = torch.argsort(selection.detach(), dim=1, descending=True, stable=True)  # (T, E) preference order
    overflow, rerouted = ~kept, torch.zeros_like(kept)
    for _ in range(tries):
        open_ranked = (~used & (room > 0)).gather(1, ranking)  # (T, E) in preference order
        open_experts = ranking.gather(1, torch.argsort((~open_ranked).to(torch.int8), dim=1, stable=True))
        nth = torch.cumsum(overflow, 1) - 1  # (T, k) which overflowing choice of its token
        asks = overflow & (nth < open_ranked.sum(1, keepdim=True))
        wanted = torch.where(asks, open_experts.gather(1, nth.clamp(min=0)), -1)
        granted = _accept(wanted, scores.gather(1, wanted.clamp(min=0)), room, drop_policy)
        indices = torch.where(granted, wanted, indices)
        moved = wanted[granted]
        room = room - torch.zeros_like(room).index_add_(0, moved, torch.ones_like(moved))
        taken = torch.zeros_like(used, dtype=torch.long).scatter_add_(1, wanted.clamp(min=0), granted.long())
        used = used | (taken > 0)
        overflow, rerouted = overflow & ~granted, rerouted | granted
    return indices, gate_weights(scores, indices, score), rerouted


def expert_choice_route(scores: torch.Tensor, selection: torch.Tensor, capacity: int) -> Routing:
    """Expert choice (Zhou et al. 2022): every expert takes the C = min(capacity, T) tokens of highest
    `selection` among these T tokens, weighted by `scores` (no renormalisation), so a token gets 0..E
    experts. A Routing with k = E columns (one per expert, -1 where not chosen) and R = E*C rows, all kept;
    `dropped` counts the tokens no expert chose."""
    num_tokens, num_experts = scores.shape
    capacity = min(capacity, num_tokens)
    chosen_tokens = torch.topk(selection.detach().t(), capacity, dim=1).indices  # (E, C) best first
    rows = torch.arange(num_experts * capacity, device=scores.device).view(num_experts, capacity)
    row_index = torch.full((num_experts, num_tokens), -1, dtype=torch.long, device=scores.device)
    row_index = row_index.scatter_(1, chosen_tokens, rows).t().contiguous()  # (T, E)
    kept = row_index >= 0
    return Routing(token_index=chosen_tokens.flatten(), row_index=row_index, combine_weights=scores * kept,
                   tokens_per_expert=torch.full((num_experts,), capacity, dtype=torch.long, device=scores.device),
                   kept=kept, dropped=(~kept.any(dim=1)).sum(), capacity=capacity)
