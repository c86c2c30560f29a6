"""Compute-optimal allocation: the N and D that minimise the fitted loss at a FLOP budget C = 6 N D.

For L = E + A/N^alpha + B/D^beta, substituting D = C/(6N) and setting dL/dN = 0 gives
N_opt = G (C/6)^a, D_opt = G^-1 (C/6)^b with a = beta/(alpha+beta), b = alpha/(alpha+beta) and
G = (alpha A / (beta B))^(1/(alpha+beta)) (Hoffmann et al. 2022, eq. 4). For MoE, N counts the active
parameters; the joint law's expert count X enters through A / X^gamma. G is formed in log space, and a
law without a finite optimum (a term fitted away, e.g. loss that does not fall with N) is refused with why.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dist_moe.scaling.fit import LossLaw
from dist_moe.scaling.isoflop import IsoFlopFit
from dist_moe.scaling.results import ScalingDataError

# A fitted term below this share of the loss at every run means the fit found no dependence on that axis
NEGLIGIBLE_SHARE = 1e-3
NO_FLOOR_SHARE = 0.01  # E under this share of the lowest loss: the fit found no floor


@dataclass(frozen=True)
class Allocation:
    """The optimum at `flops` (floats, or arrays of one shape when flops is an array)."""

    flops: float
    n_opt: float
    d_opt: float
    loss: float | None  # the law's predicted loss at the optimum; None for Approach 2

    @property
    def tokens_per_param(self):
        return self.d_opt / self.n_opt


def optimal_exponents(law: LossLaw) -> tuple[float, float]:
    """(a, b): N_opt grows as C^a and D_opt as C^b, a + b = 1."""
    total = law.alpha + law.beta
    return law.beta / total, law.alpha / total


def no_optimum_reason(law: LossLaw, n=None, d=None, num_experts=1.0) -> str | None:
    """Why `law` has no meaningful compute-optimal allocation, or None. With the runs' n, d (arrays), a law
    whose parameter or data term is negligible at every run is refused too: it found no trade-off to solve."""
    law = law.for_experts(num_experts)
    usable = (all(np.isfinite((law.A, law.B, law.E, law.alpha, law.beta))) and min(law.alpha, law.beta) > 0
              and min(law.A, law.B) >= 0)
    if usable and n is not None:
        n, d = np.asarray(n, dtype=np.float64), np.asarray(d, dtype=np.float64)
        with np.errstate(all="ignore"):  # a resampled law may have exponents far out (N^alpha = inf is fine here)
            fitted = law(n, d)
            shares = ((law.A / n ** law.alpha / fitted, "model size N", "A/N^alpha"),
                      (law.B / d ** law.beta / fitted, "tokens D", "B/D^beta"))
        for share, axis, term in shares:
            if share.max() < NEGLIGIBLE_SHARE:
                return (f"the fit puts no weight on {axis} (its term {term} is under {NEGLIGIBLE_SHARE:.1%} of the "
                        f"loss at every run), so it has no compute-optimal allocation; more runs, further apart "
                        f"in {axis.split()[-1]} or longer, would show one")
    if not usable or min(law.A, law.B) <= 0:
        return (f"the fit has no compute-optimal allocation (A={law.A:.3g}, B={law.B:.3g}, alpha={law.alpha:.3g}, "
                f"beta={law.beta:.3g}; it needs all four positive and finite)")
    return None


def no_floor_warning(law: LossLaw, val_loss) -> str | None:
    """A warning when the fit puts the irreducible loss E at ~0 (under 1% of the lowest loss): the runs did not
    show where the curve flattens, so the law keeps falling as a pure power law beyond them and a prediction at
    a larger budget is too low (issue 40's held-out runs measured 8% above such a prediction)."""
    if law.E >= NO_FLOOR_SHARE * float(np.min(val_loss)):
        return None
    return (f"the fit puts no floor under the loss (E = {law.E:.3g}): the runs do not show where the curve "
            f"flattens, and predictions beyond the swept budgets will likely be too low")


def compute_optimal(law: LossLaw, flops, num_experts: float = 1.0) -> Allocation:
    """Closed-form optimum of `law` (at `num_experts` for a joint law) under C = 6 N D.

    Raises ScalingDataError (one line) for a law with no finite optimum (see no_optimum_reason)."""
    reason = no_optimum_reason(law, num_experts=num_experts)
    if reason:
        raise ScalingDataError(reason)
    law = law.for_experts(num_experts)
    a, b = optimal_exponents(law)
    log_g = (np.log(law.alpha * law.A) - np.log(law.beta * law.B)) / (law.alpha + law.beta)
    log_c = np.log(np.divide(flops, 6.0))
    n_opt, d_opt = np.exp(log_g + a * log_c), np.exp(b * log_c - log_g)
    if not (np.all(np.isfinite(n_opt) & (n_opt > 0)) and np.all(np.isfinite(d_opt) & (d_opt > 0))):
        raise ScalingDataError(f"the fit's compute-optimal N (log G = {log_g:.4g}) is outside floating-point range")
    return Allocation(flops, n_opt, d_opt, law(n_opt, d_opt))


def isoflop_allocation(fit: IsoFlopFit, flops) -> Allocation:
    """Approach 2's optimum at `flops`, from its fitted power laws (no loss prediction)."""
    return Allocation(flops, fit.n_opt(flops), fit.d_opt(flops), None)
