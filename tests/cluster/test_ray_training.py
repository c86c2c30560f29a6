"""The real distributed path under Ray: a 2-worker job through `dist-moe submit`, a worker killed mid-run, and
stops that save: `dist-moe stop` of a submitted job, Ctrl-C on a local Ray run."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ray_cluster import ray_head_node
from stopped_runs import assert_saved_on_stop, logged_steps, wait_for_steps

pytestmark = pytest.mark.slow

SMALL = ["data.max_corpus_mb=2", "data.tokenizer_sample_mb=1", "data.vocab_size=512", "data.seq_len=64",
         "model.d_model=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.d_ff=128",
         "moe.num_experts=4", "moe.d_expert=128", "train.micro_batch_size=8", "log.every=1",
         "cluster.num_workers=2", "moe.ep_size=2", "train.zero_stage=2"]


@pytest.fixture(scope="module")
def ray_head():
    with ray_head_node(num_cpus=2) as url:
        yield url


def dist_moe(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    return subprocess.run([sys.executable, "-m", "dist_moe.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def test_two_worker_job_through_submit_trains_checkpoints_and_logs(ray_head, tmp_path, cache_dir):
    run_dir, cache = tmp_path / "run", cache_dir
    result = dist_moe("submit", "--address", ray_head, *SMALL, "train.max_steps=6", f"run_dir={run_dir}",
                      f"data.cache_dir={cache}", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    job_id = re.search(r"submitted job (\S+)", result.stdout).group(1)
    assert f"uploading working dir {tmp_path} (without git-ignored files" in result.stdout
    assert not re.search(r"INFO (packaging|dashboard_sdk)", result.stderr), result.stderr[-2000:]  # Ray's steps: off
    assert "2 rank(s)" in result.stdout and "EP=2" in result.stdout
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert logged_steps(run_dir) == list(range(1, 7))
    status = dist_moe("status", "--address", ray_head, job_id, cwd=tmp_path)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout
    logs = dist_moe("logs", "--address", ray_head, job_id, cwd=tmp_path)
    assert logs.returncode == 0 and logs.stdout.count("step      6/6") == 1  # each worker line once
    assert "\x1b[" not in logs.stdout and "TrainingReport" not in logs.stdout  # a log file: no colours, no dumps


def test_killed_worker_restarts_from_the_last_checkpoint_without_gaps(ray_head, tmp_path, cache_dir):
    run_dir, cache = tmp_path / "run", cache_dir
    steps = 16
    result = dist_moe("submit", "--address", ray_head, "--no-wait", *SMALL, f"train.max_steps={steps}",
                      "ckpt.every=3", "cluster.max_failures=2", f"run_dir={run_dir}", f"data.cache_dir={cache}",
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    job_id = re.search(r"submitted job (\S+)", result.stdout).group(1)
    deadline = time.time() + 400
    while time.time() < deadline:  # wait for a checkpoint and a few steps past it
        if (run_dir / "metrics.jsonl").exists() and len(logged_steps(run_dir)) >= 5:
            break
        time.sleep(0.5)
    workers = [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
    assert len(workers) == 2, [w.info["cmdline"] for w in workers]
    os.kill(workers[-1].pid, signal.SIGKILL)
    while time.time() < deadline:
        status = dist_moe("status", "--address", ray_head, job_id, cwd=tmp_path).stdout
        if any(word in status for word in ("SUCCEEDED", "FAILED", "STOPPED")):
            break
        time.sleep(2)
    assert "SUCCEEDED" in status, dist_moe("logs", "--address", ray_head, job_id, cwd=tmp_path).stdout[-4000:]
    assert logged_steps(run_dir) == list(range(1, steps + 1))  # no step missing or repeated
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == steps and summary["completed"]
    logs = dist_moe("logs", "--address", ray_head, job_id, cwd=tmp_path).stdout
    assert "resumed from" in logs
    story = dist_moe("status", str(run_dir), cwd=tmp_path).stdout  # the run dir's history tells the restart
    resumed = int(re.search(r"resumed from \S+ at step (\d+)", logs).group(1))
    assert "started (launch): 2 workers of 2, EP 2, from step 0" in story, story
    assert f"restarted (worker died): 2 workers of 2, EP 2, from step {resumed}" in story, story


def test_stopped_worker_is_named_and_the_group_restarts_from_the_last_checkpoint(ray_head, tmp_path, cache_dir):
    """SIGSTOP one Ray Train worker mid-run: a peer's watchdog names it (rank, host) and exits, Ray Train restarts
    the group, which resumes from the last checkpoint and finishes with every step logged once."""
    run_dir, cache = tmp_path / "run", cache_dir
    steps = 14
    result = dist_moe("submit", "--address", ray_head, "--no-wait", *SMALL, f"train.max_steps={steps}",
                      "ckpt.every=3", "cluster.max_failures=1", "cluster.hang_timeout_s=4", f"run_dir={run_dir}",
                      f"data.cache_dir={cache}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    job_id = re.search(r"submitted job (\S+)", result.stdout).group(1)
    stopped, deadline = None, time.time() + 400
    try:
        while time.time() < deadline and stopped is None:  # a checkpoint and a step past it
            try:
                beat = json.loads((run_dir / "heartbeats" / "rank1.json").read_text())
            except (OSError, ValueError):
                beat = None
            if beat and beat["step"] >= 5:
                stopped = beat["pid"]
            time.sleep(0.1)
        assert stopped is not None, "rank 1 never reached step 5"
        os.kill(stopped, signal.SIGSTOP)
        while time.time() < deadline:
            status = dist_moe("status", "--address", ray_head, job_id, cwd=tmp_path).stdout
            if any(word in status for word in ("SUCCEEDED", "FAILED", "STOPPED")):
                break
            time.sleep(2)
    finally:
        if stopped is not None:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(stopped, sig)
                except ProcessLookupError:
                    pass
    logs = dist_moe("logs", "--address", ray_head, job_id, cwd=tmp_path).stdout
    assert "SUCCEEDED" in status, logs[-4000:]
    assert f"error: hang: stopped beating: rank 1 ({socket.gethostname()}, pid {stopped}, last heartbeat" in logs
    assert "resumed from" in logs
    assert logged_steps(run_dir) == list(range(1, steps + 1))  # no step missing or repeated
    assert json.loads((run_dir / "summary.json").read_text())["completed"]
    story = dist_moe("status", str(run_dir), cwd=tmp_path).stdout
    assert "hang caught by rank 0" in story and "restarted (hang): 2 workers of 2" in story, story


def test_dist_moe_stop_saves_the_current_step_and_the_run_resumes(ray_head, tmp_path, cache_dir):
    """`dist-moe stop`: Ray Jobs sends SIGTERM to the driver, which has the workers save the step they are at;
    the job ends STOPPED well within Ray's stop timeout (submit sets it to cluster.stop_timeout_s + 30 s, so
    the driver is not SIGKILLed mid-save: it cleaned up its stop file), and the run resumes from that step."""
    run_dir, cache = tmp_path / "run", cache_dir
    result = dist_moe("submit", "--address", ray_head, "--no-wait", *SMALL, "train.max_steps=100000",
                      "cluster.stop_timeout_s=90", f"run_dir={run_dir}", f"data.cache_dir={cache}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    job_id = re.search(r"submitted job (\S+)", result.stdout).group(1)
    wait_for_steps(run_dir, 3, lambda: any(state in dist_moe("status", "--address", ray_head, job_id, cwd=tmp_path).stdout
                                           for state in ("PENDING", "RUNNING")), timeout=400)  # not ended
    signalled_after = len(logged_steps(run_dir))
    start = time.monotonic()
    assert dist_moe("stop", "--address", ray_head, job_id, cwd=tmp_path).returncode == 0
    while "STOPPED" not in dist_moe("status", "--address", ray_head, job_id, cwd=tmp_path).stdout:
        assert time.monotonic() - start < 120, "the job did not stop within its stop timeout"
        time.sleep(1)
    logs = dist_moe("logs", "--address", ray_head, job_id, cwd=tmp_path).stdout
    step = assert_saved_on_stop(run_dir, signalled_after)
    assert "SIGTERM: the workers save the current step" in logs and f"saving step {step} and exiting" in logs
    assert not (run_dir / "STOP").exists()  # the driver exited on its own, after the save
    resumed = dist_moe("resume", str(run_dir), f"train.max_steps={step + 2}", "cluster=local", "--nproc=2",
                       cwd=tmp_path)
    assert resumed.returncode == 0 and f"at step {step}" in resumed.stdout, resumed.stderr[-3000:]
    assert logged_steps(run_dir) == list(range(1, step + 3))


def test_ctrl_c_on_a_local_ray_run_saves_on_both_workers_and_resume_continues(tmp_path, cache_dir):
    """`dist-moe train cluster=ray` (its own local Ray) and Ctrl-C, i.e. SIGINT to its whole process group:
    Ray Train's own handler would abort the workers without a save; ours has them save and the driver exits 0."""
    run_dir, cache = tmp_path / "run", cache_dir
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    proc = subprocess.Popen([sys.executable, "-m", "dist_moe.cli", "train", *SMALL, "cluster=ray",
                             "train.max_steps=100000", "cluster.stop_timeout_s=90", f"run_dir={run_dir}", f"data.cache_dir={cache}"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_for_steps(run_dir, 3, lambda: proc.poll() is None, timeout=400)
        signalled_after = len(logged_steps(run_dir))
        start = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out[-4000:]
    assert time.monotonic() - start < 90
    assert "Gracefully aborting" not in out
    step = assert_saved_on_stop(run_dir, signalled_after)
    resumed = dist_moe("resume", str(run_dir), f"train.max_steps={step + 2}", "cluster=local", "--nproc=2",
                       cwd=tmp_path)
    assert resumed.returncode == 0 and f"at step {step}" in resumed.stdout, resumed.stderr[-3000:]
    assert logged_steps(run_dir) == list(range(1, step + 3))
