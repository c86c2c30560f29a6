"""Approach 3: objective against scipy's huber/logsumexp, recovery of known laws, Epoch's published fit."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.special import huber, logsumexp

from dist_moe.scaling.fit import (
    LossLaw,
    bootstrap,
    fit_loss_law,
    grid_starts,
    huber_objective,
    joint_starts,
    percentile_interval,
)
from dist_moe.scaling.results import ScalingDataError, read_results

EPOCH_CSV = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "chinchilla_epoch_svg_extracted.csv"
HOFFMANN = LossLaw(A=406.4, B=410.7, E=1.69, alpha=0.34, beta=0.28)


def _factorial_runs(law: LossLaw, noise: float, seed: int, experts=(1,)):
    """8 sizes x 8 token counts (x expert counts), log-normal noise of std `noise` on the loss."""
    n, d, x = (v.ravel() for v in np.meshgrid(np.geomspace(1e7, 1e10, 8), np.geomspace(1e9, 1e12, 8),
                                              np.array(experts, dtype=np.float64)))
    rng = np.random.default_rng(seed)
    return n, d, x, law(n, d, x) * np.exp(rng.normal(0.0, noise, len(n)))


def _naive_objective(theta, n, d, loss, x, delta):
    a, b, e, alpha, beta, gamma = theta
    total = 0.0
    for i in range(len(n)):
        pred = logsumexp([a - alpha * np.log(n[i]) - gamma * np.log(x[i]), b - beta * np.log(d[i]), e])
        total += huber(delta, pred - np.log(loss[i]))
    return total


@pytest.mark.parametrize("joint", [False, True])
def test_objective_and_gradient_match_naive_huber_logsumexp(joint):
    rng = np.random.default_rng(0)
    n, d, x, loss = _factorial_runs(HOFFMANN, 0.01, seed=1, experts=(1, 4))
    theta = np.array([6.0, 6.2, 0.5, 0.3, 0.3, 0.1]) + rng.normal(0, 0.05, 6)
    if not joint:
        theta[5], x = 0.0, np.ones_like(x)
    params = theta if joint else theta[:5]
    data = (np.log(n), np.log(d), np.log(loss), np.log(x) if joint else None)
    for delta in (1e-3, 1e-1):  # both Huber regimes dominate in turn
        value, grad = huber_objective(params, *data, delta=delta)
        assert value == pytest.approx(_naive_objective(theta, n, d, loss, x, delta), rel=1e-10)
        step = 1e-6
        numeric = [(huber_objective(params + step * e, *data, delta=delta)[0]
                    - huber_objective(params - step * e, *data, delta=delta)[0]) / (2 * step)
                   for e in np.eye(len(params))]
        np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-9)


def test_recovers_hoffmann_law_from_noisy_synthetic_runs():
    n, d, _, loss = _factorial_runs(HOFFMANN, noise=0.003, seed=0)
    law = fit_loss_law(n, d, loss, starts=grid_starts("coarse")).law
    assert law.E == pytest.approx(HOFFMANN.E, rel=0.01)
    assert law.alpha == pytest.approx(HOFFMANN.alpha, rel=0.04)
    assert law.beta == pytest.approx(HOFFMANN.beta, rel=0.04)
    assert law.A == pytest.approx(HOFFMANN.A, rel=0.2)
    assert law.B == pytest.approx(HOFFMANN.B, rel=0.2)


def test_joint_fit_recovers_expert_exponent_gamma():
    truth = LossLaw(A=406.4, B=410.7, E=1.69, alpha=0.34, beta=0.28, gamma=0.15)
    n, d, x, loss = _factorial_runs(truth, noise=0.003, seed=0, experts=(1, 4, 16))
    per_count = {int(k): fit_loss_law(n[x == k], d[x == k], loss[x == k], starts=grid_starts("coarse")).law
                 for k in (1, 4, 16)}
    law = fit_loss_law(n, d, loss, num_experts=x, starts=joint_starts(per_count)).law
    assert law.gamma == pytest.approx(0.15, abs=0.015)
    assert law.alpha == pytest.approx(0.34, rel=0.04)
    assert law.E == pytest.approx(1.69, rel=0.01)


def test_bootstrap_spread_matches_spread_over_independent_noise():
    """Bootstrap intervals must be as wide as the estimator's real scatter (refits must not stall)."""
    n, d, _, loss = _factorial_runs(HOFFMANN, noise=0.01, seed=0)
    center = fit_loss_law(n, d, loss, starts=HOFFMANN.theta[None, :5])
    laws = bootstrap(n, d, loss, center, resamples=40, seed=0, progress=False)
    independent = [fit_loss_law(n, d, other, starts=HOFFMANN.theta[None, :5]).law.alpha
                   for other in (_factorial_runs(HOFFMANN, 0.01, seed)[3] for seed in range(1, 21))]
    ratio = np.std([law.alpha for law in laws]) / np.std(independent)
    assert 0.5 < ratio < 2.0
    lo, hi = percentile_interval([law.alpha for law in laws], 0.95)
    assert lo < center.law.alpha < hi


