"""`dist-moe scaling fit RESULTS`: fit a results table, print parameters with intervals, recommend N and D.

Approach 3 is fitted per expert count, plus the joint law over expert counts when the table has more than
one; Approach 2 per expert count. Intervals are bootstrap percentile intervals over resampled runs.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from dist_moe.scaling.allocation import (compute_optimal, isoflop_allocation, no_floor_warning, no_optimum_reason,
                                         optimal_exponents)
from dist_moe.scaling.fit import (
    EPOCH_EXPONENTS,
    LawFit,
    LossLaw,
    available_cores,
    fit_loss_law,
    free_parameters,
    grid_starts,
    joint_starts,
    percentile_interval,
)
from dist_moe.scaling.fit import (
    bootstrap as bootstrap_laws,
)
from dist_moe.scaling.isoflop import bootstrap_isoflop, fit_isoflop
from dist_moe.scaling.plots import plot_isoflop, plot_isoloss, plot_loss_vs_compute
from dist_moe.scaling.results import ResultsTable, ScalingDataError, read_results

APPROACHES = ("3", "2", "both")


def run_fit(results_path: str | Path, budget: float | None = None, bootstrap: int = 100,
            out_dir: str | Path | None = None, approach: str = "3", *, grid: str = "paper",
            level: float = 0.95, workers: int | None = None, seed: int = 0, progress: bool = True,
            exclude_highest: int = 0, fix_exponents: tuple[float, float] | None = None,
            min_tokens_per_param: float = 0.0) -> str:
    """Fit `results_path` and return the report text (the caller prints it); plots go to `out_dir`.

    budget: FLOPs to recommend N_opt, D_opt for (None: no recommendation). bootstrap: resamples for the
    intervals (0: none). approach: "3", "2" or "both". grid: "paper" (4500 starts) or "coarse" (243).
    workers: processes for the grid search (None: one per core, at most 8). exclude_highest: drop the k
    runs of highest loss first (Epoch dropped 5 of the Chinchilla runs). fix_exponents: (alpha, beta) to
    hold fixed in Approach 3; without it a group with too few runs for all five parameters gets Epoch's.
    min_tokens_per_param: Approach 3 fits only runs with D / N at least this (Approach 2 sees every run).
    """
    if approach not in APPROACHES:
        raise ScalingDataError(f"approach '{approach}': expected one of {', '.join(APPROACHES)}")
    if budget is not None and not budget > 0:
        raise ScalingDataError(f"budget {budget}: expected a positive number of FLOPs")
    if bootstrap < 0:
        raise ScalingDataError(f"bootstrap {bootstrap}: expected 0 (no intervals) or a number of resamples")
    table = read_results(results_path)
    lines = [f"Scaling-law fit of {results_path}: {len(table)} runs"]
    if exclude_highest:
        table, dropped = _without_highest_loss(table, exclude_highest)
        lines.append(f"excluded the {len(dropped)} highest-loss runs: {', '.join(dropped)}")
    groups = table.by_experts()
    boot = {"resamples": bootstrap, "seed": seed, "progress": progress}
    intervals = f"{level:.0%} bootstrap percentiles over {bootstrap} resamples of runs" if bootstrap else "none"
    lines += [f"expert counts {', '.join(map(str, groups))}; N = active parameters, D = tokens; intervals: {intervals}"]
    out = Path(out_dir) if out_dir is not None else None
    plots: list[Path] = []
    if approach in ("3", "both"):
        fixed = None if fix_exponents is None else dict(zip(("alpha", "beta"), map(float, fix_exponents)))
        law_table, few_tokens = table.with_tokens_per_param(min_tokens_per_param)
        if few_tokens:
            lines.append(f"Approach 3 leaves out the {len(few_tokens)} runs with fewer than {min_tokens_per_param:g} "
                         f"tokens per parameter: {', '.join(few_tokens)}")
        lines += _approach3(law_table, law_table.by_experts(), budget, grid, workers or min(available_cores(), 8),
                            level, boot, out, plots, fixed)
    if approach in ("2", "both"):
        lines += _approach2(groups, budget, level, boot, out, plots)
    lines += ["", "Plots: " + ", ".join(map(str, plots)) if plots else "Plots: none (pass an output folder)"]
    return "\n".join(lines)


def _in(out: Path, name: str) -> Path:
    """A plot's path in `out`, made on first use (a fit that fails leaves no empty folder behind)."""
    out.mkdir(parents=True, exist_ok=True)
    return out / name


