"""`dist-moe status RUN_DIR`: progress and every rank's heartbeat, read from the run dir alone."""

import json
import os
import subprocess
import sys
import time

from dist_moe.config import load_config, to_yaml
from dist_moe.train.heartbeat import SILENT_AFTER_S, Heartbeat


def test_status_of_a_run_dir_names_the_silent_rank_and_the_newest_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(to_yaml(load_config("tiny", ["train.max_steps=40"])))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 5.0}) + "\n" for s in (1, 2, 3)))
    for step in (2, 4):
        (run_dir / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00000006.tmp").mkdir()  # a save cut short: never listed
    live = Heartbeat(run_dir, rank=0, world_size=3, timeout_s=60)
    live.enter("forward (MoE all-to-all)", step=4)
    done = Heartbeat(run_dir, rank=2, world_size=3, timeout_s=60)
    done.close()
    frozen = {"rank": 1, "host": "node-b", "pid": 4242, "step": 3, "phase": "backward (all-to-all, gradient reduce)",
              "phase_seconds": 2.0, "time": time.time() - SILENT_AFTER_S - 30, "beat": 17, "closed": False}
    (run_dir / "heartbeats" / "rank1.json").write_text(json.dumps(frozen))
    try:
        time.sleep(0.5)  # rank 0's thread writes the new phase
        result = subprocess.run([sys.executable, "-m", "dist_moe.cli", "status", str(run_dir)], capture_output=True,
                                text=True, timeout=120)
    finally:
        live.close()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"run {run_dir}: last logged step 3 of 40; newest checkpoint step_00000004 (2 complete)"
    rows = {int(line.split()[0]): line for line in lines[2:]}
    assert sorted(rows) == [0, 1, 2] and "summary.json" not in result.stdout
    assert f"{os.getpid()}" in rows[0] and "forward (MoE all-to-all)" in rows[0]
    assert not rows[0].endswith(("SILENT", "exited"))
    assert "node-b" in rows[1] and "4242" in rows[1] and rows[1].endswith("SILENT")
    assert rows[2].endswith("exited")


def test_status_of_a_folder_that_holds_no_run_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dist_moe.cli", "status", str(tmp_path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == (
        f"error: '{tmp_path}' holds no run (no config.yaml, no heartbeats/; a starting run has them once its ranks "
        "start): expected a run dir or a Ray job id")
