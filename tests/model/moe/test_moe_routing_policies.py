"""Routing policies (docs/routing.md) against the naive per-token references of moe_reference.py, in float64:
every score x overflow x routing combination (rerouting on overflow, expert choice, sigmoid scores), the
selection bias and its update, the sequence and global-batch aux losses, what capacity does to causality,
and rsample against DeepSpeed's own gating functions on the same Gumbel noise."""

import itertools
import math

import pytest
import torch
from deepspeed.moe import sharded_moe
from kept_rows import w1_w3
from moe_reference import (naive_combine, naive_expert_choice, naive_route, naive_scores, naive_switch_loss,
                           naive_token_choice)

from dist_moe.config import Config, ConfigError, _choice_keys, load_config
from dist_moe.model.moe.dispatch import reroute, route
from dist_moe.model.moe.layer import MoELayer
from dist_moe.model.moe.router import Router, end_router_step


def config(**moe) -> Config:
    cfg = Config()
    cfg.model.d_model, cfg.model.d_ff, cfg.model.init_std = 16, 24, 0.3
    cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.min_capacity = 6, 2, 1
    for key, value in moe.items():
        setattr(cfg.moe, key, value)
    return cfg


def layer_and_input(cfg: Config, seed: int, tokens: int = 30):
    torch.manual_seed(seed)
    layer = MoELayer(cfg, None).double().train()
    x = torch.randn(2, tokens // 2, 16, dtype=torch.float64)
    logits = (x.view(-1, 16) @ layer.router.weight.t()).detach()
    return layer, x, logits


def capacity_of(cfg: Config, num_tokens: int) -> int:
    m = cfg.moe
    return max(math.ceil(num_tokens / m.num_experts * m.capacity_factor * m.top_k), m.min_capacity)


# Every score x overflow x routing combination the config accepts has a float64 reference test below (the last
# test checks that against the choices config.validate allows). Token choice: (top_k, drop_policy, normalize_weights, balance, tries,
# seed); the biased cases (aux_free, both) select with a random selection bias, so selection and scores differ.
# The probs cases' seeds 30 (k=2) and 23 (k=3): with sigmoid scores and rerouting, some token's gates change when
# its other choice moves, and the final capacity decision at a full expert differs from the first one
# (see dispatch.reroute).
TOKEN_CHOICE_CASES = [(1, "position", True, "aux_free", 2, 12), (1, "probs", True, "aux", 1, 11),
                      (2, "position", True, "both", 3, 23), (2, "probs", False, "aux_free", 2, 30),
                      (3, "position", False, "aux", 2, 32), (3, "probs", True, "none", 1, 23)]
EXPERT_CHOICE_CAPACITY_FACTORS = [0.5, 1.0, 3.0]


def gate_pairs(choices, gates, kept, normalize: bool):
    """[(expert, gate)] per token over its kept choices, renormalised over them if asked (k >= 2)."""
    out = []
    for t, (row, keep) in enumerate(zip(choices, kept)):
        pairs = [(e, gates[t, e]) for e, k in zip(row, keep) if k]
        total = sum(g for _, g in pairs)
        out.append([(e, g / total) for e, g in pairs] if normalize and len(row) > 1 else pairs)
    return out


@pytest.mark.parametrize("case", TOKEN_CHOICE_CASES)
@pytest.mark.parametrize("overflow", ["drop", "reroute"])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_token_choice_layer_equals_naive_per_token_reference(score, overflow, case):
    top_k, policy, normalize, balance, tries, seed = case
    cfg = config(top_k=top_k, score=score, overflow=overflow, drop_policy=policy, normalize_weights=normalize,
                 balance=balance, reroute_tries=tries, capacity_factor=1.0)
    layer, x, logits = layer_and_input(cfg, seed=seed, tokens=40)
    probs, scores = naive_scores(logits, score)
    selection = scores
    if layer.router.selection_bias is not None:
        bias = torch.randn(6, generator=torch.Generator().manual_seed(top_k)) * float(scores.std())
        layer.router.selection_bias.copy_(bias)
        selection = scores + bias.double()
    capacity = capacity_of(cfg, 40)
    choices, gates, kept, rerouted, first = naive_token_choice(scores, selection, top_k, score, capacity, policy,
                                                               overflow, tries)
    e = layer.experts
    y_ref = naive_combine(x.view(-1, 16), gate_pairs(choices, gates, kept, normalize), *w1_w3(e), e.w2)
    y, aux, _ = layer(x)
    torch.testing.assert_close(y.view(-1, 16), y_ref, rtol=1e-5, atol=1e-6)  # fp32 gates
    aux_ref = naive_switch_loss(probs, first, 6) if balance in ("aux", "both") else 0.0  # f: biased, pre-reroute
    torch.testing.assert_close(aux.double(), torch.as_tensor(aux_ref, dtype=torch.float64), rtol=1e-6, atol=0)
    stats = layer.last_stats
    num_rerouted, num_dropped = sum(map(sum, rerouted)), sum(not k for row in kept for k in row)
    assert int(stats.rerouted) == num_rerouted and int(stats.dropped) == num_dropped
    assert (num_rerouted if overflow == "reroute" else num_dropped) > 0  # the case exercises what it names
    assert stats.tokens_per_expert.max() <= capacity
    assert torch.equal(stats.tokens_per_expert, torch.bincount(torch.tensor(
        [ex for row, keep in zip(choices, kept) for ex, k in zip(row, keep) if k]), minlength=6))


def test_rerouted_top1_sigmoid_token_gets_weight_one():
    """Issue 36: with sigmoid scores a rerouted k=1 token was weighted s_new / s_orig instead of 1."""
    router = Router(4, 4, top_k=1, score="sigmoid", keep_scores=True)
    router.weight.data = torch.eye(4)
    gating = router(torch.tensor([[3.0, 1, 0, 0]] * 4))
    indices, weights, rerouted = reroute(gating.indices, gating.scores, gating.selection, 2, 2, score="sigmoid")
    assert indices[:, 0].tolist() == [0, 0, 1, 1] and rerouted[:, 0].tolist() == [False, False, True, True]
    assert route(indices, weights, 4, 2).combine_weights.tolist() == [[1.0]] * 4


def test_reroute_moves_nothing_when_nothing_overflows():
    cfg = config(overflow="reroute", capacity_factor=6.0)
    layer, x, _ = layer_and_input(cfg, seed=3)
    reference = MoELayer(config(capacity_factor=6.0), None).double().train()
    reference.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x)[0], reference(x)[0], rtol=0, atol=0)
    assert int(layer.last_stats.rerouted) == 0 == int(layer.last_stats.dropped)


