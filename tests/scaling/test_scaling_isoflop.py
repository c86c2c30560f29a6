"""Approach 2: budget grouping, parabola minima, recovery of the allocation exponent."""

import numpy as np
import pytest

from dist_moe.scaling.allocation import compute_optimal, isoflop_allocation, optimal_exponents
from dist_moe.scaling.fit import LossLaw
from dist_moe.scaling.isoflop import bootstrap_isoflop, fit_isoflop, group_budgets
from dist_moe.scaling.results import ScalingDataError

LAW = LossLaw(A=406.4, B=410.7, E=1.69, alpha=0.34, beta=0.28)


def _isoflop_runs(law, budgets, noise=0.0, seed=0, jitter=0.0, sizes=9, span=1.5):
    """Per budget, `sizes` models log-spaced over +-span (natural log) around the true optimum, C = 6ND."""
    rng = np.random.default_rng(seed)
    n, d, loss, flops = [], [], [], []
    for budget in budgets:
        center = compute_optimal(law, budget).n_opt
        for size in center * np.exp(np.linspace(-span, span, sizes)):
            c = budget * np.exp(rng.uniform(-jitter, jitter))
            n.append(size), d.append(c / (6 * size)), flops.append(c)
            loss.append(law(size, c / (6 * size)) * np.exp(rng.normal(0, noise)))
    return tuple(np.array(v) for v in (n, d, loss, flops))


def test_group_budgets_keeps_jittered_budgets_together_and_apart():
    flops = np.array([1e18, 1.05e18, 0.98e18 * 1.0, 3e18, 3.1e18, 1e19, 1e19])
    labels = group_budgets(flops, tolerance=0.1)
    assert labels.tolist() == [0, 0, 0, 1, 1, 2, 2]


def test_recovers_allocation_exponent_on_synthetic_isoflop_data():
    budgets = np.geomspace(1e18, 1e22, 7)
    n, d, loss, flops = _isoflop_runs(LAW, budgets, noise=0.002, seed=0, jitter=0.02)
    fit = fit_isoflop(n, d, loss, flops)
    a, b = optimal_exponents(LAW)
    assert len(fit.profiles) == 7 and not fit.skipped
    assert fit.a == pytest.approx(a, abs=0.01)
    assert fit.b == pytest.approx(b, abs=0.01)
    # the recommendation at an unseen budget lands near the true optimum
    truth = compute_optimal(LAW, 1e23)
    assert isoflop_allocation(fit, 1e23).n_opt == pytest.approx(truth.n_opt, rel=0.15)


def test_parabola_vertex_is_the_exact_minimum_of_a_quadratic_profile():
    """When loss is exactly quadratic in log N, the vertex is exact: N* = exp(x0)."""
    x0 = {1e18: np.log(3e7), 1e20: np.log(4e8)}
    n, d, loss, flops = [], [], [], []
    for budget, center in x0.items():
        for x in center + np.linspace(-1, 1, 5):
            n.append(np.exp(x)), d.append(budget / (6 * np.exp(x))), flops.append(budget)
            loss.append(2.0 + 0.3 * (x - center) ** 2)
    fit = fit_isoflop(*(np.array(v) for v in (n, d, loss, flops)))
    assert [p.n_opt for p in fit.profiles] == pytest.approx([3e7, 4e8], rel=1e-9)
    assert fit.a == pytest.approx(np.log(4e8 / 3e7) / np.log(100.0), rel=1e-9)


def test_parabola_is_fitted_to_the_minimum_and_two_sizes_each_side():
    """Far-off sizes that rise much faster than a parabola (a model far too large for its few steps) do not move
    the vertex: it is fitted to the lowest-loss size and its two neighbours on each side."""
    center, n, d, loss, flops = np.log(5e7), [], [], [], []
    for budget, shift in ((1e18, 0.0), (1e20, 1.0)):
        for x in center + shift + np.array([-1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0]):
            rise = x - center - shift
            n.append(np.exp(x)), d.append(budget / (6 * np.exp(x))), flops.append(budget)
            loss.append(2.0 + 0.3 * rise ** 2 + (5.0 * (rise - 1.0) ** 3 if rise > 1 else 0.0))
    fit = fit_isoflop(*(np.array(v) for v in (n, d, loss, flops)))
    assert [p.n_opt for p in fit.profiles] == pytest.approx([5e7, 5e7 * np.e], rel=1e-9)
    assert [len(p.window) for p in fit.profiles] == [5, 5] and [len(p.rows) for p in fit.profiles] == [7, 7]
    everything = np.polyfit(np.log(n[:7]), loss[:7], 2)  # one parabola through all seven would miss it
    assert abs(np.exp(-everything[1] / (2 * everything[0])) / 5e7 - 1) > 0.1


def test_budget_whose_minimum_is_off_the_sampled_sizes_is_skipped():
    budgets = [1e18, 1e19, 1e20]
    n, d, loss, flops = _isoflop_runs(LAW, budgets)
    shifted = flops == 1e20
    n, d = n.copy(), d.copy()
    n[shifted] *= 30.0  # all sizes far above the optimum: loss rises monotonically in N
    d[shifted] /= 30.0
    loss[shifted] = LAW(n[shifted], d[shifted])
    fit = fit_isoflop(n, d, loss, flops)
    assert len(fit.profiles) == 2
    assert fit.skipped[0][0] == pytest.approx(1e20) and "minimum" in fit.skipped[0][1]


def test_too_few_budgets_or_sizes_is_a_clear_error():
    n, d, loss, flops = _isoflop_runs(LAW, [1e18, 1e20], sizes=2)
    with pytest.raises(ScalingDataError, match="needs at least 2 compute budgets with 3\\+ model sizes.*found 0 of 2"):
        fit_isoflop(n, d, loss, flops)


def test_isoflop_bootstrap_interval_contains_the_true_exponent():
    n, d, loss, flops = _isoflop_runs(LAW, np.geomspace(1e18, 1e22, 5), noise=0.003, seed=1)
    fits = bootstrap_isoflop(n, d, loss, flops, resamples=30, seed=0, progress=False)
    values = np.array([f.a for f in fits])
    assert len(fits) >= 25
    assert np.percentile(values, 2.5) < optimal_exponents(LAW)[0] < np.percentile(values, 97.5)
    assert values.std() > 0
