"""`dist-moe dpo` end to end: a new run dir that records its parent, TRL's metric names in TensorBoard, exact
resume, expert parallelism with ZeRO-2, and one-line errors."""

import hashlib
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cli_runs import SMALL, dist_moe, losses, read_metrics

TRL_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected")
DPO = ["train.eval_every=2", "log.every=1", "train.micro_batch_size=4", "dpo.val_fraction=0.25"]


def assert_ok(result):
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])


@pytest.fixture(scope="module")
def base(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("base") / "run"
    assert_ok(dist_moe("train", *SMALL, "train.max_steps=3", "train.eval_every=1000", f"run_dir={run_dir}",
                       cache_dir=cache_dir))
    return run_dir


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    rows = [{"prompt": f"def f{i}(x):\n", "chosen": f"    return x + {i}\n", "rejected": f"    retrun x ++ {i}\n"}
            for i in range(24)]
    path = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def digest(run_dir):
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_dpo_writes_a_new_run_dir_with_trl_metrics_and_resumes_exactly(tmp_path, cache_dir, base, prefs):
    parent_files = digest(base)
    straight, split = tmp_path / "straight", tmp_path / "split"
    result = dist_moe("dpo", str(base), f"data.prefs={prefs}", *DPO, "train.max_steps=4", f"run_dir={straight}",
                      cache_dir=cache_dir)
    assert_ok(result)
    assert digest(base) == parent_files  # the pretraining run is never written to
    config = (straight / "config.yaml").read_text()
    assert f"parent: {base.resolve()}" in config and "step_00000003" in config and "objective: dpo" in config
    rows = read_metrics(straight)
    evals = [r for r in rows if "eval/rewards/accuracies" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for name in TRL_NAMES:  # policy = reference at the start: every reward exactly 0
        assert (evals[0][f"eval/{name}"] == 0.0) == name.startswith("rewards/"), name
    assert evals[-1]["eval/rewards/margins"] > 0 and evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    events = EventAccumulator(str(straight / "tb")).Reload().Tags()["scalars"]
    for name in TRL_NAMES:
        assert f"train/{name}" in events and f"eval/{name}" in events, name
    assert {"train/loss", "train/aux_loss", "train/z_loss"} <= set(events)
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["parent"] == str(base.resolve()) and summary["held_out_pairs"] == 6

    assert_ok(dist_moe("dpo", str(base), f"data.prefs={prefs}", *DPO, "train.max_steps=2", f"run_dir={split}",
                       cache_dir=cache_dir))
    resumed = dist_moe("resume", str(split), "train.max_steps=4", cache_dir=cache_dir)
    assert_ok(resumed)
    assert "at step 2" in resumed.stdout
    for key in ("train/loss", "train/rewards/margins"):  # the reference is rebuilt from the parent on resume
        assert losses(split, key) == losses(straight, key), key


@pytest.mark.slow
def test_dpo_under_expert_parallelism_and_zero2(tmp_path, cache_dir, base, prefs):
    run_dir = tmp_path / "dpo"
    result = dist_moe("dpo", str(base), f"data.prefs={prefs}", *DPO, "train.max_steps=2", "moe.ep_size=2",
                      "train.zero_stage=2", "--nproc=2", f"run_dir={run_dir}", cache_dir=cache_dir)
    assert_ok(result)
    evals = [r for r in read_metrics(run_dir) if "eval/rewards/accuracies" in r]
    assert evals[0]["eval/rewards/margins"] == 0.0 and evals[-1]["eval/rewards/margins"] > 0
    assert evals[0]["eval/logps/chosen"] < 0


@pytest.mark.slow
def test_malformed_row_and_changed_model_are_one_line_errors(tmp_path, cache_dir, base, prefs):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(prefs.read_text() + '{"prompt": "x", "chosen": "y"}\n')
    result = dist_moe("dpo", str(base), f"data.prefs={bad}", f"run_dir={tmp_path / 'a'}", cache_dir=cache_dir)
    assert result.returncode == 2 and result.stderr.strip() == f"error: {bad}:25: missing key(s) rejected (a row " \
                                                               "needs prompt, chosen, rejected)", result.stderr
    result = dist_moe("dpo", str(base), f"data.prefs={prefs}", "model.d_model=96", f"run_dir={tmp_path / 'b'}",
                      cache_dir=cache_dir)
    assert result.returncode == 2 and "model.d_model" in result.stderr and "DPO starts from" in result.stderr
    result = dist_moe("dpo", str(base), f"data.prefs={prefs}", f"run_dir={base}", cache_dir=cache_dir)
    assert result.returncode == 2 and "is the parent run" in result.stderr