@pytest.mark.parametrize("capacity_factor", EXPERT_CHOICE_CAPACITY_FACTORS)
@pytest.mark.parametrize("overflow", ["drop", "reroute"])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_expert_choice_layer_equals_naive_per_token_reference(score, overflow, capacity_factor):
    """Each expert takes its C best tokens by score, weighted by the raw score (sigmoid too: no normalisation);
    moe.overflow has nothing to act on (no expert is over capacity)."""
    cfg = config(routing="expert_choice", balance="none", score=score, overflow=overflow,
                 capacity_factor=capacity_factor)
    layer, x, logits = layer_and_input(cfg, seed=5)
    _, scores = naive_scores(logits, score)
    picks = naive_expert_choice(scores, capacity_of(cfg, 30))
    assignments = [[(e, scores[t, e]) for e in range(6) if t in picks[e]] for t in range(30)]
    e = layer.experts
    y, aux, _ = layer(x)
    torch.testing.assert_close(y.view(-1, 16), naive_combine(x.view(-1, 16), assignments, *w1_w3(e), e.w2),
                               rtol=1e-5, atol=1e-6)  # fp32 gates
    assert float(aux) == 0.0
    assert layer.last_stats.tokens_per_expert.tolist() == [len(p) for p in picks]
    assert int(layer.last_stats.dropped) == sum(not a for a in assignments)  # tokens no expert chose
    assert layer.last_stats.routed == 30 and int(layer.last_stats.rerouted) == 0


