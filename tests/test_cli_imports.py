"""The commands an operator types while a run goes on answer without importing torch or deepspeed (seconds
on a busy machine): `--help`, `status RUN_DIR`, and `logs`/`stop` (these need Ray's client, never torch)."""

import json
import socket
import subprocess
import sys
import time

from dist_moe.config import load_config, to_yaml

PROBE = """
import sys
from dist_moe.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:  # --help
    code = exc.code
print("IMPORTED", sorted(m for m in ("torch", "deepspeed", "ray") if m in sys.modules), code, file=sys.stderr)
"""


def imported(*args: str) -> tuple[list[str], str]:
    """The heavy modules that `dist-moe ARGS` imported, and its output."""
    result = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120)
    line = [row for row in result.stderr.splitlines() if row.startswith("IMPORTED")][-1]
    return eval(line.split(" ", 1)[1].rsplit(" ", 1)[0]), result.stdout + result.stderr


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket closes


def test_status_help_logs_and_stop_import_no_torch_or_deepspeed(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "heartbeats").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(to_yaml(load_config("tiny", [])))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 7}) + "\n")
    (run_dir / "checkpoints" / "step_00000005").mkdir(parents=True)
    (run_dir / "heartbeats" / "rank0.json").write_text(json.dumps(
        {"rank": 0, "host": "h", "pid": 1, "step": 7, "phase": "forward", "time": time.time(), "beat": 1}))
    modules, output = imported("status", str(run_dir))
    assert modules == [] and "last logged step 7" in output and "step_00000005" in output, output
    for args in (["--help"], ["train", "--help"], ["status", "--help"]):
        assert imported(*args)[0] == [], args
    address = f"http://127.0.0.1:{closed_port()}"
    for command in ("logs", "stop"):
        modules, output = imported(command, "--address", address, "raysubmit_x")
        assert "torch" not in modules and "deepspeed" not in modules and "cannot reach" in output, output
