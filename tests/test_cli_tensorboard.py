"""`dist-moe tensorboard RUN`: a busy port is one line naming it and --port; stopping the PID it was started as
stops the server (nothing is left listening)."""

import signal
import socket
import subprocess
import sys
import time

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serving(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def tensorboard(run_dir, port: int, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dist_moe.cli", "tensorboard", str(run_dir), "--port", str(port)],
                            text=True, **popen)


def test_busy_port_is_one_line_naming_the_port_and_the_flag(tmp_path):
    (tmp_path / "tb").mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = tensorboard(tmp_path, port, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and out == ""
    assert err.strip().splitlines() == [err.strip()] and f"port {port}" in err and "--port" in err, err


@pytest.mark.slow
def test_sigterm_to_the_started_pid_leaves_nothing_on_the_port(tmp_path):
    (tmp_path / "tb").mkdir()
    port = free_port()
    proc = tensorboard(tmp_path, port, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while not serving(port):
            assert proc.poll() is None and time.time() < deadline, "TensorBoard never served"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        deadline = time.time() + 30
        while serving(port) and time.time() < deadline:
            time.sleep(0.2)
        assert not serving(port)
    finally:
        if proc.poll() is None:
            proc.kill()