def _without_highest_loss(table: ResultsTable, k: int) -> tuple[ResultsTable, list[str]]:
    """The table less its k highest-loss runs, and their names."""
    if not 0 < k < len(table):
        raise ScalingDataError(f"exclude-highest {k}: expected 1 to {len(table) - 1} for {len(table)} runs")
    order = np.argsort(table.val_loss, kind="stable")
    return table.select(np.sort(order[:-k])), [table.name[i] for i in order[-k:][::-1]]


def _exponents_for(num_runs: int, fixed: dict[str, float] | None, joint: bool = False) -> dict[str, float] | None:
    """The exponents to hold fixed: the user's, or Epoch's when the runs are too few to fit all parameters."""
    if fixed is not None or num_runs > free_parameters(joint):
        return fixed
    return dict(EPOCH_EXPONENTS)


def _fixed_note(fixed: dict[str, float] | None, num_runs: int, joint: bool = False) -> list[str]:
    if not fixed:
        return []
    values = ", ".join(f"{k} = {v:.4g}" for k, v in fixed.items())
    if num_runs > free_parameters(joint):
        return [f"  note: {values} held fixed (--fix-exponents); the intervals assume them"]
    return [f"  note: {num_runs} runs are too few to fit all {free_parameters(joint)} parameters (that needs "
            f"{free_parameters(joint) + 1}): {values} held fixed at Epoch AI's Chinchilla estimates, the other "
            f"parameters fitted; the intervals assume these exponents"]


def _approach3(table, groups, budget, grid, workers, level, boot, out, plots, fixed=None) -> list[str]:
    """Per expert count, then jointly over expert counts when there are several; appends to `plots`."""
    starts = grid_starts(grid)
    lines = ["", (f"Approach 3: L(N, D) = E + A/N^alpha + B/D^beta, Huber(delta=1e-3) on log L, "
                  f"L-BFGS-B from {len(starts)} starts ({grid} grid)")]
    fits: dict[int, tuple[ResultsTable, LossLaw]] = {}
    for experts, sub in groups.items():
        held = _exponents_for(len(sub), fixed)
        if len(groups) > 1 and len(sub) <= free_parameters(False, held):  # e.g. an expert-count sweep at one N
            lines += ["", f"experts = {experts} ({len(sub)} runs): too few for a fit of its own; in the joint fit only"]
            continue
        with _naming_group(experts):
            fit = fit_loss_law(sub.n_active, sub.tokens, sub.val_loss, starts=starts, workers=workers, fixed=held)
        laws = bootstrap_laws(sub.n_active, sub.tokens, sub.val_loss, fit, **boot)
        lines += ["", (f"experts = {experts} ({len(sub)} runs, N {_range(sub.n_active)}, D {_range(sub.tokens)}, "
                       f"rms log-residual {_rms(fit.law, sub):.4f})")]
        lines += _fixed_note(held, len(sub))
        lines += _law_lines(fit.law, laws, level, budget, held, sub)
        fits[experts] = (sub, fit.law)
        if out is not None:
            plots.append(plot_isoloss(sub, fit.law, _in(out, f"isoloss_experts{experts}.png"), budget, experts))
    if out is not None and fits:
        plots.append(plot_loss_vs_compute(fits, _in(out, "loss_vs_compute.png"), budget))
    if len(groups) > 1:
        lines += _joint_lines(table, {x: law for x, (_, law) in fits.items()}, budget, level, boot,
                              _exponents_for(len(table), fixed, joint=True))
    return lines