def test_the_references_cover_every_accepted_score_overflow_routing_combination():
    """The parametrisations above against what the config accepts (moe.balance=none, which every routing takes):
    a new choice of moe.score, moe.overflow or moe.routing must get its reference case here."""
    choices = dict(_choice_keys())  # what config.validate allows per key
    accepted = set()
    for combo in itertools.product(choices["moe.score"], choices["moe.overflow"], choices["moe.routing"]):
        overrides = [f"moe.{key}={value}" for key, value in zip(("score", "overflow", "routing"), combo)]
        try:
            load_config(None, overrides + ["moe.balance=none"])
            accepted.add(combo)
        except ConfigError:
            pass
    tested = {(score, overflow, routing) for score in ("softmax", "sigmoid") for overflow in ("drop", "reroute")
              for routing in ("token_choice", "expert_choice")}
    assert accepted == tested
    assert {case[1] for case in TOKEN_CHOICE_CASES} == set(choices["moe.drop_policy"])
    assert {case[3] for case in TOKEN_CHOICE_CASES} == set(choices["moe.balance"])
    assert {case[0] for case in TOKEN_CHOICE_CASES} == {1, 2, 3}  # k=1, 2 (first choices counted) and k >= 3


def earlier_outputs_changed_by_the_last_token(cfg: Config, trials: int = 10) -> int:
    """Evaluation forwards of one 32-token sequence: how many outputs at positions 0..30 change, summed over
    `trials` random replacements of the token at position 31 alone (docs/routing.md, capacity and causality)."""
    torch.manual_seed(0)
    layer = MoELayer(cfg, None).double().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 32, 16, dtype=torch.float64, generator=gen)
    y = layer(x)[0]
    changed = 0
    for _ in range(trials):
        x[0, -1] = torch.randn(16, dtype=torch.float64, generator=gen)
        changed += int((layer(x)[0][0, :-1] != y[0, :-1]).any(-1).sum())
    return changed


@pytest.mark.parametrize("overrides,causal", [
    (dict(top_k=2, dropless=True), True), (dict(top_k=1, score="sigmoid", dropless=True), True),
    (dict(top_k=1), True),  # top-1 by position: the last token's only choice ranks last, it can only drop itself
    (dict(top_k=2), False), (dict(top_k=1, drop_policy="probs"), False), (dict(top_k=1, overflow="reroute"), False),
    (dict(top_k=2, routing="expert_choice", balance="none"), False)])
def test_a_capacity_lets_the_last_token_change_earlier_outputs_and_dropless_does_not(overrides, causal):
    changed = earlier_outputs_changed_by_the_last_token(config(eval_capacity_factor=1.0, **overrides))
    assert (changed == 0) == causal, changed


