"""A run's history: RUN_DIR/events.jsonl, one JSON line per thing that changed how the run goes on.

Written where each thing is known: the Ray driver's launch and stop request (cluster/trainer.py), each worker
group's start with its size, EP and the step it resumes from and why it (re)started (rank 0 of the group),
the grow-back save before a resize (GrowBack.wait), a hang the watchdog caught (heartbeat.py). Read by
`dist-moe status RUN_DIR`, which tells the story from it. Appends of one short line each: a reader sees whole
lines, and a lost line (a crash mid-write) costs only the story, never the run. Imports no torch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

EVENTS_FILE = "events.jsonl"


def record(run_dir: str | Path, event: str, **fields) -> None:
    """Append {time, event, **fields}; an unwritable run dir must not stop training."""
    line = json.dumps({"time": time.time(), "event": event, **fields}) + "\n"
    try:
        with open(Path(run_dir) / EVENTS_FILE, "a") as out:
            out.write(line)
    except OSError:
        pass


def read(run_dir: str | Path) -> list[dict]:
    """Every whole event line, oldest first."""
    try:
        lines = (Path(run_dir) / EVENTS_FILE).read_text().splitlines()
    except OSError:
        return []
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except ValueError:
            pass  # a line cut short by a crash
    return events


def restart_cause(events: list[dict], alive_ips: set[str]) -> str:
    """Why a worker group starts, from the events since the driver's last launch: the first group 'launch';
    after a grow-back save 'resize'; after a caught hang 'hang'; when a node that ran the previous group is
    no longer alive 'node lost (IP, ...)'; else 'worker died'."""
    launched = max((i for i, e in enumerate(events) if e["event"] == "launch"), default=-1)
    since = events[launched + 1:]
    starts = [e for e in since if e["event"] == "start"]
    if not starts:
        return "launch"
    after = [e["event"] for e in since[since.index(starts[-1]) + 1:]]
    if "resize" in after:
        return "resize"
    if "hang" in after:
        return "hang"
    lost = sorted(set(starts[-1].get("nodes", [])) - alive_ips)
    return f"node lost ({', '.join(lost)})" if lost else "worker died"


def describe(event: dict) -> str:
    """One line of `dist-moe status`'s history."""
    when = time.strftime("%H:%M:%S", time.localtime(event["time"]))
    kind = event["event"]
    if kind == "launch":
        size = f"{event['min_workers']}-{event['workers']}" if event.get("min_workers") else event["workers"]
        text = f"Ray driver started: {size} workers"
    elif kind == "start":
        worker_count = f"{event['workers']} worker{'s' if event['workers'] != 1 else ''} of {event['of']}"
        text = (f"{'started' if event['cause'] == 'launch' else 'restarted'} ({event['cause']}): {worker_count}, "
                f"EP {event['ep_size']}, from step {event['from_step']}; nodes {' '.join(event.get('nodes', []))}")
    elif kind == "resize":
        text = "room for another worker: saved, Ray Train restarts the group larger"
    elif kind == "hang":
        text = f"hang caught by rank {event['rank']} at step {event['step']}: {event['culprits']}"
    elif kind == "stop":
        text = f"stop requested ({event['signal']}): the workers save the current step and return"
    else:
        text = json.dumps({k: v for k, v in event.items() if k != "time"})
    return f"  {when}  {text}"
