"""predict/check: the prediction record is the true law's optimum on noiseless data; check compares runs by name."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.image import imread

from dist_moe.scaling.allocation import compute_optimal
from dist_moe.scaling.fit import LossLaw
from dist_moe.scaling.predict import backtest, check, predict
from dist_moe.scaling.results import Run, ScalingDataError, append_run

TRUTH = LossLaw(A=60.0, B=120.0, E=1.9, alpha=0.33, beta=0.30)


@pytest.fixture
def table(tmp_path):
    """Three isoFLOP budgets x 5 sizes around the true optimum, the truth's losses with 0.2% noise."""
    path = tmp_path / "results.jsonl"
    rng = np.random.default_rng(0)
    for budget in (5e10, 1e11, 2e11):
        center = compute_optimal(TRUTH, budget).n_opt
        for n in center * np.geomspace(0.25, 4, 5):
            d = budget / (6 * n)
            append_run(path, Run(f"n{n:.3g}-c{budget:.0e}", 8, 4 * n, n, d, budget,
                                 float(TRUTH(n, d) * np.exp(rng.normal(0, 0.002)))))
    return path


def test_prediction_at_4x_the_largest_budget_matches_the_true_law(table, tmp_path):
    record = predict(table, 8e11, bootstrap_resamples=20, grid="coarse")
    truth = compute_optimal(TRUTH, 8e11)
    assert record["budget_flops"] == 8e11 and record["num_runs"] == 15 and record["num_experts"] == 8
    assert record["predicted_loss"] == pytest.approx(truth.loss, rel=0.01)
    assert record["interval"][0] <= record["predicted_loss"] <= record["interval"][1]
    # the prediction interval adds the runs' 0.2% scatter to the fit's own uncertainty
    assert record["rms_log_residual"] == pytest.approx(0.002, rel=0.5)
    assert record["interval"][0] < record["fit_interval"][0] and record["fit_interval"][1] < record["interval"][1]
    assert record["interval"][1] / record["interval"][0] - 1 > 2 * 1.5 * 0.002
    assert record["n_active"] == pytest.approx(truth.n_opt, rel=0.5)  # the optimum is flat: N is loosely fixed
    assert record["tokens"] * record["n_active"] * 6 == pytest.approx(8e11, rel=1e-9)
    assert record["approach2"]["budgets_used"] == 3
    assert record["approach2"]["n_active"] == pytest.approx(truth.n_opt, rel=0.5)
    # held-out runs measured exactly as the truth has them: inside the intervals, the optimum lowest, a real plot
    record["runs"] = []
    measured = tmp_path / "measured.jsonl"
    for scale in (0.5, 1.0, 2.0):
        n = truth.n_opt * scale
        d = 8e11 / (6 * n)
        predicted = LossLaw(**record["law"])(n, d)
        record["runs"].append({"name": f"x{scale}", "n_active": n, "tokens": d, "predicted_loss": predicted,
                               "interval": [predicted * 0.99, predicted * 1.01]})
        append_run(measured, Run(f"x{scale}", 8, 4 * n, n, d, 8e11, float(TRUTH(n, d))))
    (tmp_path / "prediction.json").write_text(json.dumps(record))
    result, _ = check(tmp_path / "prediction.json", measured, plot=tmp_path / "heldout.png")
    assert all(r["inside_interval"] and abs(r["relative_error"]) < 0.01 for r in result["runs"])
    assert result["lowest_predicted"] == result["lowest_measured"] == "x1.0"
    assert imread(tmp_path / "heldout.png").shape[2] == 4


def test_runs_with_too_few_tokens_per_parameter_are_left_out_of_the_law(table):
    """Runs of a model far too large for its budget sit on the loss plateau of their first steps, above the law:
    --min-tokens-per-param keeps them out of Approach 3, which then finds the true optimum again."""
    fitted = predict(table, 8e11, bootstrap_resamples=10, grid="coarse")
    plateau = []
    for n in (2e6, 4e6, 8e6):
        d = 2e11 / (6 * n)
        append_run(table, Run(f"plateau-{n:.0e}", 8, 4 * n, n, d, 2e11, float(TRUTH(n, d) * 1.3)))
        plateau.append((f"plateau-{n:.0e}", d / n))
    threshold = 2 * max(ratio for _, ratio in plateau)
    record = predict(table, 8e11, bootstrap_resamples=10, grid="coarse", min_tokens_per_param=threshold)
    assert record["left_out"] == [name for name, _ in plateau] and record["min_tokens_per_param"] == threshold
    assert record["num_runs"] == 15 and record["predicted_loss"] == pytest.approx(fitted["predicted_loss"], rel=1e-3)
    assert record["warnings"] == []  # the truth's E = 1.9 is found
    assert record["approach2"]["budgets_used"] == 3  # Approach 2 fits every run
    with pytest.raises(ScalingDataError, match="at least 10 resamples"):
        predict(table, 8e11, bootstrap_resamples=0)
    everything = predict(table, 8e11, bootstrap_resamples=10, grid="coarse")
    assert everything["num_runs"] == 18 and everything["left_out"] == []


