"""A multi-node Ray cluster on one machine: each "node" is a Linux network namespace with its own address.

The nodes' veths meet on a bridge in a namespace of its own, on a random private /24 (10.x.y.0) that exists
only inside these namespaces: nothing outside the machine is reachable from them, and another run's cluster
(its own names and subnet) cannot collide with this one. Node 0 runs the Ray head (GCS, dashboard and job
server; no CPUs, so training workers land on the other nodes), nodes 1.. run Ray worker nodes with their own
CPUs. Every Ray process sees its node's veth as `eth0` (GLOO_SOCKET_IFNAME=eth0), so gloo talks over the
veth addresses. A node dies the way a machine does: SIGKILL to every process in its namespace.

Needs root and `ip netns`. As a script (a person trying multi-node by hand, see docs/launching.md):
    sudo .venv/bin/python tests/cluster/netns_cluster.py --nodes 3
starts the cluster, prints how to submit to it, and tears it down on Ctrl-C.
"""

from __future__ import annotations

import argparse
import atexit
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

GCS_PORT, DASHBOARD_PORT = 6379, 8265  # each node has its own network stack: the defaults cannot clash
STARTED = "Ray runtime started."  # `ray start` prints it once the node has registered with the GCS


def netns_unavailable() -> str | None:
    """Why this machine cannot host the cluster, or None."""
    if os.geteuid() != 0:
        return "needs root (ip netns add)"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    probe = f"dmprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def _ip(*args: str, netns: str | None = None) -> None:
    command = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip()}")


