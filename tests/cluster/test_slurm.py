"""launch/slurm's sbatch script on a real one-node SLURM cluster (slurm_cluster.py): a TERM to the batch shell,
as `scancel --batch --signal=TERM` or the script's `--signal=B:TERM@360` before the time limit sends it, has the
run save the step it reached before Ray is torn down."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ray_cluster import free_ports
from slurm_cluster import slurm_cluster
from stopped_runs import assert_saved_on_stop, logged_steps, wait_for_steps

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "launch" / "slurm" / "dist_moe.sbatch"
SMALL = ["data.max_corpus_mb=2", "data.tokenizer_sample_mb=1", "data.vocab_size=512", "data.seq_len=64",
         "model.d_model=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.d_ff=128",
         "moe.num_experts=4", "moe.d_expert=128", "train.micro_batch_size=8", "log.every=1",
         "cluster.num_workers=2", "moe.ep_size=2"]


@pytest.fixture(scope="module")
def slurm():
    with slurm_cluster(cpus=os.cpu_count() or 2, kill_wait_s=30) as env:
        yield env


def job_state(env: dict, job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    found = re.search(r"JobState=(\S+).*?ExitCode=(\S+)", out, re.S)
    return f"{found.group(1)} {found.group(2)}" if found else "GONE"


def test_scancel_batch_term_saves_the_current_step_before_ray_goes_and_resume_continues(slurm, tmp_path, cache_dir):
    run_dir, cache, out = tmp_path / "run", cache_dir, tmp_path / "job.out"
    env = dict(slurm, PATH=f"{Path(sys.executable).parent}:{slurm['PATH']}", DIST_MOE_HEAD_IP="127.0.0.1",
               DIST_MOE_RAY_PORT=str(free_ports(1)[0]))
    submitted = subprocess.run(
        ["sbatch", "--nodes=1", "--gpus-per-node=0", f"--output={out}", f"--chdir={tmp_path}", str(SBATCH), "tiny",
         *SMALL, "train.max_steps=100000", "cluster.stop_timeout_s=90", f"run_dir={run_dir}",
         f"data.cache_dir={cache}"], env=env, capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.split()[-1]
    job_log = lambda: out.read_text() if out.exists() else ""  # noqa: E731
    wait_for_steps(run_dir, 3, lambda: job_state(env, job_id).startswith(("PENDING", "RUNNING")), timeout=400,
                   log=job_log)
    signalled_after = len(logged_steps(run_dir))
    start = time.monotonic()
    assert subprocess.run(["scancel", "--batch", "--signal=TERM", job_id], env=env).returncode == 0
    while job_state(env, job_id).startswith("RUNNING"):
        assert time.monotonic() - start < 150, job_log()[-4000:]
        time.sleep(1)
    assert job_state(env, job_id) == "COMPLETED 0:0", job_log()[-4000:]  # the run's exit status: it saved
    log = job_log()
    assert log.index("SIGTERM: the workers save") < log.index("tearing down Ray")
    step = assert_saved_on_stop(run_dir, signalled_after)
    resumed = subprocess.run([sys.executable, "-m", "dist_moe.cli", "resume", str(run_dir), "cluster=local",
                              "--nproc=2", f"train.max_steps={step + 2}"], capture_output=True, text=True, cwd=tmp_path)
    assert resumed.returncode == 0 and f"at step {step}" in resumed.stdout, resumed.stderr[-3000:]
    assert logged_steps(run_dir) == list(range(1, step + 3))
