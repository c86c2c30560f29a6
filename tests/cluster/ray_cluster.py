"""A real Ray head node on 127.0.0.1 for tests: own ports and temp dir, stopped with only what it started."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import requests


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@contextmanager
def ray_head_node(num_cpus: int, path_prefix: str | None = None):
    """`ray start --head --block`; yields the job server URL. Stopped by SIGTERM to the process started here
    (its --block mode then stops that node's Ray processes), never by `ray stop`."""
    temp = Path(tempfile.mkdtemp(prefix="dmray", dir="/tmp"))  # short: Ray's socket paths live under it
    gcs, dashboard, agent, agent_grpc, metrics, runtime_env, client = free_ports(7)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["PATH"] = ":".join(filter(None, [path_prefix, str(Path(sys.executable).parent), env["PATH"]]))
    ray = [sys.executable, "-c", "from ray.scripts.scripts import main; main()"]  # no `ray` script in some venvs
    proc = subprocess.Popen(
        [*ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}", f"--num-cpus={num_cpus}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
         f"--ray-client-server-port={client}", f"--temp-dir={temp / 'ray'}", "--disable-usage-stats"],
        env=env, stdout=open(temp / "ray.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(f"{url}/api/version", timeout=2).status_code in (200, 401):  # 401: token auth on
                    break
            except requests.RequestException:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (temp / "ray.log").read_text()[-3000:]
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        shutil.rmtree(temp, ignore_errors=True)
