"""Chinchilla Approach 3: fit L(N, D) = E + A/N^alpha + B/D^beta to final losses, with bootstrap intervals.

Following Hoffmann et al. (2022) and Epoch's replication (Besiroglu et al. 2024): with a = log A,
b = log B, e = log E the prediction is log L_hat = LSE(a - alpha log N, b - beta log D, e), and we
minimise the *sum* over runs of Huber_delta(log L_hat - log L), delta = 1e-3, with L-BFGS-B from every
point of the paper's grid of initialisations, keeping the best. The sum matters: the objective is then
~1e-3, and L-BFGS-B's default stopping tests (ftol is absolute when |f| < 1) reproduce Epoch's estimates;
with the mean (~1e-5) those tests stop near the initialisation (on Epoch's data: A=855, alpha=0.381).

MoE: the joint law over the expert count X (Clark et al. 2022 in spirit, a power law in X at fixed
active parameters N) is L(N, D, X) = E + A / (N^alpha X^gamma) + B / D^beta, i.e.
log L_hat = LSE(a - alpha log N - gamma log X, b - beta log D, e); gamma = 0 is Chinchilla's law.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from dist_moe.scaling.results import ScalingDataError


HUBER_DELTA = 1e-3
# Hoffmann et al.'s grid: alpha, beta in {0, .5, ..., 2}, e in {-1, -.5, ..., 1}, a, b in {0, 5, ..., 25}
PAPER_GRID = {"a": np.arange(0, 30, 5.0), "b": np.arange(0, 30, 5.0), "e": np.arange(-1, 1.5, 0.5),
              "alpha": np.arange(0, 2.5, 0.5), "beta": np.arange(0, 2.5, 0.5)}
# A sub-grid for quick looks and tests: 3 values per axis (243 starts), exponents kept below 1.5
COARSE_GRID = {"a": np.arange(0, 30, 10.0), "b": np.arange(0, 30, 10.0), "e": np.array([-1.0, 0.0, 1.0]),
               "alpha": np.arange(0, 1.5, 0.5), "beta": np.arange(0, 1.5, 0.5)}
GRIDS = {"paper": PAPER_GRID, "coarse": COARSE_GRID}
JOINT_GAMMAS = (0.0, 0.25, 0.5, 1.0)  # gamma starts tried around each per-expert-count fit
# Epoch AI's estimates on the Chinchilla runs (Besiroglu et al. 2024): the exponents a fit with too few
# runs for all five parameters holds fixed (see fit_loss_law's `fixed`)
EPOCH_EXPONENTS = {"alpha": 0.3473, "beta": 0.3672}
THETA_NAMES = ("a", "b", "e", "alpha", "beta", "gamma")
_PARALLEL_MIN_STARTS = 256  # below this, process start-up costs more than it saves
# The grid runs on scipy's defaults (which reproduce Epoch); the winner and each bootstrap refit are then
# polished with tight tests: the objective is ~1e-3, so the default ftol (absolute below |f| = 1)
# would stop a refit that starts near its optimum almost at once.
_POLISH = {"ftol": 1e-15, "gtol": 1e-10, "maxiter": 5000}


@dataclass(frozen=True)
class LossLaw:
    """L(N, D, X) = E + A / (N^alpha X^gamma) + B / D^beta; gamma = 0 (Chinchilla) ignores X."""

    A: float
    B: float
    E: float
    alpha: float
    beta: float
    gamma: float = 0.0

    def __call__(self, N, D, num_experts=1.0):
        return self.E + self.A / (N ** self.alpha * np.power(num_experts, self.gamma)) + self.B / D ** self.beta

    def for_experts(self, num_experts: float) -> LossLaw:
        """The Chinchilla law this joint law implies at a fixed expert count (A absorbs X^-gamma)."""
        return replace(self, A=self.A / num_experts ** self.gamma, gamma=0.0)

    @property
    def theta(self) -> np.ndarray:
        """The optimiser's coordinates (a, b, e, alpha, beta, gamma) with a = log A, b = log B, e = log E."""
        return np.array([np.log(self.A), np.log(self.B), np.log(self.E), self.alpha, self.beta, self.gamma])

    @classmethod
    def from_theta(cls, theta) -> LossLaw:
        a, b, e, alpha, beta, *gamma = (float(v) for v in theta)
        return cls(float(np.exp(a)), float(np.exp(b)), float(np.exp(e)), alpha, beta, gamma[0] if gamma else 0.0)


@dataclass(frozen=True)
class LawFit:
    """The best of all starts: the law, its objective (sum of Huber terms) and the data size."""

    law: LossLaw
    theta: np.ndarray  # (5,) or (6,) with gamma
    objective: float
    num_runs: int
    num_starts: int
    fixed: dict[str, float] = field(default_factory=dict)  # parameters held at a given value, not fitted


