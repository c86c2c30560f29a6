"""`dist-moe analyze RUN_DIR`: an expert-load report from a run's TensorBoard event files.

Reads the scalars the trainer's ExpertLoadTracker wrote (expert_load/layer_{i}/expert_{e} and
routing/layer_{i}/{stat}) with tensorboard's EventAccumulator, every point kept. Per layer it names the
most and least loaded experts and the dead ones (below 10% of the fair share 1/E in each of the last N
logs), and the drop-rate trend; it also draws PNG plots into RUN_DIR/expert_load/.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_moe.analysis.plots import dropped_lines, layer_load_lines, load_heatmap, save_png
from dist_moe.errors import UserError

LOAD_RE = re.compile(r"^expert_load/layer_(\d+)/expert_(\d+)$")
DROPPED_RE = re.compile(r"^routing/layer_(\d+)/dropped_fraction$")
REROUTED_RE = re.compile(r"^routing/layer_(\d+)/rerouted_fraction$")
DEAD_FRACTION_OF_FAIR_SHARE = 0.1


class AnalysisError(UserError, ValueError):
    """A run directory that cannot be analysed; the message is one line naming the path."""


@dataclass
class LoadHistory:
    """Expert-load logs of one run, by logged step. NaN where a value was not logged at a step."""

    source: Path  # the directory holding the event files
    steps: np.ndarray  # (N,) int, increasing
    layers: list[int]  # MoE block indices, increasing
    load: np.ndarray  # (N, L, E) fraction of each layer's kept assignments per expert
    dropped: np.ndarray  # (N, L) fraction of routed assignments dropped
    rerouted: np.ndarray  # (N, L) fraction of routed assignments moved to another expert (NaN: not logged)

    @property
    def num_experts(self) -> int:
        return self.load.shape[2]


def event_dirs(run_dir: Path) -> list[Path]:
    """Directories at or below run_dir holding TensorBoard event files, sorted."""
    return sorted({path.parent for path in run_dir.rglob("events.out.tfevents.*") if path.is_file()})


def _scalars(directory: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}}; a step written twice (a resumed run) keeps its last value."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    keep_all_scalars = {ea.SCALARS: 0, ea.IMAGES: 1, ea.HISTOGRAMS: 1, ea.COMPRESSED_HISTOGRAMS: 1,
                        ea.TENSORS: 1, ea.AUDIO: 1}
    accumulator = ea.EventAccumulator(str(directory), size_guidance=keep_all_scalars)
    accumulator.Reload()
    return {tag: {event.step: event.value for event in accumulator.Scalars(tag)}
            for tag in accumulator.Tags()["scalars"]}


def read_history(run_dir: str | Path) -> LoadHistory:
    """The expert-load logs under run_dir (a dist-moe run dir, or its tb/ folder). AnalysisError if there are
    none, or if several runs below it have some."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AnalysisError(f"run dir '{run_dir}' does not exist or is not a directory")
    directories = event_dirs(run_dir)
    if not directories:
        raise AnalysisError(f"'{run_dir}' has no TensorBoard event files (events.out.tfevents.*) in it or below it")
    found = []
    for directory in directories:
        scalars = _scalars(directory)
        if any(LOAD_RE.match(tag) for tag in scalars):
            found.append((directory, scalars))
    if not found:
        raise AnalysisError(f"'{run_dir}': its event files have no expert-load scalars (expert_load/layer_*/"
                            "expert_*); the trainer writes them every log.expert_every steps")
    if len(found) > 1:
        names = ", ".join(str(d) for d, _ in found)
        raise AnalysisError(f"'{run_dir}' holds expert-load logs of several runs ({names}); pass one of them")
    source, scalars = found[0]
    loads = {tuple(map(int, m.groups())): scalars[tag] for tag in scalars if (m := LOAD_RE.match(tag))}
    drops = {int(m.group(1)): scalars[tag] for tag in scalars if (m := DROPPED_RE.match(tag))}
    reroutes = {int(m.group(1)): scalars[tag] for tag in scalars if (m := REROUTED_RE.match(tag))}
    layers = sorted({layer for layer, _ in loads})
    num_experts = 1 + max(expert for _, expert in loads)
    steps = np.array(sorted({step for series in loads.values() for step in series}))
    load = np.full((len(steps), len(layers), num_experts), np.nan)
    dropped = np.full((len(steps), len(layers)), np.nan)
    rerouted = np.full((len(steps), len(layers)), np.nan)
    for n, step in enumerate(steps.tolist()):
        for j, layer in enumerate(layers):
            for e in range(num_experts):
                load[n, j, e] = loads.get((layer, e), {}).get(step, np.nan)
            dropped[n, j] = drops.get(layer, {}).get(step, np.nan)
            rerouted[n, j] = reroutes.get(layer, {}).get(step, np.nan)
    return LoadHistory(source, steps, layers, load, dropped, rerouted)