class NetnsCluster:
    """`num_nodes` namespaces (node 0: the head) on a bridge; `start()`, then `close()` (always: it is also
    registered with atexit). Ray processes of node i are the processes of namespace `names[i]`."""

    def __init__(self, num_nodes: int, cpus_per_node: int = 1, path_prefix: str | None = None):
        assert num_nodes >= 2
        suffix = uuid.uuid4().hex[:6]
        self.names = [f"dmnode{i}-{suffix}" for i in range(num_nodes)]
        self.bridge_ns = f"dmbr-{suffix}"
        self.suffix = suffix
        subnet = f"10.{random.randint(1, 254)}.{random.randint(1, 254)}"
        self.ips = [f"{subnet}.{i + 1}" for i in range(num_nodes)]
        self.cpus_per_node = cpus_per_node
        self.temp = Path(tempfile.mkdtemp(prefix=f"dmnet{suffix}", dir="/tmp"))  # short: Ray's socket paths
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_"))}
        bindir = str(Path(sys.executable).parent)
        self.env["PATH"] = ":".join(filter(None, [path_prefix, bindir, self.env["PATH"]]))
        # Ray's token auth, with a token of this cluster's own (a ~/.ray/auth_token would turn it on anyway)
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex, GLOO_SOCKET_IFNAME="eth0", RAY_DEDUP_LOGS="0",
                        RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="5",
                        # after a node loss Ray Train first asks for the full group while the dead node still
                        # counts as alive, and waits this long (60 s by default) before trying fewer workers
                        RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="30")
        self.ray = [sys.executable, "-c", "from ray.scripts.scripts import main; main()"]  # `ray`, this venv's
        self.procs: dict[int, subprocess.Popen] = {}
        self._made: list[str] = []
        atexit.register(self.close)

    @property
    def address(self) -> str:
        """The job server URL, reachable only from inside the namespaces (see `exec`)."""
        return f"http://{self.ips[0]}:{DASHBOARD_PORT}"

    def start(self, timeout_s: float = 180) -> "NetnsCluster":
        self._make_network()
        self.wait_for(self._start_node(0), timeout_s, "the head")
        self.wait_for(self._dashboard_up, timeout_s, "the head's job server")
        for i in range(1, len(self.names)):  # one at a time: raylets starting together on 2 cores time out
            self.wait_for(self._start_node(i), timeout_s, f"node {i} to join")
        return self

    def _make_network(self) -> None:
        _ip("netns", "add", self.bridge_ns)
        self._made.append(self.bridge_ns)
        _ip("link", "add", "br0", "type", "bridge", netns=self.bridge_ns)
        _ip("link", "set", "br0", "up", netns=self.bridge_ns)
        for i, (name, ip) in enumerate(zip(self.names, self.ips)):
            _ip("netns", "add", name)
            self._made.append(name)
            # Both ends are created inside the node's namespace: no interface ever appears on the host.
            _ip("link", "add", "eth0", "type", "veth", "peer", "name", f"n{i}", netns=name)
            _ip("link", "set", f"n{i}", "netns", self.bridge_ns, netns=name)
            _ip("link", "set", f"n{i}", "master", "br0", "up", netns=self.bridge_ns)
            _ip("addr", "add", f"{ip}/24", "dev", "eth0", netns=name)
            _ip("link", "set", "eth0", "up", netns=name)
            _ip("link", "set", "lo", "up", netns=name)

    def _start_node(self, i: int):
        """Start node i's Ray; returns a check for "it has joined the cluster" (the line `ray start` prints)."""
        log_path = self.temp / f"node{i}.log"
        started_before = log_path.read_text().count(STARTED) if log_path.exists() else 0
        # Each node its own Ray temp dir, as on separate machines. Without one a node takes the head's, and
        # the nodes share runtime_resources/: each node's runtime-env agent, on first meeting a job's
        # working_dir, deletes and unpacks it again there, under the driver running in it on the head.
        # A restarted node gets a fresh one, or its log monitor would replay its dead workers' lines.
        temp_dir = self.temp / f"ray{i}" if not started_before else self.temp / f"ray{i}.{started_before}"
        common = ["--block", f"--node-ip-address={self.ips[i]}", "--disable-usage-stats",
                  "--object-store-memory=100000000", f"--temp-dir={temp_dir}"]
        if i == 0:
            args = ["--head", f"--port={GCS_PORT}", "--num-cpus=0", "--include-dashboard=true",
                    f"--dashboard-host={self.ips[0]}", f"--dashboard-port={DASHBOARD_PORT}"]
        else:
            args = [f"--address={self.ips[0]}:{GCS_PORT}", f"--num-cpus={self.cpus_per_node}"]
        self.procs[i] = subprocess.Popen(["ip", "netns", "exec", self.names[i], *self.ray, "start", *args, *common],
                                         env=self.env, stdout=open(log_path, "a"), stderr=subprocess.STDOUT,
                                         start_new_session=True)
        return lambda: log_path.read_text().count(STARTED) > started_before

    def restart_node(self, node: int, timeout_s: float = 180) -> None:
        """A killed node comes back: its Ray starts again and joins the cluster as a new node."""
        assert node != 0 and node not in self.procs, "restart a worker node after kill_node"
        self.wait_for(self._start_node(node), timeout_s, f"node {node} to rejoin")

    def exec(self, command: list[str], node: int = 0, **kwargs) -> subprocess.CompletedProcess:
        """Run `command` inside node `node`'s namespace (where the cluster's addresses are reachable)."""
        return subprocess.run(["ip", "netns", "exec", self.names[node], *command], env=self.env, **kwargs)

    def popen(self, command: list[str], node: int = 0, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.names[node], *command], env=self.env, **kwargs)

    def _dashboard_up(self) -> bool:
        script = ("import sys, urllib.request, urllib.error\ntry: urllib.request.urlopen(sys.argv[1], timeout=3)\n"
                  "except urllib.error.HTTPError as e: sys.exit(e.code != 401)")  # 401: token auth is on
        return self.exec([sys.executable, "-c", script, f"{self.address}/api/version"],
                         capture_output=True).returncode == 0

    def alive_nodes(self) -> int:
        """Nodes the head's GCS counts as alive (asked from inside the head namespace)."""
        script = ("import ray; ray.init(address='auto', logging_level='ERROR'); "
                  "print(sum(n['Alive'] for n in ray.nodes()))")
        env_address = {"RAY_ADDRESS": f"{self.ips[0]}:{GCS_PORT}"}
        done = subprocess.run(["ip", "netns", "exec", self.names[0], sys.executable, "-c", script],
                              env={**self.env, **env_address}, capture_output=True, text=True, timeout=120)
        lines = done.stdout.strip().splitlines()
        return int(lines[-1]) if done.returncode == 0 and lines and lines[-1].isdigit() else -1

    def pids(self, node: int) -> list[int]:
        done = subprocess.run(["ip", "netns", "pids", self.names[node]], capture_output=True, text=True)
        return [int(p) for p in done.stdout.split()]

    def kill_node(self, node: int) -> None:
        """Power loss on one node: SIGKILL every process in its namespace (raylet, its workers, all)."""
        for _ in range(5):  # a process may fork while we kill
            pids = self.pids(node)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        if node in self.procs:
            self.procs.pop(node).wait()

    def wait_for(self, condition, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs.values()):
                raise TimeoutError(f"netns cluster: waited {timeout_s:.0f} s for {what}; logs in {self.temp}:\n"
                                   + self.logs()[-3000:])
            time.sleep(1)

    def logs(self) -> str:
        return "".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in sorted(self.temp.glob("node*.log")))

    def close(self) -> None:
        """Kill every process in the namespaces (workers first, head last), then delete the namespaces (their
        veths and bridge go with them) and the temp dir. Safe to call twice."""
        for node in reversed(range(len(self.names))):
            if self.names[node] in self._made:
                self.kill_node(node)
        for name in reversed(self._made):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)
        self._made.clear()
        shutil.rmtree(self.temp, ignore_errors=True)