def _approach2(groups, budget, level, boot, out, plots) -> list[str]:
    """Per expert count: the isoFLOP exponents, their intervals and the allocation at `budget`."""
    lines = ["", ("Approach 2: per compute budget, a parabola of loss in log N (and log D); "
                  "N_opt = G C^a, D_opt = H C^b by least squares in log space")]
    for experts, sub in groups.items():
        try:
            iso = fit_isoflop(sub.n_active, sub.tokens, sub.val_loss, sub.flops)
        except ScalingDataError as exc:  # e.g. every budget's best run is the smallest size: say so, go on
            lines += ["", f"experts = {experts}: no Approach 2 fit: {exc}"]
            continue
        fits = bootstrap_isoflop(sub.n_active, sub.tokens, sub.val_loss, sub.flops, **boot)
        lines += ["", f"experts = {experts}: {len(iso.profiles)} budgets used"]
        lines += _skipped_lines(iso.skipped)
        lines.append(_row("a", iso.a, [f.a for f in fits], level) + f"   (N_opt = {iso.G:.4g} C^a)")
        lines.append(_row("b", iso.b, [f.b for f in fits], level) + f"   (D_opt = {iso.H:.4g} C^b)")
        if budget:
            best = isoflop_allocation(iso, budget)
            lines.append(_row("N_opt", best.n_opt, [f.n_opt(budget) for f in fits], level) + f"   at C = {budget:.3g}")
            lines.append(_row("D_opt", best.d_opt, [f.d_opt(budget) for f in fits], level)
                         + f"   ({best.tokens_per_param:.1f} tokens per parameter)")
        if out is not None:
            plots.append(plot_isoflop(sub, iso, _in(out, f"isoflop_experts{experts}.png")))
    return lines


@contextlib.contextmanager
def _naming_group(experts: int):
    """A fit's error (e.g. too few runs) names the expert count it concerns."""
    try:
        yield
    except ScalingDataError as exc:
        raise ScalingDataError(f"runs with num_experts={experts}: {exc}") from None


def _joint_lines(table: ResultsTable, per_count: dict[int, LossLaw], budget, level, boot, fixed) -> list[str]:
    fit: LawFit = fit_loss_law(table.n_active, table.tokens, table.val_loss, num_experts=table.num_experts,
                               starts=joint_starts(per_count) if per_count else _grid_with_gamma(), fixed=fixed)
    laws = bootstrap_laws(table.n_active, table.tokens, table.val_loss, fit, num_experts=table.num_experts, **boot)
    lines = ["", (f"Joint fit over expert counts X: L(N, D, X) = E + A/(N^alpha X^gamma) + B/D^beta "
                  f"({len(table)} runs, rms log-residual {_rms(fit.law, table):.4f})")]
    lines += _fixed_note(fixed, len(table), joint=True)
    lines += _law_lines(fit.law, laws, level, None, fixed)
    lines.append(_row("gamma", fit.law.gamma, [law.gamma for law in laws], level))
    for experts in np.unique(table.num_experts).tolist():
        lines.append(_multiplier_row(fit.law, laws, experts, level))
    if budget:
        for experts in np.unique(table.num_experts).tolist():
            runs = table.select(table.num_experts == experts)
            lines.append(f"  X = {experts}: " + _allocation_text(fit.law, laws, budget, level, runs, experts))
    return lines


def _multiplier_row(law: LossLaw, laws: list[LossLaw], experts: int, level: float) -> str:
    """A / (N^alpha X^gamma) = A / (N X^(gamma/alpha))^alpha: X experts act like X^(gamma/alpha) times the
    active parameters of a dense model (Clark et al. 2022's effective parameter count)."""
    def multiplier(s: LossLaw) -> float:
        return experts ** (s.gamma / s.alpha)

    return (_row(f"X={experts}", multiplier(law), [multiplier(s) for s in laws], level)
            + "   (effective-parameter multiplier X^(gamma/alpha) against dense)")


