"""One-machine multi-process launch (`dist-moe train --nproc N`): N copies of the worker body.

Each worker is `python -m dist_moe.train.launch CONFIG.yaml` with the torch.distributed env:// variables
set; rank 0 prints to the terminal, the others to RUN_DIR/logs/rank{r}.log. If one worker fails, the
others are stopped (at once when it reported a hang); SIGTERM/SIGINT are passed on so that every worker
saves a checkpoint and exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dist_moe.atomic import write_bytes_atomic
from dist_moe.config import Config, to_yaml
from dist_moe.train.engine import free_port
from dist_moe.train.heartbeat import HANG_EXIT_CODE


def launch_local(cfg: Config, nproc: int, debug: bool = False) -> int:
    run_dir = Path(cfg.run_dir)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "launch_config.yaml"
    write_bytes_atomic(config_path, to_yaml(cfg).encode())
    port = free_port()
    procs, logs = [], []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
               "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
        out = None
        if rank > 0:
            out = open(run_dir / "logs" / f"rank{rank}.log", "w")
            logs.append(out)
        cmd = [sys.executable, "-m", "dist_moe.train.launch", str(config_path)] + (["--debug"] if debug else [])
        procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None))

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _wait(procs, run_dir)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for f in logs:
            f.close()


def _wait(procs: list[subprocess.Popen], run_dir: Path) -> int:
    """All exit 0 -> 0. The first failure stops the rest and is returned: after a grace period, or at once after
    a hang report (the rank it names may be stopped, and its peers wait on it)."""
    while True:
        codes = [p.poll() for p in procs]
        failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            rank, code = failed[0]
            deadline = time.time() + (0 if code == HANG_EXIT_CODE else 30)
            while any(p.poll() is None for p in procs) and time.time() < deadline:
                time.sleep(0.5)
            for p in procs:
                if p.poll() is None:
                    p.kill()
            where = "above" if rank == 0 else str(run_dir / "logs" / f"rank{rank}.log")
            print(f"error: rank {rank} exited with code {code} (its log: {where})", file=sys.stderr)
            return code if code > 0 else 1
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.2)


if __name__ == "__main__":
    from dist_moe.config import from_yaml_file
    from dist_moe.errors import run_guarded
    from dist_moe.train.loop import run

    debug = "--debug" in sys.argv
    sys.exit(run_guarded(lambda: run(from_yaml_file(Path(sys.argv[1]))), debug))