def walkthrough(cluster: NetnsCluster, cpus_per_node: int) -> str:
    """The lines an operator runs against this cluster, runnable as printed: inside a namespace PATH may not
    hold this venv, so the commands are this interpreter's own scripts, by absolute path."""
    bindir = Path(sys.executable).absolute().parent
    head, last = cluster.names[0], len(cluster.names) - 1
    exports = " ".join(f"{k}={v}" for k, v in sorted(cluster.env.items()) if k != "PATH" and os.environ.get(k) != v)
    return "\n".join([
        f"{len(cluster.names)} nodes up: head {head} at {cluster.ips[0]}, workers "
        + ", ".join(f"{n} at {ip}" for n, ip in zip(cluster.names[1:], cluster.ips[1:])),
        "in another root shell, this cluster's environment first:",
        f"  export {exports}",
        "submit from the head's namespace (the cluster's addresses exist only there):",
        f"  ip netns exec {head} {bindir}/dist-moe submit --no-wait --address {cluster.address} tiny "
        "run_dir=/tmp/run3 cluster.num_workers=2 moe.ep_size=2 cluster.min_workers=1 "
        "ckpt.every=20",
        f"  ip netns exec {head} {bindir}/dist-moe logs --follow --address {cluster.address} JOB_ID",
        f"  {bindir}/dist-moe status /tmp/run3",
        f"kill a node:  ip netns pids {cluster.names[last]} | xargs kill -9",
        "bring it back (a Ray temp dir of its own, see docs/launching.md):",
        f"  ip netns exec {cluster.names[last]} {bindir}/ray start --address {cluster.ips[0]}:{GCS_PORT} "
        f"--node-ip-address {cluster.ips[last]} --num-cpus {cpus_per_node} --temp-dir {cluster.temp}/ray{last}.1",
        f"stop the job:  ip netns exec {head} {bindir}/dist-moe stop --address {cluster.address} JOB_ID",
        "Ctrl-C tears everything down.",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3, help="namespaces, the head included")
    parser.add_argument("--cpus-per-node", type=int, default=1, help="Ray CPUs on each worker node")
    args = parser.parse_args()
    reason = netns_unavailable()
    if reason:
        sys.exit(f"netns cluster: {reason}")
    cluster = NetnsCluster(args.nodes, args.cpus_per_node).start()
    print(walkthrough(cluster, args.cpus_per_node), flush=True)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        cluster.close()


if __name__ == "__main__":
    main()