def grid_starts(name: str = "paper") -> np.ndarray:
    """Initialisations in (a, b, e, alpha, beta) order: (4500, 5) for "paper", (243, 5) for "coarse"."""
    if name not in GRIDS:
        raise ScalingDataError(f"grid '{name}': expected one of {', '.join(GRIDS)}")
    g = GRIDS[name]
    return np.array(list(itertools.product(g["a"], g["b"], g["e"], g["alpha"], g["beta"])))


def joint_starts(per_count: dict[int, LossLaw], gammas=JOINT_GAMMAS) -> np.ndarray:
    """(len(per_count) * len(gammas), 6) starts for the joint fit: each per-count law, A scaled by X^gamma."""
    # A_X = A / X^gamma  =>  a = a_X + gamma log X
    return np.array([[law.theta[0] + g * np.log(x), *law.theta[1:5], g]
                     for x, law in per_count.items() for g in gammas])


def huber_objective(theta: np.ndarray, log_n, log_d, log_loss, log_x=None, delta=HUBER_DELTA):
    """Sum of Huber_delta(log L_hat - log L) over runs and its gradient in theta; arrays (R,) float64."""
    a, b, e, alpha, beta, *gamma = theta.tolist()
    t1 = a - alpha * log_n
    if gamma:
        t1 = t1 - gamma[0] * log_x
    t2 = b - beta * log_d
    m = np.maximum(np.maximum(t1, t2), e)  # log-sum-exp of (t1, t2, e), stabilised
    w1, w2, w3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(e - m)
    s = w1 + w2 + w3
    r = m + np.log(s) - log_loss
    c = np.maximum(np.minimum(r, delta), -delta)  # Huber'(r); Huber(r) = c * (r - c/2) in both regimes
    q = c / s
    g1, g2 = q * w1, q * w2
    # elementwise products and sums, not `@`: BLAS dot products wake OpenBLAS's thread pool, whose
    # spinning threads cost more than these (R,)-long reductions
    grad = [g1.sum(), g2.sum(), (q * w3).sum(), -(g1 * log_n).sum(), -(g2 * log_d).sum()]
    if gamma:
        grad.append(-(g1 * log_x).sum())
    return float((c * (r - 0.5 * c)).sum()), np.array(grad)


def _one_blas_thread():
    """L-BFGS-B makes tiny BLAS calls that wake OpenBLAS's thread pool; its spinning threads double the
    CPU time, and beside other busy processes each call waits for a core (measured: 9x slower)."""
    return threadpool_limits(1, user_api="blas")


def _bounds(fixed: dict[str, float] | None, num_params: int) -> list[tuple] | None:
    """L-BFGS-B bounds that pin the `fixed` coordinates (lower = upper) and leave the others free."""
    if not fixed:
        return None
    return [(fixed[k], fixed[k]) if k in fixed else (None, None) for k in THETA_NAMES[:num_params]]


def _best_of(starts: np.ndarray, data: tuple, delta: float, options=None, bounds=None) -> tuple[float, np.ndarray]:
    """L-BFGS-B from each start (scipy's default stopping tests unless `options`); the lowest wins."""
    best_fun, best_x = np.inf, starts[0]
    with _one_blas_thread():
        for x0 in starts:
            result = minimize(huber_objective, x0, args=(*data, delta), jac=True, method="L-BFGS-B",
                              options=options, bounds=bounds)
            if np.isfinite(result.fun) and result.fun < best_fun:
                best_fun, best_x = float(result.fun), result.x
    return best_fun, best_x


def _best_of_parallel(starts: np.ndarray, data: tuple, delta: float, workers: int,
                      bounds=None) -> tuple[float, np.ndarray]:
    """`_best_of` over `workers` spawned processes, each with single-threaded OpenBLAS.

    The children read OPENBLAS_NUM_THREADS when they import numpy/scipy, so it is set while the pool
    starts them (threadpoolctl limits only the BLAS this process has loaded). Spawn, not fork: the caller
    may hold threads (Ray, torch) that fork would copy mid-flight.
    """
    chunks = np.array_split(starts, workers)
    saved = os.environ.get("OPENBLAS_NUM_THREADS")
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_best_of, chunks, [data] * workers, [delta] * workers, [None] * workers,
                                    [bounds] * workers))
    finally:
        if saved is None:
            del os.environ["OPENBLAS_NUM_THREADS"]
        else:
            os.environ["OPENBLAS_NUM_THREADS"] = saved
    return min(results, key=lambda r: r[0])