def test_a_prediction_from_a_law_without_a_floor_carries_the_warning(tmp_path):
    """Runs of a pure power law (E = 0): predict fits E ~ 0 and says its extrapolation will be too low."""
    path, floorless = tmp_path / "results.jsonl", LossLaw(A=60.0, B=120.0, E=0.0, alpha=0.33, beta=0.30)
    for budget in (5e10, 1e11, 2e11):
        for n in compute_optimal(TRUTH, budget).n_opt * np.geomspace(0.25, 4, 5):
            d = budget / (6 * n)
            append_run(path, Run(f"n{n:.3g}-c{budget:.0e}", 8, 4 * n, n, d, budget, float(floorless(n, d))))
    record = predict(path, 8e11, bootstrap_resamples=10, grid="coarse")
    assert len(record["warnings"]) == 1 and record["warnings"][0].startswith("the fit puts no floor under the loss")


def test_backtest_fits_the_small_budgets_and_predicts_the_largest(table):
    text = backtest(table, 2e11, 2.0, [0.0, 1e9], grid="coarse")
    lines = text.splitlines()
    assert lines[0].startswith("fit C <= 1e+11, predict the runs at C = 2e+11")
    errors = [float(e.rstrip("%;")) for e in re.findall(r"[+-]\d+\.\d+%", lines[1])]
    assert "10 runs" in lines[1] and len(errors) == 3 and max(map(abs, errors)) < 1.0  # the truth's 0.2% noise
    assert lines[1].endswith("lowest ranked first: yes")
    assert "leaves no run to fit" in lines[2]  # no run has a billion tokens per parameter
    with pytest.raises(ScalingDataError, match="no run within 10% of C = 7e\\+11"):
        backtest(table, 7e11, 2.0, [0.0])


def test_backtest_and_predict_from_the_command_line(table, tmp_path):
    cli = [sys.executable, "-m", "dist_moe.cli", "scaling"]
    done = subprocess.run([*cli, "backtest", str(table), "--budget", "2e11", "--span", "2", "--grid", "coarse",
                           "--min-tokens-per-param", "0,1e9"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert [line.split()[2] for line in done.stdout.splitlines()[1:]] == ["0", "1e+09"]
    bad = subprocess.run([*cli, "backtest", str(table), "--budget", "2e11", "--min-tokens-per-param", "x"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "'x': expected numbers separated by commas" in bad.stderr
    done = subprocess.run([*cli, "predict", str(table), "--budget", "8e11", "--grid", "coarse", "--bootstrap", "10",
                           "--min-tokens-per-param", "1e9", "--out", str(tmp_path / "p.json")], capture_output=True,
                          text=True)
    assert done.returncode != 0 and "leaves no run to fit" in done.stderr and not (tmp_path / "p.json").exists()


def test_check_compares_measured_losses_with_the_prediction_by_name(tmp_path):
    prediction = {"runs": [{"name": "a", "n_active": 10, "tokens": 100, "predicted_loss": 2.0, "interval": [1.9, 2.1]},
                           {"name": "b", "n_active": 20, "tokens": 50, "predicted_loss": 2.1, "interval": [2.0, 2.2]}]}
    pred_path = tmp_path / "prediction.json"
    pred_path.write_text(json.dumps(prediction))
    measured = tmp_path / "measured.jsonl"
    append_run(measured, Run("b", 8, 40, 20, 50, 6000, 2.0))
    append_run(measured, Run("a", 8, 20, 10, 100, 6000, 2.2))
    record, text = check(pred_path, measured)
    a, b = record["runs"]
    assert a["relative_error"] == pytest.approx(0.1) and not a["inside_interval"]
    assert b["relative_error"] == pytest.approx(2.0 / 2.1 - 1) and b["inside_interval"]
    assert record["lowest_predicted"] == "a" and record["lowest_measured"] == "b"
    assert "(outside)" in text
    measured.unlink()
    append_run(measured, Run("a", 8, 20, 10, 100, 6000, 2.2))
    record, text = check(pred_path, measured)  # a run not (yet) measured is listed, the others compared
    assert record["not_measured"] == ["b"] and [r["name"] for r in record["runs"]] == ["a"]
    assert "b                not measured" in text
    measured.unlink()
    append_run(measured, Run("c", 8, 20, 10, 100, 6000, 2.2))
    with pytest.raises(ScalingDataError, match="none of the prediction's runs"):
        check(pred_path, measured)
