"""A real sweep: 4 tiny training runs as Ray tasks on a local cluster, one results row each; a re-run is a no-op."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dist_moe.config import ConfigError
from dist_moe.scaling.results import read_results
from dist_moe.scaling.sweep import load_sweep, plan

pytestmark = pytest.mark.slow

SHARED = ["data.max_corpus_mb=2", "data.tokenizer_sample_mb=1", "data.vocab_size=512", "data.seq_len=32",
          "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1", "moe.num_experts=4",
          "train.micro_batch_size=4", "train.eval_batches=2", "train.eval_every=100000", "log.every=100000"]


def write_sweep(tmp_path, **extra) -> str:
    sweep = {
        "preset": "tiny", "results": str(tmp_path / "results.jsonl"), "run_root": str(tmp_path / "runs"),
        "overrides": SHARED + [f"data.cache_dir={tmp_path / 'cache'}"],
        "models": [{"name": "d32", "overrides": ["model.d_model=32", "model.d_ff=64", "moe.d_expert=64"]},
                   {"name": "d64", "overrides": ["model.d_model=64", "model.d_ff=128", "moe.d_expert=128"]}],
        "tokens": [1024, 2048], **extra,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps(sweep))  # JSON is YAML
    return str(path)


def sweep(path: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dist_moe.cli", "scaling", "sweep", path], capture_output=True,
                          text=True, timeout=900)


def test_sweep_of_four_real_runs_then_a_rerun_runs_nothing(tmp_path):
    path = write_sweep(tmp_path)
    first = sweep(path)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    table = read_results(tmp_path / "results.jsonl")
    assert sorted(table.name) == ["d32-D1.02e+03", "d32-D2.05e+03", "d64-D1.02e+03", "d64-D2.05e+03"]
    assert set(table.tokens) == {32 * 4 * 8, 32 * 4 * 16}  # steps = ceil(D / tokens per step)
    assert (table.flops == 6 * table.n_active * table.tokens).all()
    assert table.n_active[list(table.name).index("d64-D1.02e+03")] > table.n_active[list(table.name).index("d32-D1.02e+03")]
    assert all((tmp_path / "runs" / name / "summary.json").is_file() for name in table.name)
    unique = json.loads((tmp_path / "runs" / "d32-D1.02e+03" / "data.json").read_text())["train_tokens"]
    assert f"data: {unique:,} unique training tokens; the largest run (d32-D2.05e+03) reads {2048 / unique:.2f} epochs" in first.stdout
    second = sweep(path)
    assert second.returncode == 0 and "4 already in" in second.stdout and "0 to run" in second.stdout
    assert len(read_results(tmp_path / "results.jsonl")) == 4
    # the README's next step: four runs are too few for five parameters, so the fit holds the exponents.
    # Runs of 8 and 16 steps differ across machines (the stdlib corpus is the machine's Python, thread counts
    # change the sums), and whether the larger model is ahead yet decides whether the fit has an optimum;
    # either answer must be a clean report (the degenerate one is pinned by test_scaling_report.py).
    fit = subprocess.run([sys.executable, "-m", "dist_moe.cli", "scaling", "fit", str(tmp_path / "results.jsonl"),
                          "--budget", "1e12", "--bootstrap", "5", "--grid", "coarse"], capture_output=True, text=True,
                         timeout=600)
    assert fit.returncode == 0, fit.stderr[-2000:]
    assert "held fixed at Epoch AI's Chinchilla estimates" in fit.stdout
    assert "at C = 1e+12: N_opt" in fit.stdout or "at C = 1e+12: no allocation: the fit puts no weight on" in fit.stdout
    assert "RuntimeWarning" not in fit.stderr and not re.search(r"\b(inf|nan)\b", fit.stdout), fit.stderr + fit.stdout
    assert sorted(p.name for p in (tmp_path / "results_plots").iterdir()) == ["isoloss_experts4.png",
                                                                               "loss_vs_compute.png"]


def test_isoflop_plan_trains_each_model_for_c_over_6n_tokens(tmp_path):
    planned = plan(load_sweep(write_sweep(tmp_path, tokens=[], flops=[1e9])))
    assert [run.name for run in planned] == ["d32-C1e+09", "d64-C1e+09"]
    for run in planned:
        wanted = 1e9 / (6 * run.n_active)
        assert wanted <= run.tokens < wanted + 4 * 32  # whole steps of 4 x 32 tokens


def test_sweep_file_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of 'tokens'"):
        load_sweep(write_sweep(tmp_path, flops=[1e9]))
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep(tmp_path / "nope.yaml")
    bad = write_sweep(tmp_path, overrides=["moe.top_k=9"])
    with pytest.raises(ConfigError, match="'moe.top_k'"):
        plan(load_sweep(bad))


def test_a_run_stopped_early_is_a_failure_not_a_row(tmp_path, monkeypatch):
    """A signal makes `dist-moe train` save, write summary.json with completed=false and exit 0; its loss is
    not the planned run's, so the sweep must not record it (it once did, for a run stopped at step 1)."""
    from dist_moe.scaling import sweep as sweep_module

    def stopped(cmd, **kwargs):
        (tmp_path / "summary.json").write_text(json.dumps({"step": 1, "max_steps": 8347, "completed": False,
                                                           "tokens": 512, "val_loss": 6.2}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(sweep_module.subprocess, "run", stopped)
    assert sweep_module._train(["tiny"], str(tmp_path)) == {
        "error": "stopped at step 1 of 8347, not recorded (running the sweep again resumes it)"}


SWEEP_FILES = sorted(str(p) for p in (Path(__file__).parents[2] / "configs" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: Path(p).stem)
def test_every_shipped_sweep_file_plans(path):
    """The sweep files docs/scaling.md runs: every run's config is valid, every budget positive, names distinct."""
    runs = plan(load_sweep(path))
    assert runs and all(run.steps >= 1 and run.n_active > 0 for run in runs)
