"""The process group the trainer creates outlives the run, so a second run in the same process trains, and
is destroyed at interpreter exit (NCCL warns at exit otherwise); a run that is given a group (Ray Train's)
leaves it alone."""

import atexit
import json
import os
import subprocess
import sys
from pathlib import Path


def driver(overrides: list[str], run_root: str, out_path: str) -> None:
    import torch

    from dist_moe.config import load_config
    from dist_moe.train.loop import run

    seen = {}
    # atexit runs last-registered first: the trainer's destroy (registered during the run) comes before this
    atexit.register(lambda: Path(out_path).write_text(json.dumps(
        {**seen, "group_at_exit": torch.distributed.is_initialized()})))
    run(load_config("tiny", [*overrides, f"run_dir={run_root}/first"]))
    seen["group_after_first_run"] = torch.distributed.is_initialized()
    group = torch.distributed.group.WORLD
    run(load_config("tiny", [*overrides, f"run_dir={run_root}/second"]))  # given the first run's group
    seen["same_group_after_second_run"] = torch.distributed.group.WORLD is group


def test_the_group_outlives_the_run_for_a_second_run_and_is_destroyed_at_exit(tmp_path, cache_dir):
    from cli_runs import SMALL

    overrides = [*SMALL, "train.max_steps=1", "train.eval_every=1", f"data.cache_dir={cache_dir}"]
    result = subprocess.run([sys.executable, __file__, json.dumps(overrides), str(tmp_path),
                             str(tmp_path / "seen.json")], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "seen.json").read_text()) == {
        "group_after_first_run": True, "same_group_after_second_run": True, "group_at_exit": False}
    assert json.loads((tmp_path / "second" / "summary.json").read_text())["completed"]


if __name__ == "__main__":
    driver(json.loads(sys.argv[1]), sys.argv[2], sys.argv[3])
