"""`dist-moe resume RUN_DIR` on another number of ranks in one command: an EP=2 run saved on 2 ranks continues in
one process with the global batch kept (micro batch doubled, EP = gcd), prints what it changed, and trains the
same steps on the same data as a resume on 2 ranks."""

import shutil

import pytest

from dist_moe.config import load_config, to_yaml
from tests.train.cli_runs import SMALL, dist_moe, losses


def test_resume_of_an_ep2_run_in_one_process_keeps_the_global_batch_and_the_losses(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    result = dist_moe("train", "--nproc", "2", *SMALL, "moe.ep_size=2", "train.max_steps=2", f"run_dir={run_dir}",
                      cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    shutil.copytree(run_dir, tmp_path / "two")
    two = dist_moe("resume", str(tmp_path / "two"), "--nproc", "2", "train.max_steps=4", cache_dir=cache_dir)
    one = dist_moe("resume", str(run_dir), "train.max_steps=4", cache_dir=cache_dir)
    assert two.returncode == 0 and one.returncode == 0, (two.stderr + one.stderr)[-3000:]
    assert ("resume on 1 rank(s), saved on 2: train.micro_batch_size 8 -> 16, moe.ep_size 2 -> 1 (the global batch "
            "stays 16" in one.stderr) and "resume on" not in two.stderr
    expected, got = losses(tmp_path / "two"), losses(run_dir)
    assert sorted(got) == [1, 2, 3, 4] == sorted(expected)
    for step in (3, 4):
        # same data; the capacity and the micro-batch aux loss see a rank's tokens, so the runs differ a little
        # (1.2e-4 seen); other data would differ by percents
        assert got[step] == pytest.approx(expected[step], rel=1e-3), step
    assert "micro_batch_size: 16" in (run_dir / "config.yaml").read_text()  # the fitted keys persist


def test_resume_that_cannot_keep_the_global_batch_names_the_keys(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    saved = run_dir / "checkpoints" / "step_00000002"
    saved.mkdir(parents=True)
    for rank in range(2):  # saved on 2 ranks with micro batch 8: 16 sequences do not split over 3 ranks
        (saved / f"trainer_rank{rank}.pt").write_bytes(b"")
    (run_dir / "config.yaml").write_text(to_yaml(load_config("tiny", ["train.micro_batch_size=8"])))
    result = dist_moe("resume", str(run_dir), "--nproc", "3", cache_dir=cache_dir)
    assert result.returncode == 2 and "does not split over 3 ranks: set train.micro_batch_size" in result.stderr
