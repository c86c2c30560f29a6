"""Chinchilla Approach 2 (IsoFLOP profiles): the loss-optimal model size per compute budget.

Per budget C, a parabola in log N (and in log D) through the lowest-loss size and up to two sizes each side
gives N*(C) and D*(C); then log N* = log G + a log C and log D* = log H + b log C by least squares. A budget
counts only with >= 3 sizes, an upward parabola and its vertex inside the fitted sizes (docs/scaling.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from dist_moe.scaling.results import ScalingDataError

BUDGET_TOLERANCE = 0.1  # runs within 10% of a group's smallest C share its budget
MIN_SIZES = 3
NEIGHBOURS = 2  # sizes fitted on each side of a budget's lowest-loss size


@dataclass(frozen=True)
class IsoFlopProfile:
    """One budget's parabolas: loss = polyval(fit_n, log N) and polyval(fit_d, log D), highest power first."""

    flops: float  # geometric mean of the group's C
    fit_n: np.ndarray  # (3,)
    fit_d: np.ndarray  # (3,)
    n_opt: float
    d_opt: float
    loss_opt: float
    rows: np.ndarray  # indices of this budget's runs in the fitted arrays
    window: np.ndarray  # the rows the parabolas were fitted to: the minimum and its neighbouring sizes


@dataclass(frozen=True)
class IsoFlopFit:
    """N_opt = G C^a and D_opt = H C^b from the profiles that had a valid interior minimum."""

    profiles: list[IsoFlopProfile]
    skipped: list[tuple[float, str]]  # (budget C, why it was left out)
    a: float
    G: float
    b: float
    H: float

    def n_opt(self, flops):
        return self.G * np.power(flops, self.a)

    def d_opt(self, flops):
        return self.H * np.power(flops, self.b)


def group_budgets(flops, tolerance: float = BUDGET_TOLERANCE) -> np.ndarray:
    """(R,) int labels: sorted by C, a group takes every run within (1 + tolerance) of its smallest C."""
    flops = np.asarray(flops, dtype=np.float64)
    labels = np.empty(len(flops), dtype=np.int64)
    label, start = -1, 0.0
    for i in np.argsort(flops):
        if label < 0 or flops[i] > start * (1.0 + tolerance):
            label, start = label + 1, flops[i]
        labels[i] = label
    return labels


def _vertex(x: np.ndarray, loss: np.ndarray, axis: str) -> tuple[np.ndarray, float | None, str]:
    """Parabola through (x = log N or log D, loss); its vertex if it opens upward within [min x, max x]."""
    fit = np.polyfit(x, loss, 2)
    if fit[0] <= 0:
        return fit, None, f"loss is not convex in log {axis}"
    x_opt = -fit[1] / (2.0 * fit[0])
    if not x.min() <= x_opt <= x.max():
        return fit, None, f"the parabola's minimum lies outside the sampled {axis} range"
    return fit, float(x_opt), ""


def _window(n: np.ndarray, loss: np.ndarray, budget: np.ndarray) -> np.ndarray:
    """Mask of the budget's runs whose size is the lowest-loss run's or one of NEIGHBOURS sizes either side."""
    sizes = np.unique(n[budget])
    best = np.flatnonzero(budget)[np.argmin(loss[budget])]
    j = int(np.searchsorted(sizes, n[best]))
    return budget & np.isin(n, sizes[max(0, j - NEIGHBOURS):j + NEIGHBOURS + 1])


def fit_isoflop(n, d, loss, flops, tolerance: float = BUDGET_TOLERANCE) -> IsoFlopFit:
    """Approach 2 on (R,) arrays of active parameters, tokens, final loss and training FLOPs."""
    n, d, loss, flops = (np.asarray(v, dtype=np.float64) for v in (n, d, loss, flops))
    labels = group_budgets(flops, tolerance)
    profiles, skipped = [], []
    for label in np.unique(labels):
        m = labels == label
        budget = float(np.exp(np.log(flops[m]).mean()))
        if len(np.unique(n[m])) < MIN_SIZES:
            skipped.append((budget, f"fewer than {MIN_SIZES} model sizes"))
            continue
        w = _window(n, loss, m)
        fit_n, x_n, why_n = _vertex(np.log(n[w]), loss[w], "N")
        fit_d, x_d, why_d = _vertex(np.log(d[w]), loss[w], "D")
        if x_n is None or x_d is None:
            skipped.append((budget, why_n or why_d))
            continue
        profiles.append(IsoFlopProfile(budget, fit_n, fit_d, float(np.exp(x_n)), float(np.exp(x_d)),
                                       float(np.polyval(fit_n, x_n)), np.flatnonzero(m), np.flatnonzero(w)))
    if len(profiles) < 2:
        raise ScalingDataError(
            f"Approach 2 needs at least 2 compute budgets with {MIN_SIZES}+ model sizes and an interior "
            f"loss minimum; found {len(profiles)} of {len(skipped) + len(profiles)} budgets")
    log_c = np.log([p.flops for p in profiles])
    a, log_g = np.polyfit(log_c, np.log([p.n_opt for p in profiles]), 1)
    b, log_h = np.polyfit(log_c, np.log([p.d_opt for p in profiles]), 1)
    return IsoFlopFit(profiles, skipped, float(a), float(np.exp(log_g)), float(b), float(np.exp(log_h)))


def bootstrap_isoflop(n, d, loss, flops, resamples: int, tolerance: float = BUDGET_TOLERANCE,
                      seed: int = 0, progress: bool = True) -> list[IsoFlopFit]:
    """Refit Approach 2 on runs drawn with replacement; resamples left with < 2 usable budgets are dropped."""
    arrays = [np.asarray(v, dtype=np.float64) for v in (n, d, loss, flops)]
    rng = np.random.default_rng(seed)
    fits = []
    for _ in tqdm(range(resamples), desc="bootstrap (approach 2)", disable=not progress, leave=False):
        idx = rng.integers(0, len(arrays[0]), len(arrays[0]))
        try:
            fits.append(fit_isoflop(*(v[idx] for v in arrays), tolerance=tolerance))
        except ScalingDataError:
            continue
    return fits
