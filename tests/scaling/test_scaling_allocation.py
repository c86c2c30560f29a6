"""Compute-optimal allocation: the closed form against numeric minimisation of L under C = 6 N D."""

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from dist_moe.scaling.allocation import compute_optimal, optimal_exponents
from dist_moe.scaling.fit import LossLaw


def _random_law(rng, gamma=0.0) -> LossLaw:
    return LossLaw(A=float(rng.uniform(50, 2000)), B=float(rng.uniform(50, 5000)), E=float(rng.uniform(1, 2.5)),
                   alpha=float(rng.uniform(0.15, 0.6)), beta=float(rng.uniform(0.15, 0.6)), gamma=gamma)


def _numeric_n_opt(law: LossLaw, flops: float, num_experts: float = 1.0) -> float:
    """argmin over log N of L(N, C / (6N)), by bounded scalar minimisation."""
    result = minimize_scalar(lambda log_n: law(np.exp(log_n), flops / (6.0 * np.exp(log_n)), num_experts),
                             bounds=(np.log(1e2), np.log(flops / 6.0 / 1e2)), method="bounded",
                             options={"xatol": 1e-10})
    return float(np.exp(result.x))


@pytest.mark.parametrize("seed", range(5))
def test_closed_form_allocation_equals_numeric_minimum_under_6nd(seed):
    rng = np.random.default_rng(seed)
    law = _random_law(rng)
    for flops in (1e18, 1e21, 1e24):
        best = compute_optimal(law, flops)
        assert best.n_opt == pytest.approx(_numeric_n_opt(law, flops), rel=1e-4)
        assert 6.0 * best.n_opt * best.d_opt == pytest.approx(flops, rel=1e-12)
        assert best.loss == pytest.approx(law(best.n_opt, best.d_opt), rel=1e-12)
        assert best.tokens_per_param == pytest.approx(best.d_opt / best.n_opt)


@pytest.mark.parametrize("seed", range(5))
def test_exponent_a_equals_slope_of_numeric_optimum_in_compute(seed):
    law = _random_law(np.random.default_rng(seed))
    low, high = 1e20, 1e24
    slope = np.log(_numeric_n_opt(law, high) / _numeric_n_opt(law, low)) / np.log(high / low)
    a, b = optimal_exponents(law)
    assert slope == pytest.approx(law.beta / (law.alpha + law.beta), abs=1e-5)
    assert a == pytest.approx(slope, abs=1e-5)
    assert a + b == pytest.approx(1.0)


def test_joint_law_allocation_is_numeric_optimum_at_each_expert_count():
    law = _random_law(np.random.default_rng(7), gamma=0.2)
    for experts in (1, 8, 64):
        best = compute_optimal(law, 1e22, num_experts=experts)
        assert best.n_opt == pytest.approx(_numeric_n_opt(law, 1e22, experts), rel=1e-4)
        assert best.loss == pytest.approx(law(best.n_opt, best.d_opt, experts), rel=1e-12)
    # more experts lower the parameter term, so the optimum moves toward fewer parameters and more tokens
    assert compute_optimal(law, 1e22, 64).n_opt < compute_optimal(law, 1e22, 1).n_opt


def test_allocation_is_vectorised_over_budgets():
    law = _random_law(np.random.default_rng(3))
    budgets = np.array([1e19, 1e20, 1e21])
    batch = compute_optimal(law, budgets)
    for i, flops in enumerate(budgets):
        assert batch.n_opt[i] == pytest.approx(compute_optimal(law, float(flops)).n_opt, rel=1e-12)


def test_a_law_without_a_finite_optimum_is_refused_in_one_line():
    """A fitted away (0, or so small that G underflows in linear space) has no optimum: a ScalingDataError
    naming why, not a division by zero."""
    from dist_moe.scaling.results import ScalingDataError

    for A in (0.0, 1e-300):
        law = LossLaw(A=A, B=900.0, E=1.5, alpha=0.3473, beta=0.3672)
        with pytest.raises(ScalingDataError, match="compute-optimal"):
            compute_optimal(law, 1e12)
    # the same law far from underflow keeps the closed form: G computed in log space equals the linear one
    law = LossLaw(A=1e-30, B=900.0, E=1.5, alpha=0.3473, beta=0.3672)
    G = (law.alpha * law.A / (law.beta * law.B)) ** (1 / (law.alpha + law.beta))
    assert compute_optimal(law, 1e12).n_opt == pytest.approx(G * (1e12 / 6) ** optimal_exponents(law)[0], rel=1e-12)


def test_a_law_without_a_floor_is_flagged():
    """E ~ 0 means the runs never showed the curve flattening: extrapolations beyond them fall too fast."""
    from dist_moe.scaling.allocation import no_floor_warning

    losses = [3.2, 2.9, 2.87]
    assert no_floor_warning(LossLaw(A=19.5, B=9438.0, E=1e-18, alpha=0.2, beta=0.65), losses).startswith(
        "the fit puts no floor under the loss (E = 1e-18)")
    assert no_floor_warning(LossLaw(A=19.5, B=9438.0, E=0.0287, alpha=0.2, beta=0.65), losses) is not None
    assert no_floor_warning(LossLaw(A=19.5, B=9438.0, E=0.0288, alpha=0.2, beta=0.65), losses) is None
