"""`dist-moe analyze`: reads expert-load scalars back from real event files (written here with SummaryWriter
in the trainer's tag format), names most/least loaded and dead experts, the drop trend, writes PNGs, and
fails with one clear line on directories it cannot analyse."""

import numpy as np
import pytest
from matplotlib.image import imread
from torch.utils.tensorboard import SummaryWriter

from dist_moe.analysis.expert_load import AnalysisError, analyze, dead_experts, drop_trend, read_history
from dist_moe.analysis.plots import HEATMAP_DPI, heatmap_figsize, load_heatmap

E = 8
STEPS = [10, 20, 30, 40, 50, 60]


def write_run(logdir, loads: dict[int, np.ndarray], dropped: dict[int, list[float]], steps=STEPS, purge_step=None):
    """loads[layer]: (len(steps), E) fractions; dropped[layer]: one value per step."""
    writer = SummaryWriter(str(logdir), purge_step=purge_step)
    for n, step in enumerate(steps):
        for layer, load in loads.items():
            for e in range(load.shape[1]):
                writer.add_scalar(f"expert_load/layer_{layer}/expert_{e}", load[n, e], step)
            writer.add_scalar(f"routing/layer_{layer}/dropped_fraction", dropped[layer][n], step)
    writer.close()


def skewed_loads(rng) -> np.ndarray:
    """Layer with experts 6 and 7 dead over the last 4 logs, expert 5 dead but for the latest log, and expert
    0 the most loaded throughout."""
    load = rng.uniform(0.5, 1.0, size=(len(STEPS), E))
    load[:, 0] += 3.0
    load[-4:, 6:] = 0.0
    load[-4:, 7] = 0.001  # under the 10% of 1/8 = 1.25% threshold, and not zero
    load[-5:-1, 5] = 0.0
    return load / load.sum(axis=1, keepdims=True)


def test_report_names_most_least_and_dead_experts_and_the_drop_trend(tmp_path):
    rng = np.random.default_rng(0)
    skewed, even = skewed_loads(rng), np.full((len(STEPS), E), 1.0 / E)
    drops = [0.30 - 0.0004 * s for s in STEPS]  # falls 0.04 points per step
    write_run(tmp_path / "tb", {0: skewed, 2: even}, {0: drops, 2: [0.0] * len(STEPS)})
    report = analyze(tmp_path, last_n=4)
    layer0, layer2 = report.split("layer 0:")[1].split("layer 2:")
    mean = skewed[-4:].mean(axis=0)
    order = np.argsort(-mean)
    assert f"most loaded 0 ({mean[0]:.1%}), {order[1]} ({mean[order[1]]:.1%}), " in layer0, report
    assert f"least loaded 6 ({mean[6]:.1%}), 7 ({mean[7]:.1%}), 5 ({mean[5]:.1%})" in layer0, report
    assert "dead experts (< 1.25% in each of the last 4 log(s)): 6, 7\n" in layer0, report
    assert "dead experts (< 1.25% in each of the last 4 log(s)): none" in layer2, report
    assert "dropped: 29.60% (first log) -> 27.60% (last log), slope -40.000 points per 1000 steps" in layer0, report
    assert "max/mean 1.00" in layer2, report
    assert report.splitlines()[0].startswith(f"expert load: {tmp_path / 'tb'} (6 log(s), steps 10-60; 2 MoE layer(s)")


def test_last_n_sets_the_window_an_expert_must_be_dead_in():
    load = np.full((6, 4), 0.25)
    load[-2:, 3] = 0.0
    assert dead_experts(load[-2:]) == [3]
    assert dead_experts(load[-5:]) == []
    load[-1, 3] = 0.025  # exactly 10% of the fair share is not under it
    assert dead_experts(load[-1:]) == []


def test_drop_trend_slope_equals_the_least_squares_line():
    steps = np.array([0, 100, 200, 400])
    dropped = np.array([0.2, 0.1, 0.15, 0.05])
    first, last, slope = drop_trend(steps, dropped)
    x, y = steps - steps.mean(), dropped - dropped.mean()
    assert (first, last) == (0.2, 0.05) and slope == pytest.approx(1000 * (x @ y) / (x @ x))
    assert np.isnan(drop_trend(steps[:1], dropped[:1])[2])
    assert drop_trend(steps, np.full(4, np.nan)) is None


