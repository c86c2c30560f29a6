"""Hangs: a rank stopped inside a collective (SIGSTOP) is named, with its host, and the run exits instead of
waiting forever; its checkpoints stay intact and `dist-moe resume` continues it."""

import json
import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from cli_runs import SMALL, command, dist_moe, losses
from dist_moe.train import checkpoint, heartbeat
from dist_moe.train.heartbeat import HANG_EXIT_CODE, Heartbeat


def read_beat(run_dir, rank):
    try:
        return json.loads((run_dir / "heartbeats" / f"rank{rank}.json").read_text())
    except (OSError, ValueError):
        return None


@pytest.mark.slow
def test_a_stopped_rank_is_named_with_its_host_the_checkpoints_stay_intact_and_resume_continues(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(command("train", *SMALL, "--nproc=2", "moe.ep_size=2", "ckpt.every=2", "ckpt.keep=2",
                                    "train.max_steps=100000", "train.eval_every=1000", "cluster.hang_timeout_s=4",
                                    f"run_dir={run_dir}", cache_dir=cache_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stopped = None
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:  # a checkpoint and a few steps past it
            beat = read_beat(run_dir, 1)
            if beat and beat["step"] >= 5:
                stopped = beat["pid"]
                break
            time.sleep(0.1)
        assert stopped is not None, "rank 1 never reached step 5"
        os.kill(stopped, signal.SIGSTOP)
        t0 = time.time()
        out, err = proc.communicate(timeout=120)
        detected_after = time.time() - t0
    finally:
        if stopped is not None:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(stopped, sig)
                except ProcessLookupError:
                    pass
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == HANG_EXIT_CODE, err[-3000:]
    report = [line for line in err.splitlines() if line.startswith("error: hang:")]
    assert len(report) == 1, err[-3000:]
    assert f"rank 1 ({socket.gethostname()}, pid {stopped}, last heartbeat at step " in report[0]
    assert "rank 0 (" in report[0] and "cluster.hang_timeout_s=4" in report[0] and "dist-moe resume" in report[0]
    assert 4 < detected_after < 60  # the timeout, three beats to confirm the silence, the launcher's stop
    saved = checkpoint.complete_checkpoints(run_dir)
    assert saved and all(checkpoint.verify(path) is None for path in saved)
    latest = int((run_dir / "checkpoints" / "latest").read_text().split("_")[1])
    result = dist_moe("resume", str(run_dir), "--nproc=2", f"train.max_steps={latest + 2}", cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at step {latest}" in result.stdout
    assert sorted(losses(run_dir)) == list(range(1, latest + 3))


@pytest.fixture
def exits(monkeypatch):
    """The watchdog's os._exit, recorded instead of ending the test process (its thread beats on until closed)."""
    codes, called = [], threading.Event()

    def fake_exit(code):
        codes.append(code)
        called.set()

    monkeypatch.setattr(heartbeat.os, "_exit", fake_exit)
    return codes, called


def peer_beat(run_dir, rank, beat, step=3, phase="forward (MoE all-to-all)"):
    (run_dir / "heartbeats").mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "heartbeats" / f".peer{rank}.tmp"
    tmp.write_text(json.dumps(
        {"rank": rank, "host": "node-b", "pid": 4242, "step": step, "phase": phase, "time": 0.0, "beat": beat}))
    os.replace(tmp, run_dir / "heartbeats" / f"rank{rank}.json")


def test_watchdog_names_the_silent_peer_after_the_timeout_and_not_before(tmp_path, exits, capsys):
    codes, called = exits
    peer_beat(tmp_path, 1, beat=7)  # a peer whose counter never moves: stopped
    watchdog = Heartbeat(tmp_path, rank=0, world_size=2, timeout_s=0.4)  # beats every 0.1 s
    watchdog.enter("preparing data", watched=False)
    assert not called.wait(1.5)  # unwatched: no hang however long
    watchdog.enter("backward (all-to-all, gradient reduce)", step=3)
    started = time.monotonic()
    assert called.wait(5)
    assert time.monotonic() - started >= 0.4 + heartbeat.OBSERVED_BEATS * 0.1
    watchdog.close()
    assert set(codes) == {HANG_EXIT_CODE}
    line = capsys.readouterr().err.splitlines()[0]
    assert line.startswith("error: hang: stopped beating: rank 1 (node-b, pid 4242, last heartbeat at step 3 in "
                           "'forward (MoE all-to-all)')")
    assert "rank 0 (" in line and "at step 3 in 'backward (all-to-all, gradient reduce)'" in line
    own = read_beat(tmp_path, 0)
    assert own["pid"] == os.getpid() and own["step"] == 3 and own["beat"] > 5


def test_watchdog_with_every_peer_alive_names_the_one_elsewhere(tmp_path, exits, capsys):
    codes, called = exits
    alive = threading.Event()

    def keep_beating():  # a live peer, blocked in another phase of an earlier step
        count = 0
        while not alive.wait(0.05):
            count += 1
            peer_beat(tmp_path, 1, beat=count, step=2, phase="evaluation")

    peer = threading.Thread(target=keep_beating)
    peer.start()
    watchdog = Heartbeat(tmp_path, rank=0, world_size=2, timeout_s=0.4)
    watchdog.enter("stop check (all-reduce)", step=3)
    try:
        assert called.wait(5)
    finally:
        alive.set()
        peer.join()
        watchdog.close()
    line = capsys.readouterr().err.splitlines()[0]
    assert "every rank is alive; elsewhere: rank 1 (node-b, pid 4242, last heartbeat at step 2 in 'evaluation')" in line
    assert set(codes) == {HANG_EXIT_CODE}
