"""`dist-moe status RUN_DIR` tells the story of a run that lost and regained a node: its history from
events.jsonl, each rank's node by IP, and which rows belong to a worker group that is gone."""

import json
import subprocess
import sys
import time

from dist_moe.config import load_config, to_yaml
from dist_moe.train import events


def status(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dist_moe.cli", "status", *args], capture_output=True, text=True,
                          timeout=120, **kwargs)


def write_event(run_dir, when: float, event: str, **fields) -> None:
    with open(run_dir / events.EVENTS_FILE, "a") as out:
        out.write(json.dumps({"time": when, "event": event, **fields}) + "\n")


def write_beat(run_dir, rank: int, ip: str, when: float, step: int, phase: str = "forward (MoE all-to-all)") -> None:
    beat = {"rank": rank, "host": "vm", "ip": ip, "pid": 100 + rank, "step": step, "phase": phase,
            "phase_seconds": 1.0, "time": when, "beat": 5, "closed": False}
    (run_dir / "heartbeats" / f"rank{rank}.json").write_text(json.dumps(beat))


def test_restart_cause_names_the_lost_node_a_resize_a_hang_or_a_dead_worker():
    launch = [{"event": "launch"}]
    first = {"event": "start", "nodes": ["10.0.0.2", "10.0.0.3"]}
    assert events.restart_cause(launch, {"10.0.0.2", "10.0.0.3"}) == "launch"
    assert events.restart_cause(launch + [first], {"10.0.0.2"}) == "node lost (10.0.0.3)"
    assert events.restart_cause(launch + [first], {"10.0.0.2", "10.0.0.3"}) == "worker died"
    assert events.restart_cause(launch + [first, {"event": "resize"}], {"10.0.0.2", "10.0.0.3"}) == "resize"
    assert events.restart_cause(launch + [first, {"event": "hang"}], {"10.0.0.2", "10.0.0.3"}) == "hang"
    assert events.restart_cause(launch + [first] + launch, {"10.0.0.2"}) == "launch"  # a resume's new driver


def test_status_tells_a_shrink_and_marks_the_lost_nodes_rank_as_left(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "heartbeats").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(to_yaml(load_config("tiny", ["train.max_steps=100"])))
    now = time.time()
    write_event(run_dir, now - 300, "launch", workers=2, min_workers=1)
    write_event(run_dir, now - 290, "start", cause="launch", workers=2, of=2, ep_size=2, from_step=0,
                nodes=["10.0.0.2", "10.0.0.3"])
    write_event(run_dir, now - 100, "start", cause="node lost (10.0.0.3)", workers=1, of=2, ep_size=1, from_step=40,
                nodes=["10.0.0.2"])
    write_beat(run_dir, 0, "10.0.0.2", now - 1, 57)
    write_beat(run_dir, 1, "10.0.0.3", now - 130, 44)  # its node died before the restart
    result = status(str(run_dir))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "started (launch): 2 workers of 2, EP 2, from step 0; nodes 10.0.0.2 10.0.0.3" in out
    assert "restarted (node lost (10.0.0.3)): 1 worker of 2, EP 1, from step 40; nodes 10.0.0.2" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()[:1].isdigit() and "ago" in line}
    assert "10.0.0.2" in rows["0"] and "vm" not in rows["0"] and rows["0"].endswith("ago")  # healthy: no state
    assert "10.0.0.3" in rows["1"] and "left: the group restarted with 1" in rows["1"] and "SILENT" not in out

    write_event(run_dir, now - 0.5, "resize")  # rank 0 saved for the grow-back; then its worker is replaced
    write_beat(run_dir, 0, "10.0.0.2", now - 60, 60, phase="checkpoint save")
    assert "restarting (resize)" in status(str(run_dir)).stdout


def test_status_of_a_missing_run_dir_says_so_and_a_closed_pipe_is_quiet(tmp_path):
    missing = status("runs/no_such_run", cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.strip() == (
        "error: run dir 'runs/no_such_run' does not exist (expected a run dir or a Ray job id)")
    run_dir = tmp_path / "big"
    (run_dir / "heartbeats").mkdir(parents=True)
    for rank in range(3000):  # more than a pipe holds
        write_beat(run_dir, rank, "10.0.0.2", time.time(), 1)
    reader = subprocess.Popen(f"{sys.executable} -m dist_moe.cli status {run_dir} | head -1", shell=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = reader.communicate(timeout=120)
    assert out.startswith("run ") and err == ""