def test_expert_choice_depends_only_on_the_rank_s_tokens_and_refuses_generation():
    from dist_moe.model.transformer import Transformer, generate

    cfg = config(routing="expert_choice", balance="none")
    cfg.model.vocab_size, cfg.model.num_layers, cfg.model.num_heads, cfg.model.num_kv_heads = 50, 1, 2, 1
    model = Transformer(cfg)
    with pytest.raises(ConfigError, match="moe.routing.*not causal"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), 2)


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_sigmoid_scores_weights_are_normalised_over_the_top_k(top_k):
    cfg = config(top_k=top_k, score="sigmoid", capacity_factor=8.0)
    layer, x, logits = layer_and_input(cfg, seed=top_k)
    probs, sig = naive_scores(logits, "sigmoid")
    choices = naive_route(sig, top_k)
    gating = layer.router(x.view(-1, 16), num_sequences=2)
    assert gating.indices.tolist() == choices
    expected = torch.stack([sig[t, c] / sig[t, c].sum() for t, c in enumerate(choices)])
    torch.testing.assert_close(gating.weights.double(), expected, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(gating.aux_loss.double(), naive_switch_loss(probs, choices, 6), rtol=1e-6, atol=0)
    y, _, _ = layer(x)  # k=1: the one weight is 1, as DeepSeek-V3 normalises
    assignments = [[(e, sig[t, e] / sig[t, choices[t]].sum()) for e in choices[t]] for t in range(30)]
    e = layer.experts
    torch.testing.assert_close(y.view(-1, 16), naive_combine(x.view(-1, 16), assignments, *w1_w3(e), e.w2),
                               rtol=1e-5, atol=1e-6)  # fp32 gates


def test_selection_bias_moves_choices_but_not_weights():
    router = Router(16, 6, top_k=2, balance="aux_free")
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(40, 16)
    router.selection_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, -1.0]))
    gating = router.train()(x)
    probs = torch.softmax(x.double() @ router.weight.double().t(), -1).detach()
    choices = naive_route(probs + router.selection_bias.double(), 2)
    assert gating.indices.tolist() == choices
    assert all(3 in c and 5 not in c for c in choices)
    torch.testing.assert_close(gating.weights.double(), probs.gather(1, torch.tensor(choices)), rtol=1e-6, atol=0)
    assert float(gating.aux_loss) == 0.0  # aux_free: no loss