def _grid_with_gamma() -> np.ndarray:
    """Joint-fit starts when no expert count had runs enough for its own fit: the coarse grid, gamma = 0."""
    starts = grid_starts("coarse")
    return np.hstack([starts, np.zeros((len(starts), 1))])


def _skipped_lines(skipped: list[tuple[float, str]], shown: int = 6) -> list[str]:
    """One line per reason, listing the budgets it left out."""
    lines = []
    for reason in dict.fromkeys(why for _, why in skipped):
        budgets = [f"{c:.3g}" for c, why in skipped if why == reason]
        more = f" (+{len(budgets) - shown} more)" if len(budgets) > shown else ""
        lines.append(f"  skipped, {reason}: C = {', '.join(budgets[:shown])}{more}")
    return lines


def _law_lines(law: LossLaw, laws: list[LossLaw], level: float, budget: float | None,
               fixed: dict[str, float] | None = None, runs: ResultsTable | None = None) -> list[str]:
    lines = [_row(k, getattr(law, k), [getattr(s, k) for s in laws], level) if k not in (fixed or {})
             else f"  {k:<6} {getattr(law, k):>11.4g}   (fixed)" for k in ("A", "B", "E", "alpha", "beta")]
    a, b = optimal_exponents(law)
    lines.append(_row("a", a, [optimal_exponents(s)[0] for s in laws], level) + "   (N_opt ~ C^a, a = beta/(alpha+beta))")
    lines.append(_row("b", b, [optimal_exponents(s)[1] for s in laws], level) + "   (D_opt ~ C^b)")
    if budget:
        lines.append("  " + _allocation_text(law, laws, budget, level, runs))
    warning = no_floor_warning(law, runs.val_loss) if runs is not None else None
    return lines + ([f"  warning: {warning}"] if warning else [])


def _allocation_text(law: LossLaw, laws: list[LossLaw], budget: float, level: float, runs: ResultsTable,
                     experts: float = 1.0) -> str:
    """The optimum at `budget` with intervals over the resampled laws that have one; a fit that found no
    trade-off between N and D (see no_optimum_reason) gets its reason instead."""
    reason = no_optimum_reason(law, runs.n_active, runs.tokens, experts)
    if reason:
        return f"at C = {budget:.3g}: no allocation: {reason}"
    best = compute_optimal(law, budget, experts)
    samples = [compute_optimal(s, budget, experts) for s in laws
               if not no_optimum_reason(s, runs.n_active, runs.tokens, experts)]
    dropped = f" ({len(laws) - len(samples)} of {len(laws)} resamples had no optimum)" if len(samples) < len(laws) else ""

    def ci(values) -> str:
        return " [{:.3g}, {:.3g}]".format(*percentile_interval(values, level)) if samples else ""

    return (f"at C = {best.flops:.3g}: N_opt {best.n_opt:.3g}{ci([s.n_opt for s in samples])}, "
            f"D_opt {best.d_opt:.3g}{ci([s.d_opt for s in samples])}, "
            f"{best.tokens_per_param:.1f} tokens/param{ci([s.tokens_per_param for s in samples])}, "
            f"predicted loss {best.loss:.4f}{ci([s.loss for s in samples])}{dropped}")


def _row(name: str, value: float, samples: list[float], level: float) -> str:
    interval = "   [{:.4g}, {:.4g}]".format(*percentile_interval(samples, level)) if samples else ""
    return f"  {name:<6} {value:>11.4g}{interval}"


def _range(values: np.ndarray) -> str:
    return f"{values.min():.3g}..{values.max():.3g}"


def _rms(law: LossLaw, table: ResultsTable) -> float:
    predicted = law(table.n_active, table.tokens, table.num_experts.astype(np.float64))
    return float(np.sqrt(np.mean((np.log(predicted) - np.log(table.val_loss)) ** 2)))
