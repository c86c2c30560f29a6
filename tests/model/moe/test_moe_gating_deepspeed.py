"""dist_moe's gating (router + dispatch) against DeepSpeed's own functions in deepspeed.moe.sharded_moe.

Logits are fed through an identity router (D = E, weight = I), so both sides see the same logits. Our
sparse plan is expanded into DeepSpeed's dense (T, E, C) combine tensor: capacity, kept tokens, expert and
slot assignment and combine weights must all agree.
"""

import itertools

import pytest
import torch
from deepspeed.moe.sharded_moe import _capacity, top1gating, top2gating, topkgating
from kept_rows import dispatch

from dist_moe.model.moe.dispatch import expert_capacity
from dist_moe.model.moe.router import Router

SHAPES = [(10, 4), (37, 8), (64, 8), (23, 5), (128, 16)]  # (tokens, experts), several not divisible


def route(logits: torch.Tensor, k: int):
    router = Router(logits.shape[1], logits.shape[1], top_k=k)
    router.weight.data = torch.eye(logits.shape[1])
    return router(logits)[:5]


def dense_combine(plan, num_experts: int, capacity: int, num_tokens: int) -> torch.Tensor:
    """Our plan as DeepSpeed's (T, E, C) combine_weights: slot = rank inside the expert's segment."""
    expert = torch.repeat_interleave(torch.arange(num_experts), plan.tokens_per_expert)
    start = torch.cumsum(plan.tokens_per_expert, 0) - plan.tokens_per_expert
    slot = torch.arange(len(expert)) - start[expert]
    dense = torch.zeros(num_tokens, num_experts, capacity)
    dense[plan.token_index, expert, slot] = plan.combine_weights
    return dense


def ds_capacity(num_tokens, num_experts, k, factor, min_capacity) -> int:
    return int(_capacity(torch.empty(num_tokens, num_experts), torch.tensor(factor * k), torch.tensor(min_capacity)))


def test_capacity_equals_deepspeed_including_rounding_edges():
    factors = [0.5, 1.0, 1.1, 1.25, 1.5, 2.0, 0.3, 1.7]
    for num_tokens, num_experts, k, factor, min_cap in itertools.product(
            [1, 7, 10, 37, 64, 100, 1000, 4096], [2, 3, 8, 10, 64], [1, 2, 3, 8], factors, [0, 4]):
        ours = expert_capacity(num_tokens, num_experts, k, factor, min_cap)
        assert ours == ds_capacity(num_tokens, num_experts, k, factor, min_cap), (num_tokens, num_experts, k, factor)


@pytest.mark.parametrize("num_tokens,num_experts", SHAPES)
@pytest.mark.parametrize("factor", [0.5, 1.0, None])  # None = dropless
def test_top2_equals_deepspeed_top2gating(num_tokens, num_experts, factor):
    torch.manual_seed(num_tokens * num_experts)
    logits = torch.randn(num_tokens, num_experts) * 2
    l_aux, combine, _, exp_counts = top2gating(logits.clone(), factor or 1.0, 1, drop_tokens=factor is not None,
                                               top2_2nd_expert_sampling=False)
    weights, indices, aux, _, _ = route(logits, 2)
    capacity = None if factor is None else expert_capacity(num_tokens, num_experts, 2, factor, 1)
    plan = dispatch(indices, weights, num_experts, capacity, "position", normalize_weights=True)
    assert combine.shape[2] == (capacity or int(exp_counts.max()))
    if factor == 0.5:
        assert not plan.kept.all()  # the case really drops tokens
    torch.testing.assert_close(dense_combine(plan, num_experts, combine.shape[2], num_tokens), combine)
    torch.testing.assert_close(aux, l_aux)
    torch.testing.assert_close(torch.bincount(indices.flatten(), minlength=num_experts), exp_counts)


@pytest.mark.parametrize("num_tokens,num_experts", SHAPES)
@pytest.mark.parametrize("factor", [0.5, 1.0])
def test_top1_by_position_equals_deepspeed(num_tokens, num_experts, factor):
    """top1gating (use_rts off) keeps whichever tokens torch.topk returns among equal mask values, which is
    not by position; topkgating(k=1, drop_policy='position') is. Capacity, expert choice, weights, aux and
    per-expert kept counts must match the first; the kept set and slots must match the second."""
    torch.manual_seed(num_tokens + num_experts)
    logits = torch.randn(num_tokens, num_experts) * 2
    min_cap = 1
    l_aux, combine1, _, _ = top1gating(logits.clone(), factor, min_cap, use_rts=False)
    _, combine_k, _, _ = topkgating(logits.clone(), 1, factor, min_cap, drop_policy="position")
    weights, indices, aux, _, _ = route(logits, 1)
    plan = dispatch(indices, weights, num_experts, expert_capacity(num_tokens, num_experts, 1, factor, min_cap),
                    "position", normalize_weights=True)
    capacity = combine1.shape[2]
    assert plan.capacity == capacity == combine_k.shape[2]
    ours = dense_combine(plan, num_experts, capacity, num_tokens)
    torch.testing.assert_close(ours.bool().sum((0, 2)), combine1.bool().sum((0, 2)))  # kept per expert
    assert torch.equal(ours.bool(), combine_k.bool())  # same tokens, same experts, same slots
    kept_in_both = ours.sum(-1).bool() & combine1.sum(-1).bool()
    torch.testing.assert_close(ours.sum(-1)[kept_in_both], combine1.sum(-1)[kept_in_both])  # un-normalised
    torch.testing.assert_close(aux, l_aux)


@pytest.mark.parametrize("num_tokens,num_experts", SHAPES)
@pytest.mark.parametrize("k", [3, 4])
@pytest.mark.parametrize("factor", [0.5, 1.0, None])
def test_topk_by_probs_equals_deepspeed_topkgating(num_tokens, num_experts, k, factor):
    """DeepSpeed's layer gates k >= 3 with topkgating's default drop_policy='probs'. Its slots are assigned
    in token order after the fact, so kept set, weights and capacity are compared per (token, expert)."""
    torch.manual_seed(k * num_tokens)
    logits = torch.randn(num_tokens, num_experts) * 2
    l_aux, combine, _, exp_counts = topkgating(logits.clone(), k, factor or 1.0, 1, drop_tokens=factor is not None)
    weights, indices, aux, _, _ = route(logits, k)
    capacity = None if factor is None else expert_capacity(num_tokens, num_experts, k, factor, 1)
    plan = dispatch(indices, weights, num_experts, capacity, "probs", normalize_weights=True)
    if capacity is not None:
        assert capacity == combine.shape[2]
    ours = dense_combine(plan, num_experts, max(capacity or 0, num_tokens), num_tokens).sum(-1)
    torch.testing.assert_close(ours, combine.sum(-1))
    assert torch.equal(ours.bool(), combine.bool().any(-1))
    torch.testing.assert_close(aux, l_aux)
    torch.testing.assert_close(torch.bincount(indices.flatten(), minlength=num_experts), exp_counts)