def test_bias_update_equals_hand_computation_over_a_step_of_micro_batches():
    # 4 experts, top-1, logits favour one expert per token: micro batch 1 picks e0,e0,e1; micro batch 2 e0,e2.
    # Step load (3, 1, 1, 0), mean 1.25 -> sign(mean - load) = (-1, +1, +1, +1).
    model = torch.nn.Sequential(Router(4, 4, top_k=1, balance="aux_free"))
    router = model[0]
    router.weight.data = torch.eye(4)
    onehot = torch.eye(4) * 5
    router.train()(onehot[[0, 0, 1]])
    router(onehot[[0, 2]])
    router.eval()(onehot[[3, 3, 3]])  # evaluation does not count
    end_router_step(model, update_rate=0.1)
    torch.testing.assert_close(router.selection_bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    assert router.step_selections.sum() == 0  # counters start again for the next step
    router.train()(onehot[[1, 1, 2, 3]])  # load (0, 2, 1, 1), mean 1 -> (+1, -1, 0, 0)
    end_router_step(model, update_rate=0.1)
    torch.testing.assert_close(router.selection_bias, torch.tensor([0.0, 0.0, 0.1, 0.1]))


def test_bias_stays_fp32_in_a_bf16_model_and_is_checkpointed():
    router = Router(8, 4, top_k=1, balance="both")
    router.selection_bias.fill_(1e-3)
    router.bfloat16()
    assert router.selection_bias.dtype == torch.float32 and router.selection_bias[0] == torch.tensor(1e-3)
    assert "selection_bias" in router.state_dict()


def test_sequence_aux_loss_is_the_mean_of_per_sequence_switch_losses():
    router = Router(16, 6, top_k=2, aux_loss_scope="sequence")
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(3 * 10, 16)
    aux = router.train()(x, num_sequences=3).aux_loss
    probs = torch.softmax(x.double() @ router.weight.double().t(), -1).detach()
    expected = sum(naive_switch_loss(probs[b * 10:(b + 1) * 10], naive_route(probs[b * 10:(b + 1) * 10], 2), 6)
                   for b in range(3)) / 3
    torch.testing.assert_close(aux.double(), expected, rtol=1e-6, atol=0)
    whole = naive_switch_loss(probs, naive_route(probs, 2), 6)
    assert abs(float(aux.detach()) - float(whole)) > 1e-3  # a different loss from the micro-batch one


def test_accumulated_global_batch_aux_loss_counts_every_micro_batch_of_the_step():
    model = torch.nn.Sequential(Router(16, 6, top_k=3, aux_loss_scope="global_batch", aux_loss_accumulate=True))
    router = model[0]
    torch.nn.init.normal_(router.weight, std=0.5)
    first, second = torch.randn(12, 16), torch.randn(20, 16)
    router.train()(first)
    aux = router(second).aux_loss
    probs = [torch.softmax(x.double() @ router.weight.double().t(), -1).detach() for x in (first, second)]
    choices = naive_route(probs[0], 3) + naive_route(probs[1], 3)
    f = torch.tensor([sum(c.count(e) for c in choices) / (32 * 3) for e in range(6)], dtype=torch.float64)
    torch.testing.assert_close(aux.double(), 6 * (f * probs[1].mean(0)).sum(), rtol=1e-6, atol=0)
    end_router_step(model, 1e-3)  # a new step starts counting afresh: the micro-batch loss again
    aux = router(second).aux_loss
    torch.testing.assert_close(aux.double(), naive_switch_loss(probs[1], naive_route(probs[1], 3), 6), rtol=1e-6,
                               atol=0)


def same_gumbel(router: Router, seed: int, shape) -> torch.Tensor:
    """The Gumbel noise the router draws after generator.manual_seed(seed)."""
    router.generator.manual_seed(seed)
    u = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    return -torch.log(-torch.log(1e-20 + (1.0 - 1e-20) * u))


@pytest.mark.parametrize("top_k", [1, 2])
def test_rsample_samples_what_deepspeed_samples_on_the_same_noise(top_k, monkeypatch):
    """k=1: top1gating's RSample samples the one choice; k=2: top2gating keeps the first choice clean and samples
    only the second. Same logits and noise in, same experts out (DeepSpeed's own functions)."""
    T, E = 64, 8
    router = Router(E, E, top_k=top_k, noise="rsample").train()
    router.weight.data = torch.eye(E)
    logits = torch.randn(T, E) * 0.5
    gumbel = same_gumbel(router, 11, (T, E))
    monkeypatch.setattr(sharded_moe, "gumbel_rsample", lambda shape, device: gumbel.clone())
    ours = router(logits).indices
    if top_k == 1:
        theirs = sharded_moe.top1gating(logits.clone(), 100.0, 0, noisy_gate_policy="RSample", use_rts=False,
                                        sparse_routes=True)[3]
    else:
        theirs = sharded_moe.top2gating(logits.clone(), 100.0, 0, top2_2nd_expert_sampling=True,
                                        sparse_routes=True)[3]
    assert ours.t().tolist() == theirs.long().tolist()
    clean = logits.argmax(-1)
    assert (ours[:, 0] == clean).all() if top_k == 2 else not (ours[:, 0] == clean).all()
    assert not torch.equal(ours[:, -1], torch.topk(logits, top_k).indices[:, -1])  # the noise moved some


def test_config_refuses_combinations_without_a_meaning():
    for overrides, key in [(["moe.routing=expert_choice"], "moe.balance"),
                           (["moe.noise=rsample", "moe.score=sigmoid"], "moe.noise"),
                           (["moe.impl=deepspeed", "moe.overflow=reroute"], "moe.overflow"),
                           (["moe.routing=expert_choice", "moe.balance=none", "moe.dropless=true"], "moe.dropless"),
                           (["moe.reroute_tries=0"], "moe.reroute_tries"), (["moe.balance=loss"], "moe.balance"),
                           (["moe.aux_loss_accumulate=true"], "moe.aux_loss_accumulate"),
                           (["moe.balance=aux_free", "moe.aux_loss_scope=sequence"], "moe.aux_loss_scope")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, overrides)
