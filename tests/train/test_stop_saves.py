"""Stops save under `dist-moe train --nproc 2` (the parent passes the signal on), and wall-clock checkpoints."""

import re
import signal
import subprocess
import time

import pytest

from cli_runs import SMALL, command, dist_moe
from dist_moe.config import ConfigError, load_config
from dist_moe.train import checkpoint
from dist_moe.train.stop import SaveClock
from stopped_runs import assert_saved_on_stop, logged_steps, wait_for_steps


def test_save_clock_is_due_every_interval_from_the_last_save(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    clock = SaveClock(every_minutes=2)
    now[0] += 119.9
    assert not clock.due()
    now[0] += 0.1
    assert clock.due()
    clock.saved()
    now[0] += 60
    assert not clock.due()
    assert not SaveClock(every_minutes=0).due()  # off


def test_every_minutes_is_on_in_the_gpu_presets_and_off_in_tiny():
    assert load_config("small").ckpt.every_minutes == load_config("medium").ckpt.every_minutes == 30
    assert load_config("tiny").ckpt.every_minutes == 0
    with pytest.raises(ConfigError, match="ckpt.every_minutes"):
        load_config("tiny", ["ckpt.every_minutes=-1"])


@pytest.mark.slow
def test_nproc2_sigterm_to_the_parent_saves_every_rank_and_resume_continues(tmp_path, cache_dir):
    """SIGTERM to the launcher only (as `kill`, systemd or a scheduler sends it): it passes the signal on, both
    ranks save the same step and the launcher exits 0. Wall-clock checkpoints (every 0.6 s here) were agreed on by
    both ranks along the way (a disagreement would leave one rank waiting in the save's barrier)."""
    run_dir = tmp_path / "run"
    args = [*SMALL, "moe.ep_size=2", "train.eval_every=1000", "--nproc=2", "ckpt.every_minutes=0.01"]
    proc = subprocess.Popen(command("train", *args, "train.max_steps=100000", f"run_dir={run_dir}",
                                    cache_dir=cache_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_steps(run_dir, 4, lambda: proc.poll() is None)
        deadline = time.monotonic() + 120
        while not checkpoint.candidates(run_dir):  # a wall-clock save first (fast steps may beat 0.6 s)
            assert proc.poll() is None and time.monotonic() < deadline, "no wall-clock checkpoint"
            time.sleep(0.1)
        signalled_after = len(logged_steps(run_dir))
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert time.monotonic() - start < 60
    step = assert_saved_on_stop(run_dir, signalled_after)
    periodic = [int(s) for s in re.findall(r"checkpoint \S+step_(\d+)\n", out)][:-1]
    assert periodic and all(s < step for s in periodic), out[-3000:]  # wall-clock saves before the stop
    assert f"stop requested: saving step {step} and exiting" in out
    resumed = dist_moe("resume", str(run_dir), f"train.max_steps={step + 2}", "--nproc=2", cache_dir=cache_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {step}" in resumed.stdout
    assert logged_steps(run_dir) == list(range(1, step + 3))
