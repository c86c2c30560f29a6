"""PNG figures of a scaling fit, drawn with matplotlib's object API (Agg canvas, no pyplot state).

loss against compute with the fitted compute-optimal frontier; iso-loss contours over (N, D) with the
compute-optimal line; Approach 2's isoFLOP parabolas and N_opt(C).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter

from dist_moe.scaling.allocation import compute_optimal, no_optimum_reason
from dist_moe.scaling.fit import LossLaw
from dist_moe.scaling.isoflop import IsoFlopFit, group_budgets
from dist_moe.scaling.results import ResultsTable


def _figure(ncols: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(6.4 * ncols, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _label(num_experts: int) -> str:
    return "dense" if num_experts == 1 else f"{num_experts} experts"


def _plain_loss_ticks(axis) -> None:
    """Loss on a log axis reads better as 2.5, 3 than as 2.5 x 10^0."""
    axis.set_major_formatter(FormatStrFormatter("%.3g"))
    axis.set_minor_formatter(FormatStrFormatter("%.3g"))


def _span(values, budget: float | None = None, pad: float = 2.0) -> np.ndarray:
    lo, hi = float(np.min(values)) / pad, float(np.max(values)) * pad
    if budget:
        lo, hi = min(lo, budget / pad), max(hi, budget * pad)
    return np.geomspace(lo, hi, 200)


def plot_loss_vs_compute(fits: dict[int, tuple[ResultsTable, LossLaw]], path: Path,
                         budget: float | None = None) -> Path:
    """Runs' final loss against C, with L(N_opt(C), D_opt(C)) per expert count (where the law has an
    optimum, see no_optimum_reason); keys are expert counts."""
    fig, (ax,) = _figure()
    colors = colormaps["viridis"](np.linspace(0.0, 0.85, len(fits)))
    all_flops = np.concatenate([t.flops for t, _ in fits.values()])
    grid = _span(all_flops, budget)
    for color, (experts, (table, law)) in zip(colors, fits.items()):
        ax.scatter(table.flops, table.val_loss, s=10, alpha=0.6, color=color, label=f"runs, {_label(experts)}")
        if no_optimum_reason(law, table.n_active, table.tokens):
            continue
        ax.plot(grid, compute_optimal(law, grid).loss, color=color, label=f"frontier, {_label(experts)}")
        if budget:
            ax.plot([budget], [compute_optimal(law, budget).loss], "*", ms=12, color=color)
    if budget:
        ax.axvline(budget, ls="--", color="gray", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="final validation loss",
           title="Loss against compute, fitted compute-optimal frontier")
    _plain_loss_ticks(ax.yaxis)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return Path(path)


def plot_isoloss(table: ResultsTable, law: LossLaw, path: Path, budget: float | None = None,
                 num_experts: int = 1) -> Path:
    """Contours of the fitted L over (N, D), the runs, and the compute-optimal line N_opt(C), D_opt(C) (where
    the law has one, see no_optimum_reason)."""
    fig, (ax,) = _figure()
    flops = _span(table.flops, budget, pad=10.0)
    optimum = not no_optimum_reason(law, table.n_active, table.tokens, num_experts)
    best = compute_optimal(law, flops, num_experts) if optimum else None
    n = _span(np.concatenate([table.n_active, best.n_opt if optimum else []]), pad=1.0)
    d = _span(np.concatenate([table.tokens, best.d_opt if optimum else []]), pad=1.0)
    nn, dd = np.meshgrid(n, d)  # (len(d), len(n))
    surface = law(nn, dd, num_experts)
    levels = np.geomspace(surface.min(), np.percentile(surface, 95), 15)
    filled = ax.contourf(nn, dd, surface, levels=levels, cmap="viridis_r", norm=LogNorm(), extend="max")
    fig.colorbar(filled, ax=ax, label="fitted loss", format=FormatStrFormatter("%.3g"))
    ax.scatter(table.n_active, table.tokens, s=8, color="black", alpha=0.6, label="runs")
    if optimum:
        ax.plot(best.n_opt, best.d_opt, color="red", label="compute-optimal (C = 6ND)")
    if optimum and budget:
        point = compute_optimal(law, budget, num_experts)
        ax.plot([point.n_opt], [point.d_opt], "*", ms=14, color="red", label=f"C = {budget:.3g}")
    ax.set(xscale="log", yscale="log", xlabel="parameters N (active)", ylabel="tokens D",
           xlim=(n[0], n[-1]), ylim=(d[0], d[-1]), title=f"Iso-loss contours, {_label(num_experts)}")
    ax.legend(fontsize=8, loc="upper left")
    fig.savefig(path, dpi=120)
    return Path(path)


def plot_isoflop(table: ResultsTable, fit: IsoFlopFit, path: Path) -> Path:
    """`fit` must come from `table`'s rows. Left: loss against N per budget (hollow: sizes outside the parabola's
    window) with its parabola and minimum, coloured by C on a colour bar (a legend of 31 budgets runs off the
    axes). Right: N_opt against C, fitted line."""
    fig, (left, right) = _figure(2)
    budgets = np.array([p.flops for p in fit.profiles])
    scale = ScalarMappable(LogNorm(budgets.min(), budgets.max() if len(budgets) > 1 else budgets.min() * 10),
                           colormaps["plasma"])
    for profile in fit.profiles:
        color = scale.to_rgba(profile.flops)
        outside = np.setdiff1d(profile.rows, profile.window)
        left.scatter(table.n_active[outside], table.val_loss[outside], s=10, facecolors="none", edgecolors=color)
        n = table.n_active[profile.window]
        left.scatter(n, table.val_loss[profile.window], s=10, color=color)
        x = np.linspace(np.log(n.min()), np.log(n.max()), 100)
        left.plot(np.exp(x), np.polyval(profile.fit_n, x), color=color)
        left.plot([profile.n_opt], [profile.loss_opt], "o", mfc="none", ms=8, color=color)
    fig.colorbar(scale, ax=left, label="training FLOPs C of the profile")
    left.set(xscale="log", xlabel="parameters N (active)", ylabel="final validation loss",
             title=f"IsoFLOP profiles ({len(fit.profiles)} budgets; circles: minima)")
    grid = _span(budgets)
    right.scatter(budgets, [p.n_opt for p in fit.profiles], color="black", label="N* per budget")
    right.plot(grid, fit.n_opt(grid), color="red", label=f"N_opt = {fit.G:.3g} C^{fit.a:.3f}")
    right.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="N_opt", title="Optimal size against compute")
    right.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return Path(path)


def plot_heldout(table: ResultsTable, law: LossLaw, heldout: list[dict], budget: float, path: Path) -> Path:
    """The fitted law's isoFLOP curves L(N, C/6N) at the swept budgets and at the held-out `budget`, the runs it
    was fitted on, and the held-out runs (dicts with n_active, val_loss, predicted_loss, interval) with their
    predictions and intervals."""
    fig, (ax,) = _figure()
    labels = group_budgets(table.flops)  # one curve per budget, not per run's exact C
    budgets = [float(np.exp(np.log(table.flops[labels == k]).mean())) for k in np.unique(labels)] + [budget]
    scale = ScalarMappable(LogNorm(min(budgets), max(budgets)), colormaps["plasma"])
    n = _span(np.concatenate([table.n_active, [r["n_active"] for r in heldout]]), pad=1.5)
    for c in budgets:
        ax.plot(n, law(n, c / (6 * n)), color=scale.to_rgba(c), lw=2.0 if c == budget else 1.0,
                ls="--" if c == budget else "-")
    ax.scatter(table.n_active, table.val_loss, s=14, c=[scale.to_rgba(c) for c in table.flops], label="swept runs")
    n_held = np.array([r["n_active"] for r in heldout])
    predicted = np.array([r["predicted_loss"] for r in heldout])
    spread = np.abs(np.array([r["interval"] for r in heldout]).T - predicted)
    ax.errorbar(n_held, predicted, yerr=spread, fmt="o", mfc="none", color="black", capsize=3,
                label=f"predicted at C = {budget:.3g} (interval)")
    ax.plot(n_held, [r["val_loss"] for r in heldout], "*", ms=12, color="red", label="measured (held out)")
    best = compute_optimal(law, budget)
    ax.axvline(best.n_opt, ls=":", color="gray", lw=0.8, label=f"predicted N_opt = {best.n_opt:.3g}")
    fig.colorbar(scale, ax=ax, label="training FLOPs C (dashed: held out)")
    shown = np.concatenate([table.val_loss, [r["val_loss"] for r in heldout], predicted])
    ax.set(xscale="log", yscale="log", xlabel="parameters N (active)", ylabel="final validation loss",
           ylim=(shown.min() * 0.9, shown.max() * 1.1),  # a law with a wall in N would squash everything else
           title="Fitted isoFLOP curves and the held-out budget")
    _plain_loss_ticks(ax.yaxis)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return Path(path)
