"""Held-out predictions: fit a results table, predict runs it has not seen, later check them.

`predict` writes the optimum at a budget beyond the swept ones and each planned held-out run's loss, with
intervals (commit it before the runs); `check` compares the measured losses with it; `backtest` fits a sweep's
small budgets and predicts its largest, to choose fit settings before any held-out run exists.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dist_moe.scaling.allocation import compute_optimal, isoflop_allocation, no_floor_warning, no_optimum_reason
from dist_moe.scaling.fit import LossLaw, available_cores, bootstrap, fit_loss_law, grid_starts, percentile_interval
from dist_moe.scaling.isoflop import BUDGET_TOLERANCE, bootstrap_isoflop, fit_isoflop
from dist_moe.scaling.results import ResultsTable, ScalingDataError, read_results


def _interval(values, level: float) -> list[float]:
    return [round(v, 6) for v in percentile_interval(values, level)]


def _prediction_interval(values, residuals: np.ndarray, level: float) -> list[float]:
    """Where a new run's loss should fall: each resampled law's prediction times each fitted run's residual
    factor exp(log L - log L_hat), so the fit's uncertainty and the runs' scatter about it both count."""
    return _interval(np.outer(values, np.exp(residuals)).ravel(), level)


def _one_expert_count(table: ResultsTable, path) -> ResultsTable:
    if len(np.unique(table.num_experts)) != 1:
        raise ScalingDataError(f"{path}: predict fits one expert count; the table holds "
                               f"{sorted(set(table.num_experts.tolist()))}")
    return table


def predict(results_path: str | Path, budget: float, sweep_path: str | Path | None = None, *,
            bootstrap_resamples: int = 100, level: float = 0.95, grid: str = "paper", seed: int = 0,
            min_tokens_per_param: float = 0.0) -> dict:
    """The prediction record: fitted law, optimum at `budget` (Approach 3 and 2), and each planned run's loss.

    `interval` is a prediction interval for one new run (the resampled laws' predictions times the fitted
    runs' residual factors); `fit_interval` the bootstrap percentiles of the law's prediction alone.
    Approach 3 fits the runs with at least `min_tokens_per_param` tokens per parameter; Approach 2 all runs.
    """
    if bootstrap_resamples < 10:
        raise ScalingDataError(f"bootstrap {bootstrap_resamples}: a prediction needs its intervals, "
                               "at least 10 resamples")
    everything = _one_expert_count(read_results(results_path), results_path)
    table, left_out = everything.with_tokens_per_param(min_tokens_per_param)
    fit = fit_loss_law(table.n_active, table.tokens, table.val_loss, starts=grid_starts(grid),
                       workers=min(available_cores(), 8))
    reason = no_optimum_reason(fit.law, table.n_active, table.tokens)
    if reason:
        raise ScalingDataError(f"{results_path}: {reason}")
    laws = bootstrap(table.n_active, table.tokens, table.val_loss, fit, bootstrap_resamples, seed=seed,
                     progress=False)
    laws = [law for law in laws if not no_optimum_reason(law, table.n_active, table.tokens)]
    best, samples = compute_optimal(fit.law, budget), [compute_optimal(law, budget) for law in laws]
    residual = np.log(table.val_loss) - np.log(fit.law(table.n_active, table.tokens))
    record = {
        "results": str(results_path), "num_runs": len(table), "num_experts": int(table.num_experts[0]),
        "min_tokens_per_param": min_tokens_per_param, "left_out": left_out,
        "level": level, "bootstrap_resamples": len(laws),
        "law": {k: getattr(fit.law, k) for k in ("A", "B", "E", "alpha", "beta")},
        "law_intervals": {k: _interval([getattr(s, k) for s in laws], level) for k in ("A", "B", "E", "alpha", "beta")},
        "rms_log_residual": float(np.sqrt(np.mean(residual ** 2))),
        "warnings": [w for w in [no_floor_warning(fit.law, table.val_loss)] if w],
        "budget_flops": budget,
        "n_active": float(best.n_opt), "n_active_interval": _interval([s.n_opt for s in samples], level),
        "tokens": float(best.d_opt), "tokens_interval": _interval([s.d_opt for s in samples], level),
        "predicted_loss": float(best.loss), "interval": _prediction_interval([s.loss for s in samples], residual, level),
        "fit_interval": _interval([s.loss for s in samples], level),
        "approach2": _approach2(everything, budget, bootstrap_resamples, level, seed),
    }
    if sweep_path is not None:
        record["runs"] = _planned(sweep_path, fit.law, laws, residual, level)
    return record


def _approach2(table: ResultsTable, budget: float, resamples: int, level: float, seed: int) -> dict:
    """Approach 2's N_opt, D_opt at `budget` (no loss: it fits no loss surface), or why it has none."""
    try:
        iso = fit_isoflop(table.n_active, table.tokens, table.val_loss, table.flops)
    except ScalingDataError as exc:  # e.g. every budget's minimum lies outside the swept sizes
        return {"error": str(exc)}
    fits = bootstrap_isoflop(table.n_active, table.tokens, table.val_loss, table.flops, resamples, seed=seed,
                             progress=False)
    best = isoflop_allocation(iso, budget)
    return {"budgets_used": len(iso.profiles), "a": iso.a, "b": iso.b,
            "n_active": float(best.n_opt), "n_active_interval": _interval([f.n_opt(budget) for f in fits], level),
            "tokens": float(best.d_opt), "tokens_interval": _interval([f.d_opt(budget) for f in fits], level)}


def _planned(sweep_path, law: LossLaw, laws: list[LossLaw], residual: np.ndarray, level: float) -> list[dict]:
    """Each run the sweep file plans, at its own N_active and token count (whole steps), with its prediction."""
    from dist_moe.scaling.sweep import load_sweep, plan

    rows = []
    for run in plan(load_sweep(sweep_path)):
        rows.append({"name": run.name, "n_active": run.n_active, "tokens": run.tokens,
                     "flops": 6.0 * run.n_active * run.tokens,
                     "predicted_loss": float(law(run.n_active, run.tokens)),
                     "interval": _prediction_interval([s(run.n_active, run.tokens) for s in laws], residual, level),
                     "fit_interval": _interval([s(run.n_active, run.tokens) for s in laws], level)})
    return rows


def backtest(results_path: str | Path, target: float, span: float, thresholds: list[float], *,
             grid: str = "paper") -> str:
    """Fit Approach 3 to the runs with C <= target / span, predict the runs at `target`: per tokens-per-parameter
    threshold, the relative error of the three lowest-loss runs there and whether the law ranks the lowest first."""
    table = _one_expert_count(read_results(results_path), results_path)
    at_target = np.abs(table.flops / target - 1) < BUDGET_TOLERANCE
    if not at_target.any():
        raise ScalingDataError(f"{results_path}: no run within {BUDGET_TOLERANCE:.0%} of C = {target:.3g}")
    test = table.select(at_target)
    best = np.argsort(test.val_loss)[:3]
    lines = [f"fit C <= {target / span:.3g}, predict the runs at C = {target:.3g}; error = measured / predicted - 1 "
             f"of its lowest-loss runs ({', '.join(test.name[i] for i in best)}):"]
    for threshold in thresholds:
        try:
            train, _ = table.select(table.flops <= target / span * (1 + BUDGET_TOLERANCE)).with_tokens_per_param(
                threshold)
            law = fit_loss_law(train.n_active, train.tokens, train.val_loss, starts=grid_starts(grid),
                               workers=min(available_cores(), 8)).law
        except ScalingDataError as exc:
            lines.append(f"  D/N >= {threshold:<5g} {exc}")
            continue
        predicted = law(test.n_active, test.tokens)
        errors = " ".join(f"{test.val_loss[i] / predicted[i] - 1:+.2%}" for i in best)
        ranked = "yes" if np.argmin(predicted) == np.argmin(test.val_loss) else "no"
        lines.append(f"  D/N >= {threshold:<5g} {len(train):>3} runs: {errors}; lowest ranked first: {ranked}")
    return "\n".join(lines)


def check(prediction_path: str | Path, results_path: str | Path, plot: str | Path | None = None) -> tuple[dict, str]:
    """Measured losses of the predicted runs beside their predictions: (record to write, text to print).
    With `plot`, draws the fitted isoFLOP curves, the fitted runs and the held-out ones there."""
    prediction = json.loads(Path(prediction_path).read_text())
    if "runs" not in prediction:
        raise ScalingDataError(f"{prediction_path}: no 'runs' (predict it with --sweep)")
    table = read_results(results_path)
    measured = dict(zip(table.name, table.val_loss))
    rows, lines = [], [f"held-out runs of {prediction_path} measured in {results_path}:"]
    missing = [run["name"] for run in prediction["runs"] if run["name"] not in measured]
    if len(missing) == len(prediction["runs"]):
        raise ScalingDataError(f"{results_path}: none of the prediction's runs ({', '.join(missing)}) is in the table")
    for run in prediction["runs"]:
        if run["name"] in missing:
            lines.append(f"  {run['name']:<16} not measured (not in {results_path})")
            continue
        loss = float(measured[run["name"]])
        error = loss / run["predicted_loss"] - 1.0
        inside = run["interval"][0] <= loss <= run["interval"][1]
        rows.append({"name": run["name"], "n_active": run["n_active"], "tokens": run["tokens"], "val_loss": loss,
                     "predicted_loss": run["predicted_loss"], "interval": run["interval"],
                     "relative_error": error, "inside_interval": inside})
        lines.append(f"  {run['name']:<16} N {run['n_active']:>9,} D {run['tokens']:>11,} measured {loss:.4f} "
                     f"predicted {run['predicted_loss']:.4f} [{run['interval'][0]:.4f}, {run['interval'][1]:.4f}] "
                     f"error {error:+.2%}{'' if inside else ' (outside)'}")
    predicted_best = min(rows, key=lambda r: r["predicted_loss"])["name"]
    measured_best = min(rows, key=lambda r: r["val_loss"])["name"]
    lines.append(f"  lowest predicted: {predicted_best}; lowest measured: {measured_best}"
                 + (f" (among the {len(rows)} measured)" if missing else ""))
    record = {"prediction": str(prediction_path), "results": str(results_path), "runs": rows,
              "not_measured": missing, "lowest_predicted": predicted_best, "lowest_measured": measured_best}
    if plot is not None:
        from dist_moe.scaling.plots import plot_heldout

        plot_heldout(read_results(prediction["results"]), LossLaw(**prediction["law"]), rows,
                     prediction["budget_flops"], Path(plot))
        lines.append(f"  plot: {plot}")
    return record, "\n".join(lines)