def test_plots_are_pngs_beside_the_logs_and_out_dir_moves_them(tmp_path):
    rng = np.random.default_rng(1)
    write_run(tmp_path / "tb", {1: skewed_loads(rng), 3: skewed_loads(rng)}, {1: [0.1] * 6, 3: [0.2] * 6})
    analyze(tmp_path)
    written = sorted(p.name for p in (tmp_path / "expert_load").iterdir())
    assert written == ["dropped_fraction.png", "heatmap.png", "layer_1_load.png", "layer_3_load.png"]
    heatmap = imread(tmp_path / "expert_load" / "heatmap.png")
    width, height = (round(inches * HEATMAP_DPI) for inches in heatmap_figsize(2, E))
    assert heatmap.shape[:2] == (height, width) and heatmap.std() > 0.05
    report = analyze(tmp_path, out_dir=tmp_path / "elsewhere")
    assert (tmp_path / "elsewhere" / "heatmap.png").is_file() and str(tmp_path / "elsewhere") in report


def test_resumed_run_keeps_the_values_written_after_the_resume(tmp_path):
    """A resumed run writes again from its checkpoint step (SummaryWriter purge_step): later values win."""
    first = np.full((6, E), 1.0 / E)
    write_run(tmp_path, {0: first}, {0: [0.5] * 6})
    second = np.zeros((3, E))
    second[:, 0] = 1.0
    write_run(tmp_path, {0: second}, {0: [0.9] * 3}, steps=[40, 50, 60], purge_step=40)
    history = read_history(tmp_path)
    assert history.steps.tolist() == STEPS
    np.testing.assert_allclose(history.load[:3, 0], first[:3])
    np.testing.assert_allclose(history.load[3:, 0], second)
    np.testing.assert_allclose(history.dropped[:, 0], [0.5, 0.5, 0.5, 0.9, 0.9, 0.9])


@pytest.mark.parametrize("case", ["empty", "missing", "no_expert_tags", "two_runs", "last_zero"])
def test_unanalysable_directories_are_one_clear_line(tmp_path, case):
    target = tmp_path / "run"
    target.mkdir()
    if case == "missing":
        target = tmp_path / "nope"
    elif case == "no_expert_tags":
        writer = SummaryWriter(str(target / "tb"))
        writer.add_scalar("train/loss", 3.0, 1)
        writer.close()
    elif case in ("two_runs", "last_zero"):
        for name in ("a", "b") if case == "two_runs" else ("a",):
            write_run(target / name / "tb", {0: np.full((6, E), 1.0 / E)}, {0: [0.0] * 6})
    with pytest.raises(AnalysisError) as error:
        analyze(target, last_n=0 if case == "last_zero" else 5)
    message = str(error.value)
    assert "\n" not in message and isinstance(error.value, ValueError)
    expected = {"empty": "no TensorBoard event files", "missing": "does not exist",
                "no_expert_tags": "no expert-load scalars", "two_runs": "several runs", "last_zero": "--last 0"}[case]
    assert expected in message, message
    if case != "last_zero":
        assert str(target) in message


@pytest.mark.parametrize("change", [False, True])
def test_every_heatmap_cell_label_contrasts_with_its_cell(change):
    """Text luminance vs the cell's colour under the figure's own colormap and norm: a label black on deep red
    (the change map's ends) or white on yellow would be unreadable in TensorBoard's scaled-down card."""
    from matplotlib.colors import to_rgb as colour

    rng = np.random.default_rng(0)
    load = rng.uniform(-0.2, 0.2, (4, 8)) if change else rng.dirichlet(np.ones(8) * 0.5, size=4)
    fig = load_heatmap(load, [0, 1, 2, 3], "t", change=change)
    image = fig.axes[0].images[0]

    def luminance(rgb) -> float:
        return float(np.dot(rgb[:3], [0.2126, 0.7152, 0.0722]))

    assert len(fig.axes[0].texts) == load.size
    for text in fig.axes[0].texts:
        e, i = (round(v) for v in text.get_position())
        cell = image.cmap(image.norm(load[i, e]))
        assert abs(luminance(colour(text.get_color())) - luminance(cell)) > 0.3, (i, e, load[i, e], text.get_color())


def test_report_gives_the_rerouted_fraction_only_for_runs_that_logged_it(tmp_path):
    even = np.full((len(STEPS), E), 1.0 / E)
    write_run(tmp_path / "tb", {0: even, 1: even}, {0: [0.1] * len(STEPS), 1: [0.1] * len(STEPS)})
    writer = SummaryWriter(str(tmp_path / "tb"))
    rerouted = [0.01, 0.02, 0.03, 0.04, 0.05, 0.09]
    for step, value in zip(STEPS, rerouted):
        writer.add_scalar("routing/layer_0/rerouted_fraction", value, step)
    writer.close()
    report = analyze(tmp_path, last_n=3)
    layer0, layer1 = report.split("layer 0:")[1].split("layer 1:")
    assert "rerouted to a next-best expert: 6.00% (last 3 log(s), steps 40-60)" in layer0, report
    assert "rerouted to" not in layer1, report
