"""The kept rows of a routing plan, compacted, for comparing plans in tests: `dispatch` is `route`, then only the
first N rows (N = kept assignments, read on the host), ordered by expert then priority."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from dist_moe.model.moe.dispatch import route


@dataclass
class Dispatch:
    token_index: torch.Tensor  # (N,) int64: source token of each kept assignment; x[token_index] is expert-ordered
    combine_weights: torch.Tensor  # (N,) fp32: gate weight of each kept assignment
    tokens_per_expert: torch.Tensor  # as in Routing
    kept: torch.Tensor
    capacity: int


def dispatch(indices: torch.Tensor, weights: torch.Tensor, num_experts: int, capacity: Optional[int],
             drop_policy: str = "position", normalize_weights: bool = True) -> Dispatch:
    plan = route(indices, weights, num_experts, capacity, drop_policy, normalize_weights)
    num_kept = int(plan.tokens_per_expert.sum())
    return Dispatch(token_index=plan.token_index[:num_kept], combine_weights=plan.row_weights()[:num_kept],
                    tokens_per_expert=plan.tokens_per_expert, kept=plan.kept, capacity=plan.capacity)


def w1_w3(experts) -> tuple[torch.Tensor, torch.Tensor]:
    """(w1, w3) of SwiGLUExperts, each (E_local, D, F): views of its w13 = [w1 (gate) | w3 (up)]."""
    return experts.w13.chunk(2, dim=2)
