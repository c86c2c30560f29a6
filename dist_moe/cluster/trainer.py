"""Ray Train: `cluster.num_workers` workers, each running the same worker body `train.loop.run(cfg)`.

Ray Train's TorchConfig creates the torch.distributed process group (gloo on CPU, nccl on GPU) and
DeepSpeed adopts it. Fault tolerance is Ray's restart plus our run dir: every (re)started worker group runs
with resume=auto, so after a worker dies the group restarts from the last complete checkpoint. The run dir
must therefore live on storage all workers share (one machine: any local path).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path

from dist_moe.config import Config, to_yaml

# Ray Train (2.60) patches print() in its workers to log each line as well as write it, and Ray forwards
# both to the driver: every worker line came out twice. Turned off for the workers we start.
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def _worker(loop_config: dict) -> None:
    """No ray.train.report: the run dir holds the results (summary.json), and Ray Train logged each report
    as a TrainingReport(...) dump per rank."""
    from dist_moe.config import from_yaml
    from dist_moe.train.loop import run

    run(from_yaml(loop_config["config_yaml"]))


def init_ray(address: str) -> None:
    """Connect to `address` (or the cluster of the Ray job we run in), or start a local Ray bound to 127.0.0.1."""
    if not sys.stdout.isatty():  # a log file (a submitted job's, nohup's): worker lines without colour codes;
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # the driver reads it as it prints each worker line
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # read at import; its "[repeated Nx]" note is always coloured
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


def train_on_ray(cfg: Config) -> int:
    init_ray(cfg.cluster.address)  # first: it sets what Ray reads when imported
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dist_moe.train.engine import process_group_timeout

    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    resumable = dataclasses.replace(cfg, run_dir=str(run_dir), resume="auto")
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"config_yaml": to_yaml(resumable)},
        torch_config=TorchConfig(backend="nccl" if cfg.cluster.use_gpu else "gloo",
                                 timeout_s=int(process_group_timeout(cfg).total_seconds())),
        scaling_config=ScalingConfig(num_workers=cfg.cluster.num_workers, use_gpu=cfg.cluster.use_gpu),
        run_config=RunConfig(name=run_dir.name, storage_path=str(run_dir / "ray"),
                             failure_config=FailureConfig(max_failures=cfg.cluster.max_failures)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return 0
