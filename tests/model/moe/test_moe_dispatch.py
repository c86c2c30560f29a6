import pytest
import torch
from kept_rows import dispatch
from moe_reference import naive_keep, naive_route


def random_routing(num_tokens, num_experts, k, seed):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(num_tokens, num_experts, generator=gen) * 2, -1)
    order = torch.argsort(probs, -1, descending=True)[:, :k]
    return probs, order, probs.gather(1, order)


@pytest.mark.parametrize("policy", ["position", "probs"])
@pytest.mark.parametrize("num_tokens,num_experts,k,capacity", [
    (13, 4, 1, 2), (40, 8, 2, 6), (33, 8, 3, 9), (50, 16, 8, 20), (7, 3, 2, 1), (64, 8, 2, 100)])
def test_dropped_assignments_are_exactly_those_beyond_capacity(policy, num_tokens, num_experts, k, capacity):
    probs, indices, weights = random_routing(num_tokens, num_experts, k, seed=num_tokens * k)
    plan = dispatch(indices, weights, num_experts, capacity, policy, normalize_weights=False)
    expected = naive_keep(naive_route(probs, k), probs, num_experts, capacity, policy)
    assert plan.kept.tolist() == expected
    kept_per_expert = torch.bincount(indices[plan.kept], minlength=num_experts)
    assert torch.equal(plan.tokens_per_expert, kept_per_expert)
    assert plan.tokens_per_expert.max() <= capacity


def test_rows_are_expert_ordered_and_weights_follow_their_token():
    probs, indices, weights = random_routing(30, 6, 2, seed=1)
    plan = dispatch(indices, weights, 6, 7, "position", normalize_weights=False)
    expert = torch.repeat_interleave(torch.arange(6), plan.tokens_per_expert)
    for row, (token, e) in enumerate(zip(plan.token_index.tolist(), expert.tolist())):
        assert e in indices[token].tolist()
        assert plan.combine_weights[row] == probs[token, e]  # raw probability when not renormalised
    assert len(plan.token_index) == int(plan.kept.sum())


def test_renormalisation_happens_after_dropping():
    # Token 1's second choice (expert 0) overflows capacity 1: its first choice then carries weight 1.
    indices = torch.tensor([[0, 1], [1, 0]])
    weights = torch.tensor([[0.6, 0.3], [0.5, 0.4]])
    plan = dispatch(indices, weights, 2, 1, "position", normalize_weights=True)
    assert plan.kept.tolist() == [[True, False], [True, False]]
    torch.testing.assert_close(plan.combine_weights, torch.tensor([1.0, 1.0]))
    plan = dispatch(indices, weights, 2, None, "position", normalize_weights=True)
    by_token = torch.zeros(2, 2).index_put((plan.token_index, torch.tensor([0, 0, 1, 1])), plan.combine_weights)
    torch.testing.assert_close(by_token, torch.tensor([[6 / 9, 3 / 9], [4 / 9, 5 / 9]]))


def test_dropless_keeps_every_assignment():
    probs, indices, weights = random_routing(25, 4, 3, seed=2)
    plan = dispatch(indices, weights, 4, None, "probs")
    assert plan.kept.all() and plan.capacity == 25
    assert torch.equal(plan.tokens_per_expert, torch.bincount(indices.flatten(), minlength=4))
    torch.testing.assert_close(torch.zeros(25).index_add(0, plan.token_index, plan.combine_weights), torch.ones(25))
