"""`dist-moe status RUN_DIR`: where a run is, read from its run dir alone (no cluster address needed): the last
logged step, the newest complete checkpoint, how it ended if it did, and every rank's heartbeat, so that a user
can see which rank stalled and where without waiting for the hang watchdog."""

from __future__ import annotations

import json
import time
from pathlib import Path

from dist_moe.config import ConfigError, from_yaml_file
from dist_moe.train import events
from dist_moe.train.checkpoint_reader import complete_checkpoints
from dist_moe.train.heartbeat import SILENT_AFTER_S


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_logged_step(run_dir: Path) -> int | None:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None
    steps = []
    for line in lines[-50:]:  # the tail; a line being appended may be cut short
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            pass
    return max(steps) if steps else None


def rank_state(beat: dict, age: float, latest: dict | None) -> str:
    """'exited' (it left the training loop), 'left' (the group restarted without its rank), 'restarting' (its
    group is being replaced), 'SILENT' (no beat for SILENT_AFTER_S: stopped, frozen or gone), else ''."""
    if beat.get("closed"):
        return "exited"
    if latest and latest["event"] == "start" and beat["time"] < latest["time"]:
        if beat["rank"] >= latest["workers"]:
            return f"left: the group restarted with {latest['workers']} at {_clock(latest['time'])}"
        return "restarting (its new worker has not beaten yet)"
    if latest and latest["event"] in ("resize", "hang") and age > SILENT_AFTER_S:
        return f"restarting ({latest['event']})"
    return "SILENT" if age > SILENT_AFTER_S else ""


def _clock(when: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(when))


def rank_rows(run_dir: Path, now: float, latest: dict | None = None) -> list[str]:
    """One line per rank heartbeat file: rank, node (IP, and host name where the hosts differ), pid, step, phase,
    time in that phase, age of the beat and its state (rank_state; `latest` is the run's newest event)."""
    beats = sorted((beat for path in (run_dir / "heartbeats").glob("rank*.json") if (beat := _json(path))),
                   key=lambda b: b["rank"])
    named = len({beat["host"] for beat in beats}) > 1
    rows = [f"{'rank':>4}  {'node':<24} {'pid':>7} {'step':>7}  {'phase':<38} {'in phase':>9} {'last beat':>10}"]
    for beat in beats:
        age = now - beat["time"]
        node = beat.get("ip") or beat["host"]
        node = f"{node} ({beat['host']})" if named and "ip" in beat else node
        rows.append(f"{beat['rank']:>4}  {node[:24]:<24} {beat['pid']:>7} {beat['step']:>7}  "
                    f"{beat['phase'][:38]:<38} {beat.get('phase_seconds', 0):>8.0f}s {age:>8.0f}s ago  "
                    f"{rank_state(beat, age, latest)}".rstrip())
    return rows


def run_status(run_dir: Path) -> str:
    """What the run dir says about the run now, as lines for the terminal."""
    if not (run_dir / "config.yaml").is_file() and not (run_dir / "heartbeats").is_dir():
        raise ConfigError(f"'{run_dir}' holds no run (no config.yaml, no heartbeats/; a starting run has them once "
                          "its ranks start): expected a run dir or a Ray job id")
    try:
        max_steps = from_yaml_file(run_dir / "config.yaml").train.max_steps
    except (OSError, ConfigError):
        max_steps = "?"
    step = _last_logged_step(run_dir)
    complete = complete_checkpoints(run_dir)
    lines = [f"run {run_dir}: last logged step {step if step is not None else '-'} of {max_steps}; newest "
             f"checkpoint {complete[-1].name if complete else '-'} ({len(complete)} complete)"]
    summary = _json(run_dir / "summary.json")
    if summary:
        ended = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((run_dir / "summary.json").stat().st_mtime))
        how = "completed" if summary.get("completed") else "stopped early"
        lines.append(f"summary.json: step {summary.get('step')}, {how} (written {ended}; a resumed run rewrites it)")
    history = events.read(run_dir)
    if history:
        lines += [f"history ({run_dir / events.EVENTS_FILE}):", *map(events.describe, history)]
    changes = [e for e in history if e["event"] in ("start", "resize", "hang")]
    rows = rank_rows(run_dir, time.time(), changes[-1] if changes else None)
    lines += rows if len(rows) > 1 else ["no heartbeats yet (RUN_DIR/heartbeats/ appears when the ranks start)"]
    return "\n".join(lines)