def dead_experts(recent_load: np.ndarray) -> list[int]:
    """Experts below DEAD_FRACTION_OF_FAIR_SHARE / E in every row of recent_load (n, E), NaN rows ignored."""
    num_experts = recent_load.shape[1]
    threshold = DEAD_FRACTION_OF_FAIR_SHARE / num_experts
    logged = recent_load[~np.isnan(recent_load).any(axis=1)]
    if len(logged) == 0:
        return []
    return [e for e in range(num_experts) if (logged[:, e] < threshold).all()]


def drop_trend(steps: np.ndarray, dropped: np.ndarray) -> tuple[float, float, float] | None:
    """(first, last, least-squares slope per 1000 steps) of a layer's dropped fraction; None if unlogged.
    The slope is NaN with fewer than two logs."""
    ok = ~np.isnan(dropped)
    if not ok.any():
        return None
    x, y = steps[ok].astype(np.float64), dropped[ok]
    slope = np.polyfit(x, y, 1)[0] * 1000 if len(x) >= 2 and np.ptp(x) > 0 else float("nan")
    return float(y[0]), float(y[-1]), float(slope)


def _experts(order: np.ndarray, mean: np.ndarray) -> str:
    return ", ".join(f"{e} ({mean[e]:.1%})" for e in order)


def analyze(run_dir: str | Path, last_n: int = 5, out_dir: str | Path | None = None) -> str:
    """The report as text (the CLI prints it); PNG plots go to out_dir (default RUN_DIR/expert_load)."""
    if last_n < 1:
        raise AnalysisError(f"--last {last_n}: expected at least 1 log")
    history = read_history(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "expert_load"
    recent = slice(max(len(history.steps) - last_n, 0), None)
    E, steps = history.num_experts, history.steps
    shown = max(1, min(3, E // 2))  # most and least loaded lists do not overlap
    fair, threshold = 1.0 / E, DEAD_FRACTION_OF_FAIR_SHARE / E
    window = f"last {len(steps[recent])} log(s), steps {steps[recent][0]}-{steps[-1]}"
    header = (f"expert load: {history.source} ({len(steps)} log(s), steps {steps[0]}-{steps[-1]}; "
              f"{len(history.layers)} MoE layer(s), {E} experts, fair share {fair:.1%})")
    lines = [header, f"load = fraction of a layer's kept assignments, averaged over the {window}"]
    for j, layer in enumerate(history.layers):
        mean = np.nanmean(history.load[recent, j], axis=0)  # (E,)
        most, least = np.argsort(-mean, kind="stable")[:shown], np.argsort(mean, kind="stable")[:shown]
        lines.append(f"layer {layer}: most loaded {_experts(most, mean)}; least loaded {_experts(least, mean)}; "
                     f"max/mean {mean.max() / mean.mean():.2f}")
        dead = dead_experts(history.load[recent, j])
        named = ", ".join(map(str, dead)) if dead else "none"
        lines.append(f"  dead experts (< {threshold:.2%} in each of the last {len(steps[recent])} log(s)): {named}")
        trend = drop_trend(steps, history.dropped[:, j])
        if trend is None:
            lines.append("  dropped: not logged")
        else:
            first, last, slope = trend
            if np.isfinite(slope):
                lines.append(f"  dropped: {first:.2%} (first log) -> {last:.2%} (last log), "
                             f"slope {slope * 100:+.3f} points per 1000 steps")
            else:
                lines.append(f"  dropped: {last:.2%} (one log, no trend yet)")
        rerouted = history.rerouted[recent, j]
        if not np.isnan(rerouted).all():
            lines.append(f"  rerouted to a next-best expert: {np.nanmean(rerouted):.2%} ({window})")
    lines.append("plots: " + ", ".join(str(p) for p in write_plots(history, out)))
    return "\n".join(lines)


def write_plots(history: LoadHistory, out: Path) -> list[Path]:
    """heatmap.png (latest log), dropped_fraction.png, layer_{i}_load.png; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    threshold = DEAD_FRACTION_OF_FAIR_SHARE / history.num_experts
    latest = np.nan_to_num(history.load[-1])
    paths = [save_png(load_heatmap(latest, history.layers, f"expert load at step {history.steps[-1]}"),
                      out / "heatmap.png"),
             save_png(dropped_lines(history.steps, history.dropped, history.layers), out / "dropped_fraction.png")]
    for j, layer in enumerate(history.layers):
        figure = layer_load_lines(history.steps, history.load[:, j], layer, threshold)
        paths.append(save_png(figure, out / f"layer_{layer}_load.png"))
    return paths