def available_cores() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def free_parameters(num_experts_given: bool, fixed: dict[str, float] | None = None) -> int:
    """How many of the law's parameters a fit estimates: 5 (6 with gamma) less the fixed ones."""
    return (6 if num_experts_given else 5) - len(fixed or {})


def _check_enough(n, d, x, num_params: int) -> None:
    need = num_params + 1
    if len(n) < need:
        raise ScalingDataError(f"Approach 3 fits {num_params} parameters: need at least {need} runs, got {len(n)}")
    for values, what in ((n, "model sizes (n_active)"), (d, "token counts"), (x, "expert counts")):
        if values is not None and len(np.unique(values)) < 2:
            raise ScalingDataError(f"Approach 3 needs at least 2 distinct {what}, got 1 across {len(n)} runs")


def fit_loss_law(n, d, loss, num_experts=None, starts=None, delta=HUBER_DELTA, workers: int = 1,
                 fixed: dict[str, float] | None = None) -> LawFit:
    """Fit by Huber/L-BFGS-B from every start (default: the paper's 4500-point grid), polish the best.

    n, d, loss: (R,) positive arrays. With `num_experts` (R,) the joint law's gamma is fitted too and
    `starts` has 6 columns (default: the grid with gamma = 0). `fixed` pins parameters by name ("alpha",
    "beta", ...: e.g. EPOCH_EXPONENTS when there are too few runs for all five), so fewer runs suffice.
    workers > 1 splits the starts over spawned processes (the calling script then needs the usual
    `if __name__ == "__main__":` guard).
    """
    n, d, loss = (np.asarray(v, dtype=np.float64) for v in (n, d, loss))
    x = None if num_experts is None else np.asarray(num_experts, dtype=np.float64)
    num_params = 5 if x is None else 6
    _check_enough(n, d, x, free_parameters(x is not None, fixed))
    if starts is None:
        starts = grid_starts("paper")
        if x is not None:
            starts = np.hstack([starts, np.zeros((len(starts), 1))])
    starts = np.atleast_2d(np.asarray(starts, dtype=np.float64))
    assert starts.shape[1] == num_params, f"starts need {num_params} columns, got {starts.shape[1]}"
    if fixed:  # pinned coordinates start at their value; the grid then repeats starts, kept once
        for name, value in fixed.items():
            starts[:, THETA_NAMES.index(name)] = value
        starts = np.unique(starts, axis=0)
    bounds = _bounds(fixed, num_params)
    data = (np.log(n), np.log(d), np.log(loss), None if x is None else np.log(x))
    if workers <= 1 or len(starts) < _PARALLEL_MIN_STARTS:
        fun, theta = _best_of(starts, data, delta, bounds=bounds)
    else:
        fun, theta = _best_of_parallel(starts, data, delta, workers, bounds)
    if not np.isfinite(fun):
        raise ScalingDataError(f"Approach 3: L-BFGS-B found no finite objective from {len(starts)} starts")
    fun, theta = _best_of(theta[None], data, delta, _POLISH, bounds)
    return LawFit(LossLaw.from_theta(theta), theta, fun, len(n), len(starts), dict(fixed or {}))


def bootstrap(n, d, loss, center: LawFit, resamples: int, num_experts=None, delta=HUBER_DELTA,
              seed: int = 0, progress: bool = True) -> list[LossLaw]:
    """Refit on `resamples` sets of runs drawn with replacement; returns one law per resample.

    Each refit starts L-BFGS-B (tight stopping tests) from the full-data estimate `center`, as Epoch's
    bootstrap starts from one point, rather than repeating the grid at the full fit's cost per resample.
    """
    n, d, loss = (np.asarray(v, dtype=np.float64) for v in (n, d, loss))
    data = (np.log(n), np.log(d), np.log(loss), None if num_experts is None else np.log(num_experts))
    rng = np.random.default_rng(seed)
    laws = []
    for _ in tqdm(range(resamples), desc="bootstrap", disable=not progress, leave=False):
        idx = rng.integers(0, len(n), len(n))
        sample = tuple(None if v is None else v[idx] for v in data)
        bounds = _bounds(center.fixed, len(center.theta))
        laws.append(LossLaw.from_theta(_best_of(center.theta[None], sample, delta, _POLISH, bounds)[1]))
    return laws


def percentile_interval(values, level: float = 0.95) -> tuple[float, float]:
    """Central percentile interval of bootstrap values (NaNs ignored)."""
    tail = 50.0 * (1.0 - level)
    lo, hi = np.nanpercentile(np.asarray(values, dtype=np.float64), [tail, 100.0 - tail])
    return float(lo), float(hi)
