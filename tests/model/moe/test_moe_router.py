import math

import pytest
import torch

from dist_moe.model.moe.router import Router, load_balancing_loss, router_z_loss


def test_aux_loss_hand_computed_top2():
    # 4 tokens, 2 experts. First choices: e0, e0, e1, e0 -> f = (3/4, 1/4); P = column means of probs.
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.7, 0.3]])
    indices = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1]])
    expected = 2 * (0.75 * 0.6 + 0.25 * 0.4)  # E * sum_e f_e P_e = 1.1
    assert load_balancing_loss(probs, indices).item() == pytest.approx(expected, abs=1e-6)


def test_aux_loss_hand_computed_top3_counts_every_assignment():
    # 2 tokens, 4 experts, k=3: assignments e0,e1,e2 and e0,e1,e3 -> f = (2, 2, 1, 1) / 6.
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])
    indices = torch.tensor([[0, 1, 2], [0, 1, 3]])
    mean_p = probs.mean(0)
    expected = 4 * sum(f * p for f, p in zip([2 / 6, 2 / 6, 1 / 6, 1 / 6], mean_p.tolist()))
    assert load_balancing_loss(probs, indices).item() == pytest.approx(expected, abs=1e-6)


def test_aux_loss_is_one_when_perfectly_balanced():
    probs = torch.full((8, 4), 0.25)
    indices = torch.arange(8).remainder(4)[:, None]
    assert load_balancing_loss(probs, indices).item() == pytest.approx(1.0)


def test_z_loss_closed_form():
    logits = torch.randn(5, 3)
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 5
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-5)


def test_topk_picks_most_probable_experts_with_their_probabilities():
    torch.manual_seed(0)
    router = Router(16, 6, top_k=3)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(20, 16)
    weights, indices, _, _, stats = router(x)[:5]
    expected_probs = torch.softmax(x @ router.weight.t(), -1)
    order = torch.argsort(expected_probs, dim=-1, descending=True)[:, :3]
    assert torch.equal(indices, order)
    torch.testing.assert_close(weights, expected_probs.gather(1, order))
    entropy = -(expected_probs * expected_probs.log()).sum()
    torch.testing.assert_close(stats, torch.stack([entropy, expected_probs.max(-1).values.sum()]))


@pytest.mark.parametrize("noise", ["learned", "jitter", "rsample"])
def test_noise_is_seeded_and_training_only(noise):
    torch.manual_seed(0)
    router = Router(16, 8, top_k=2, noise=noise, noise_eps=0.5)
    torch.nn.init.normal_(router.weight, std=0.02)  # small logits, so the noise changes the choices
    if router.noise_weight is not None:
        torch.nn.init.normal_(router.noise_weight)
    x = torch.randn(64, 16)
    router.eval()
    clean = router(x)
    router.train()
    router.generator.manual_seed(7)
    first = router(x)
    router.generator.manual_seed(7)
    again = router(x)
    assert torch.equal(first[1], again[1]) and torch.equal(first[0], again[0])
    assert not torch.equal(first[1], clean[1])  # noise changed some routing decisions
    router.eval()
    assert torch.equal(router(x)[1], clean[1])


def test_rsample_weights_come_from_the_clean_softmax():
    torch.manual_seed(0)
    router = Router(8, 4, top_k=1, noise="rsample")
    torch.nn.init.normal_(router.weight)
    x = torch.randn(32, 8)
    weights, indices, _, _, _ = router.train()(x)[:5]
    clean = torch.softmax(x @ router.weight.t(), -1)
    assert not torch.equal(indices[:, 0], clean.argmax(-1))  # Gumbel noise picked some other expert
    torch.testing.assert_close(weights, clean.gather(1, indices))


def test_sigmoid_gating_keeps_the_raw_scores_and_normalises_only_the_weights():
    """Gating.scores are what expert choice weighs by and rerouting re-weighs from: sigmoid(logits) itself, not
    divided by the token's top-k sum (issue 36); the weights are the chosen k normalised to sum 1."""
    torch.manual_seed(0)
    router = Router(16, 6, top_k=2, score="sigmoid", keep_scores=True)
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(20, 16)
    gating = router(x)
    sig = torch.sigmoid(x.double() @ router.weight.double().t())
    torch.testing.assert_close(gating.scores.double(), sig, rtol=1e-6, atol=1e-9)
    chosen = sig.gather(1, gating.indices)
    torch.testing.assert_close(gating.weights.double(), chosen / chosen.sum(-1, keepdim=True), rtol=1e-6, atol=1e-9)
