"""Ray Train: `cluster.num_workers` workers, each running the same worker body `train.loop.run(cfg)`.

Ray Train's TorchConfig creates the torch.distributed process group (gloo on CPU, nccl on GPU) and
DeepSpeed adopts it. Fault tolerance is Ray's restart plus our run dir: every (re)started worker group runs
with resume=auto, so after a worker dies the group restarts from the last complete checkpoint. The run dir
must therefore live on storage all workers share (one machine: any local path).

Stopping: SIGTERM/SIGINT to the driver (Ctrl-C, `dist-moe stop`, a launcher passing the signal on) create
RUN_DIR/STOP; the workers see it at the next step boundary, save that step and return, and the driver exits
0 once they have, or 1 after cluster.stop_timeout_s. A second signal stops at once without waiting.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from dist_moe.cluster.ray_logs import quiet_ray_logs
from dist_moe.config import ClusterConfig, Config, to_yaml
from dist_moe.train import events

# Ray Train (2.60) patches print() in its workers to log each line as well as write it, and Ray forwards
# both to the driver: every worker line came out twice. Turned off for the workers we start.
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
STOP_FILE = "STOP"  # in the run dir: asks the workers to save the current step and return
# Ray Train (2.60) counts the nodes it can resize onto through Ray Data's AutoscalingCoordinator, which re-reads
# the cluster every 20 s (its TICK_INTERVAL_S): a node that came back can take that long to count.
RAY_TRAIN_NODE_VIEW_LAG_S = 20.0


def _worker(loop_config: dict) -> None:
    """No ray.train.report: the run dir holds the results (summary.json), and Ray Train logged each report
    as a TrainingReport(...) dump per rank."""
    import ray
    import ray.train

    from dist_moe.config import fit_to_workers, from_yaml
    from dist_moe.train.loop import run

    cfg = from_yaml(loop_config["config_yaml"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    print(f"rank {rank} of {world_size} on node {ray.util.get_node_ip_address()}", flush=True)
    fitted = fit_to_workers(cfg, world_size)
    if fitted is not cfg and rank == 0:
        print(f"elastic: {world_size} of {cfg.cluster.num_workers} workers; micro batch "
              f"{cfg.train.micro_batch_size} -> {fitted.train.micro_batch_size}, "
              f"EP {cfg.moe.ep_size} -> {fitted.moe.ep_size}", flush=True)
    record_start(cfg, fitted, rank, world_size)
    grow = None
    if cfg.cluster.min_workers:
        grow = GrowBack(cfg.cluster, world_size, ray.available_resources, cfg.run_dir)
    run(fitted, grow, stop_file=Path(loop_config["stop_file"]))


def record_start(cfg: Config, fitted: Config, rank: int, world_size: int) -> None:
    """The worker group's start in RUN_DIR/events.jsonl (written by rank 0): why it (re)started, its size, EP,
    the step it resumes from and its nodes' IPs (gathered from every rank over Ray Train's process group)."""
    import ray
    import torch

    from dist_moe.train.checkpoint_reader import candidates, checkpoint_step

    ips: list = [None] * world_size
    torch.distributed.all_gather_object(ips, ray.util.get_node_ip_address())
    if rank != 0:
        return
    alive = {node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]}
    found = candidates(Path(cfg.run_dir))
    events.record(cfg.run_dir, "start", cause=events.restart_cause(events.read(cfg.run_dir), alive),
                  workers=world_size, of=cfg.cluster.num_workers, ep_size=fitted.moe.ep_size,
                  from_step=checkpoint_step(found[0]) if found else 0, nodes=sorted(set(ips)))


class GrowBack:
    """Elastic runs below cluster.num_workers: rank 0 asks Ray whether room for one more worker (a free CPU,
    or GPU with cluster.use_gpu: what Ray Train gives each worker) has appeared, all ranks agree, and the loop
    saves before Ray Train's resize (checked every cluster.resize_check_s) kills the group; the group
    restarts larger from that checkpoint, so no step is lost."""

    def __init__(self, cluster: ClusterConfig, world_size: int, available_resources: Callable[[], dict],
                 run_dir: str):
        self.available_resources = available_resources  # ray.available_resources
        self.interval_s = cluster.resize_check_s
        self.can_grow = world_size < cluster.num_workers
        self.run_dir, self.is_main = run_dir, False
        self.resource = "GPU" if cluster.use_gpu else "CPU"
        self.next_check = 0.0

    def pending(self, ctx) -> bool:
        import torch

        if not self.can_grow:
            return False
        self.is_main = ctx.is_main
        room = (ctx.is_main and time.monotonic() >= self.next_check
                and self.available_resources().get(self.resource, 0) >= 1)
        flag = torch.tensor([int(room)], device=ctx.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def wait(self) -> None:
        """Ray Train resizes at its first check once it counts the node, which lags (RAY_TRAIN_NODE_VIEW_LAG_S);
        if it has not after that lag and two checks (the room went to something else), train on and look
        again after another two checks."""
        if self.is_main:
            events.record(self.run_dir, "resize")
        time.sleep(RAY_TRAIN_NODE_VIEW_LAG_S + 2 * self.interval_s)
        self.next_check = time.monotonic() + 2 * self.interval_s


def init_ray(address: str) -> None:
    """Connect to `address` (or the cluster of the Ray job we run in), or start a local Ray bound to 127.0.0.1."""
    if not sys.stdout.isatty():  # a log file (a submitted job's, nohup's): worker lines without colour codes;
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # the driver reads it as it prints each worker line
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # read at import; its "[repeated Nx]" note is always coloured
    # Ray Train's node-drain watcher (preemptible clusters; we never read it) logged an error line at every start;
    # the driver passes this on to Ray Train's controller
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    import ray

    if ray.is_initialized():
        return
    quiet = logging.WARNING  # not its "Connected to Ray cluster. View the dashboard at <coloured URL>" line
    if address:
        ray.init(address=address, runtime_env={"env_vars": WORKER_ENV}, logging_level=quiet)
    elif "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:  # inside a Ray job (its runtime_env sets WORKER_ENV):
        ray.init(logging_level=quiet)  # RAY_ADDRESS names the job's cluster
    else:
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
                 num_cpus=os.cpu_count(), runtime_env={"env_vars": WORKER_ENV}, logging_level=quiet)
    quiet_ray_logs()


def scaling_config(cfg: Config):
    """Fixed size, or elastic between cluster.min_workers and num_workers (Ray Train V2: after a failure the
    group restarts on the workers the cluster can place now; every resize_check_s it grows if it can)."""
    from ray.train import ScalingConfig

    c = cfg.cluster
    return ScalingConfig(num_workers=(c.min_workers, c.num_workers) if c.min_workers else c.num_workers,
                         use_gpu=c.use_gpu, elastic_resize_monitor_interval_s=c.resize_check_s)


def train_on_ray(cfg: Config) -> int:
    init_ray(cfg.cluster.address)  # first: it sets what Ray reads when imported
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dist_moe.train.engine import process_group_timeout

    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    resumable = dataclasses.replace(cfg, run_dir=str(run_dir), resume="auto")
    stop_file = run_dir / STOP_FILE
    stop_file.unlink(missing_ok=True)  # left by a driver that was killed before it could clean up
    events.record(run_dir, "launch", workers=cfg.cluster.num_workers, min_workers=cfg.cluster.min_workers)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"config_yaml": to_yaml(resumable), "stop_file": str(stop_file)},
        torch_config=TorchConfig(backend="nccl" if cfg.cluster.use_gpu else "gloo",
                                 timeout_s=int(process_group_timeout(cfg).total_seconds())),
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(name=run_dir.name, storage_path=str(run_dir / "ray"),
                             failure_config=FailureConfig(max_failures=cfg.cluster.max_failures)),
    )
    try:
        result = _fit_until_stopped(trainer, stop_file, cfg.cluster.stop_timeout_s)
    finally:
        stop_file.unlink(missing_ok=True)
    if result is None:
        print(f"error: the workers did not save within cluster.stop_timeout_s={cfg.cluster.stop_timeout_s}; "
              f"stopping them: the run continues from {run_dir / 'checkpoints'}", file=sys.stderr)
        return 1
    if result.error is not None:
        raise result.error
    return 0


def request_stop(run_dir: str, timeout_s: float) -> bool:
    """Kubernetes' preStop hook (launch/k8s): when this pod runs part of a run (a Ray Train worker, or the driver
    of run_dir), create RUN_DIR/STOP and wait, at most timeout_s, until the driver removes it after the save;
    only then does the kubelet send SIGTERM, which stops Ray at once. False when there was nothing to stop here."""
    import psutil

    def running_here() -> bool:
        return any("RayTrainWorker" in line or "dist-moe train" in line and f"run_dir={run_dir}" in line
                   for line in (" ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])))

    if not running_here():
        return False
    stop_file = Path(run_dir) / STOP_FILE
    stop_file.write_text("preStop\n")
    deadline = time.monotonic() + timeout_s
    while stop_file.exists() and running_here() and time.monotonic() < deadline:
        time.sleep(1)
    return True


def _fit_until_stopped(trainer, stop_file: Path, timeout_s: float):
    """trainer.fit() in a helper thread, so that SIGTERM/SIGINT reach the handler here (Ray Train's own, which
    it installs only in the main thread, aborts the workers on SIGINT without a save). The first signal
    creates stop_file and waits; a second raises KeyboardInterrupt. None if the stop took over timeout_s."""
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # re-raised in the main thread
            outcome["error"] = exc

    stop_requested_at = None

    def on_signal(signum, frame) -> None:
        nonlocal stop_requested_at
        if stop_requested_at is not None:
            raise KeyboardInterrupt
        stop_requested_at = time.monotonic()
        stop_file.write_text(f"{signal.Signals(signum).name}\n")
        events.record(stop_file.parent, "stop", signal=signal.Signals(signum).name)
        print(f"{signal.Signals(signum).name}: the workers save the current step and stop (up to {timeout_s:g} s; "
              "a second signal stops at once, without saving)", file=sys.stderr, flush=True)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    try:
        thread.start()
        while thread.is_alive():
            thread.join(0.5)
            if stop_requested_at is not None and time.monotonic() - stop_requested_at > timeout_s:
                return None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
