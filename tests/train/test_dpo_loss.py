"""DPO's loss and metrics against TRL: its DPOTrainer's own loss code (sigmoid, IPO) on the same per-token
log-probabilities, and TRL's documented formulas in float64 (conservative DPO's label smoothing, which TRL 1.x
no longer has in its sigmoid loss); the summed log-probabilities against a token-by-token float64 loop."""

import math
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dist_moe.config import DPOConfig
from dist_moe.train.dpo import preference_loss, sequence_logps

ROOT = Path(__file__).resolve().parents[2]
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def random_pairs(batch=6, width=9, seed=0):
    """Per-token log-probs (2B, T-1), chosen rows first, and a completion mask with ragged prompts and padding."""
    g = torch.Generator().manual_seed(seed)
    per_token = -torch.rand(2 * batch, width - 1, generator=g, dtype=torch.float64) * 3
    ref_per_token = per_token + 0.3 * torch.randn(2 * batch, width - 1, generator=g, dtype=torch.float64)
    mask = torch.zeros(2 * batch, width, dtype=torch.int64)  # TRL's completion_mask over input positions
    for row in range(2 * batch):
        start, end = torch.randint(1, 4, (), generator=g).item(), torch.randint(5, width + 1, (), generator=g).item()
        mask[row, start:end] = 1
    return per_token, ref_per_token, mask


def ours(per_token, ref_per_token, mask, cfg):
    shift = mask[:, 1:].to(per_token.dtype)  # completion tokens as prediction targets
    policy, ref = (per_token * shift).sum(1), (ref_per_token * shift).sum(1)
    tokens = shift.sum(1)
    losses, metrics = preference_loss(*policy.chunk(2), *ref.chunk(2), *tokens.chunk(2), cfg)
    return losses.mean(), metrics


def import_trl_dpo():
    """TRL's trainer module; imported with the repository root off sys.path, where our kernels/ folder would
    shadow the Hugging Face `kernels` package that transformers imports when it is installed."""
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    shadow = sys.modules.pop("kernels", None)
    try:
        return pytest.importorskip("trl.trainer.dpo_trainer")
    finally:
        sys.path[:] = saved
        if shadow is not None:
            sys.modules["kernels"] = shadow


def trl_loss(per_token, ref_per_token, mask, loss_type, beta):
    """DPOTrainer._compute_loss itself, on a stand-in trainer whose model returns these per-token log-probs
    (already masked, as TRL's fused LM head returns them) and with precomputed reference log-probs."""
    dpo_trainer = import_trl_dpo()
    shift = mask[:, 1:].to(per_token.dtype)
    outputs = SimpleNamespace(log_probs=per_token * shift, entropy=torch.zeros_like(per_token),
                              mean_logits=torch.zeros_like(per_token),
                              is_top1=torch.zeros_like(shift, dtype=torch.bool))
    model = SimpleNamespace(training=True)
    ref_chosen, ref_rejected = (ref_per_token * shift).sum(1).chunk(2)
    trainer = SimpleNamespace(
        model=model, accelerator=SimpleNamespace(device="cpu", gather=lambda t: t, gather_for_metrics=lambda t: t),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, use_weighting=False, label_smoothing=0.0,
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = dpo_trainer.DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("loss_type, beta", [("sigmoid", 0.1), ("sigmoid", 0.7), ("ipo", 0.1), ("ipo", 0.5)])
def test_loss_and_metrics_equal_trl_dpo_trainers_own(loss_type, beta):
    for seed in range(3):
        per_token, ref_per_token, mask = random_pairs(seed=seed)
        expected_loss, expected = trl_loss(per_token, ref_per_token, mask, loss_type, beta)
        loss, metrics = ours(per_token, ref_per_token, mask, DPOConfig(loss=loss_type, beta=beta))
        torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-12)
        for name in METRICS:
            assert metrics[name].item() == pytest.approx(expected[name], rel=1e-12, abs=1e-12), name
        assert 0 < expected["rewards/accuracies"] < 1  # the random pairs exercise both outcomes


def trl_documented_loss(pc, pr, rc, rr, beta, label_smoothing):
    """TRL's `dpo_loss` (sigmoid with label smoothing, conservative DPO), written out scalar by scalar."""
    h = beta * ((pc - pr) - (rc - rr))
    log_sigmoid = lambda x: -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))
    return -log_sigmoid(h) * (1 - label_smoothing) - log_sigmoid(-h) * label_smoothing


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_label_smoothed_sigmoid_equals_trls_documented_conservative_dpo_formula(label_smoothing):
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (-40 * torch.rand(16, generator=g, dtype=torch.float64) for _ in range(4))
    tokens = torch.full((16,), 7.0, dtype=torch.float64)
    cfg = DPOConfig(beta=0.2, label_smoothing=label_smoothing)
    losses, metrics = preference_loss(pc, pr, rc, rr, tokens, tokens, cfg)
    expected = [trl_documented_loss(*(t[i].item() for t in (pc, pr, rc, rr)), 0.2, label_smoothing) for i in range(16)]
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    chosen = [0.2 * (pc[i] - rc[i]).item() for i in range(16)]
    rejected = [0.2 * (pr[i] - rr[i]).item() for i in range(16)]
    assert metrics["rewards/margins"].item() == pytest.approx(sum(chosen) / 16 - sum(rejected) / 16, rel=1e-12)
    assert metrics["rewards/accuracies"].item() == sum(c > r for c, r in zip(chosen, rejected)) / 16


def test_loss_is_log2_with_zero_gradient_balance_when_policy_equals_reference():
    logps = torch.tensor([-3.0, -5.0], dtype=torch.float64, requires_grad=True)
    losses, metrics = preference_loss(logps[:1], logps[1:], logps[:1].detach(), logps[1:].detach(),
                                      torch.ones(1), torch.ones(1), DPOConfig(beta=0.5))
    losses.sum().backward()
    assert losses.item() == pytest.approx(math.log(2), rel=1e-12)
    assert logps.grad.tolist() == pytest.approx([-0.25, 0.25], rel=1e-12)  # -beta/2 toward chosen, +beta/2 away
    assert metrics["rewards/accuracies"].item() == 0.0  # ties are not wins (TRL: chosen > rejected)


def test_sequence_logps_sum_the_masked_targets_only():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 6, 11, generator=g)
    targets = torch.randint(0, 11, (3, 6), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    got = sequence_logps(logits, targets, mask)
    for row in range(3):
        expected = 0.0
        for t in range(6):
            if mask[row, t]:
                row_logits = logits[row, t].double()
                expected += row_logits[targets[row, t]].item() - torch.logsumexp(row_logits, 0).item()
        assert got[row].item() == pytest.approx(expected, rel=1e-5)
    assert got.dtype == torch.float32 and sequence_logps(logits.bfloat16(), targets, mask).dtype == torch.float32