def test_parallel_grid_search_finds_the_serial_optimum():
    n, d, _, loss = _factorial_runs(HOFFMANN, noise=0.003, seed=2)
    starts = grid_starts("paper")[::15]  # 300 starts: above the threshold for going parallel
    serial = fit_loss_law(n, d, loss, starts=starts, workers=1)
    parallel = fit_loss_law(n, d, loss, starts=starts, workers=2)
    assert parallel.objective == pytest.approx(serial.objective, rel=1e-9)
    np.testing.assert_allclose(parallel.theta, serial.theta, rtol=1e-6)


def test_too_few_runs_or_one_model_size_is_a_clear_error():
    n, d, _, loss = _factorial_runs(HOFFMANN, noise=0.003, seed=0)
    with pytest.raises(ScalingDataError, match="need at least 6 runs, got 4"):
        fit_loss_law(n[:4], d[:4], loss[:4])
    one_size = n == n[0]
    with pytest.raises(ScalingDataError, match="2 distinct model sizes"):
        fit_loss_law(n[one_size], d[one_size], loss[one_size])
    with pytest.raises(ScalingDataError, match="need at least 7 runs, got 6"):
        fit_loss_law(n[:6], d[:6], loss[:6], num_experts=np.arange(1, 7))
    with pytest.raises(ScalingDataError, match="fits 3 parameters: need at least 4 runs, got 3"):
        fit_loss_law(n[:3], d[:3], loss[:3], fixed={"alpha": 0.34, "beta": 0.28})


def test_fixed_exponents_are_held_and_the_rest_recovered():
    n, d, _, loss = _factorial_runs(HOFFMANN, noise=0.0, seed=0)
    pick = [0, 9, 18, 63]  # four runs: too few for five free parameters, enough for three
    fit = fit_loss_law(n[pick], d[pick], loss[pick], starts=grid_starts("coarse"),
                       fixed={"alpha": HOFFMANN.alpha, "beta": HOFFMANN.beta})
    assert (fit.law.alpha, fit.law.beta) == (HOFFMANN.alpha, HOFFMANN.beta)
    assert fit.law.E == pytest.approx(HOFFMANN.E, rel=1e-4)
    assert fit.law.A == pytest.approx(HOFFMANN.A, rel=1e-3)
    assert fit.law.B == pytest.approx(HOFFMANN.B, rel=1e-3)
    laws = bootstrap(n[pick], d[pick], loss[pick], fit, resamples=5, progress=False)
    assert all(law.alpha == HOFFMANN.alpha and law.beta == HOFFMANN.beta for law in laws)


@pytest.mark.skipif(not EPOCH_CSV.is_file(), reason="Epoch's Chinchilla extraction is not beside the repo")
def test_reproduces_epoch_lbfgs_fit_on_chinchilla_runs():
    """Besiroglu et al. 2024: 245 runs less the five highest-loss ones, paper grid, L-BFGS."""
    table = read_results(EPOCH_CSV)
    kept = table.select(table.val_loss < np.sort(table.val_loss)[-5])
    assert len(kept) == 240
    law = fit_loss_law(kept.n_active, kept.tokens, kept.val_loss, workers=2).law
    assert law.E == pytest.approx(1.8172, rel=0.02)
    assert law.alpha == pytest.approx(0.3473, rel=0.02)
    assert law.beta == pytest.approx(0.3672, rel=0.02)
    assert law.A == pytest.approx(477.8, rel=0.10)
    assert law.B == pytest.approx(2143.0, rel=0.10)


@pytest.mark.skipif(not EPOCH_CSV.is_file(), reason="Epoch's Chinchilla extraction is not beside the repo")
def test_cli_drops_epochs_five_highest_loss_runs_and_reproduces_their_fit(tmp_path):
    fit = subprocess.run([sys.executable, "-m", "dist_moe.cli", "scaling", "fit", str(EPOCH_CSV), "--exclude-highest",
                          "5", "--bootstrap", "0", "--grid", "coarse", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert fit.returncode == 0, fit.stderr[-2000:]
    assert "excluded the 5 highest-loss runs" in fit.stdout and "experts = 1 (240 runs" in fit.stdout
    values = dict(re.findall(r"^\s+(A|B|E|alpha|beta)\s+(\S+)$", fit.stdout, re.MULTILINE))
    assert float(values["alpha"]) == pytest.approx(0.3473, rel=2e-3)
    assert float(values["beta"]) == pytest.approx(0.3672, rel=2e-3)
    assert float(values["E"]) == pytest.approx(1.8172, rel=2e-3)
