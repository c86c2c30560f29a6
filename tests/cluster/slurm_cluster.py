"""A one-node SLURM cluster for tests (Debian's slurm-wlm and munge): munged, slurmctld and slurmd as root,
keys, state, spool and logs in a temp dir, stopped with only what was started here."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

PACKAGES = ["slurm-wlm", "munge"]


def ensure_installed() -> None:
    """Install the packages when missing (CI's script installs them first); skip with the reason when not possible."""
    if all(shutil.which(tool) for tool in ("munged", "slurmctld", "slurmd", "sbatch")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"SLURM is not installed and cannot be here (needs root and apt-get for {' '.join(PACKAGES)})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            pytest.skip(f"`{' '.join(cmd)}` failed: {result.stderr.strip().splitlines()[-1:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLURM_CONF = """ClusterName=dmtest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={dir}/munge.socket
CredType=cred/munge
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
KillWait={kill_wait}
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName={host} NodeHostname={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

CGROUP_CONF = "CgroupPlugin=cgroup/v1\nIgnoreSystemd=yes\nCgroupAutomount=no\n"


def _start(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


@contextmanager
def slurm_cluster(cpus: int, kill_wait_s: int):
    """Yields the environment (SLURM_CONF) under which sbatch/squeue/scancel talk to this cluster."""
    ensure_installed()
    folder = Path(tempfile.mkdtemp(prefix="dmslurm", dir="/tmp"))
    host = socket.gethostname()
    for sub in ("state", "spool"):
        (folder / sub).mkdir()
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = folder / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=host, dir=folder, cpus=cpus, kill_wait=kill_wait_s,
                                      ctld_port=_free_port(), slurmd_port=_free_port()))
    (folder / "cgroup.conf").write_text(CGROUP_CONF)
    env = dict(os.environ, SLURM_CONF=str(conf))
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    daemons: list[subprocess.Popen] = []
    try:
        daemons.append(_start(["munged", "-F", "--force", f"--socket={folder}/munge.socket", f"--key-file={key}",
                               f"--pid-file={folder}/munged.pid", f"--log-file={folder}/munged.log",
                               f"--seed-file={folder}/munged.seed"], folder / "munged.out", env))
        _wait(lambda: (folder / "munge.socket").exists(), daemons, folder, "munged's socket")
        daemons.append(_start(["slurmctld", "-D", "-i", "-f", str(conf)], folder / "slurmctld.out", env))
        daemons.append(_start(["slurmd", "-D", "-N", host, "-f", str(conf)], folder / "slurmd.out", env))
        _wait(lambda: "idle" in subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True,
                                               text=True).stdout, daemons, folder, "an idle node in sinfo")
        yield env
    finally:
        subprocess.run(["scancel", "--full", "--signal=KILL", "--partition=debug"], env=env, capture_output=True)
        for proc in reversed(daemons):
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


def _wait(ready, daemons: list[subprocess.Popen], folder: Path, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        logs = "\n".join(f"{p.name}: {p.read_text()[-1500:]}" for p in sorted(folder.glob("*.out")) + sorted(folder.glob("*.log")))
        assert all(d.poll() is None for d in daemons), f"a SLURM daemon exited while waiting for {what}:\n{logs}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s:\n{logs}"
        time.sleep(0.5)
