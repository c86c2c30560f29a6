"""Heartbeats and the hang watchdog: a rank stopped inside a collective is named instead of waited on forever.

Each rank runs one background thread that rewrites RUN_DIR/heartbeats/rank{r}.json (rank, host, pid, step,
phase, seconds in that phase, time, a beat counter) every few seconds and soon after the phase changes, at
most every MIN_GAP_S. The training loop only sets the step and the phase (attribute writes and an event, no
I/O, nothing on the GPU). A rank stopped inside a collective (SIGSTOP, a
wedged device, a dead link) blocks its peers in that collective, whose threads keep beating while its own is
stopped with it. When a rank has spent cluster.hang_timeout_s in one phase, its watchdog reads every rank's
heartbeat, watches them for three more beats, names the ranks whose counter did not move (or that are in
another step or phase), prints one line and exits the process with HANG_EXIT_CODE. The launcher then stops
the other ranks; under Ray, Ray Train restarts the worker group from the last checkpoint.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from dist_moe.train import events

HANG_EXIT_CODE = 3
OBSERVED_BEATS = 3  # beat periods a peer's counter must stand still, after the timeout, to count as stopped
MIN_GAP_S = 0.25  # between two writes: a few per step at most
MAX_INTERVAL_S = 5.0  # between two beats of a live rank, at most (plus MIN_GAP_S)
SILENT_AFTER_S = OBSERVED_BEATS * (MAX_INTERVAL_S + MIN_GAP_S)  # `dist-moe status`: no beat for this long


class Heartbeat:
    def __init__(self, run_dir: Path, rank: int, world_size: int, timeout_s: float):
        self.dir = Path(run_dir) / "heartbeats"
        self.run_dir, self.rank, self.world_size, self.timeout_s = Path(run_dir), rank, world_size, timeout_s
        self.interval = min(MAX_INTERVAL_S, timeout_s / 4)
        self.host, self.ip, self.pid = socket.gethostname(), node_ip(), os.getpid()
        self.step, self.phase, self.since, self.watched = 0, "starting", time.monotonic(), False
        self.beats, self.closed = 0, False
        self.dir.mkdir(parents=True, exist_ok=True)
        self._stopped, self._changed = threading.Event(), threading.Event()
        self._write()
        self._thread = threading.Thread(target=self._beat, name="dist_moe-heartbeat", daemon=True)
        self._thread.start()

    def enter(self, phase: str, step: int | None = None, watched: bool = True) -> None:
        """The loop is now in `phase` (of `step`). Unwatched phases (data preparation, where the other ranks
        wait on rank 0 for as long as tokenizing takes) never count as a hang."""
        self.since, self.phase, self.watched = time.monotonic(), phase, watched  # since first: never a stale start
        if step is not None:
            self.step = step
        self._changed.set()

    def close(self) -> None:
        self._stopped.set()
        self._changed.set()
        self._thread.join()
        self.closed = True  # the rank left the training loop (done, stopped, or an error raised in self.phase)
        self._write()

    def _path(self, rank: int) -> Path:
        return self.dir / f"rank{rank}.json"

    def _write(self) -> None:
        beat = {"rank": self.rank, "host": self.host, "ip": self.ip, "pid": self.pid, "step": self.step,
                "phase": self.phase, "phase_seconds": round(time.monotonic() - self.since, 1), "time": time.time(),
                "beat": self.beats, "closed": self.closed}
        tmp = self.dir / f".rank{self.rank}.json.tmp"
        try:  # rename, not fsync: a reader sees a whole file; a beat lost to a crash costs nothing
            tmp.write_text(json.dumps(beat) + "\n")
            os.replace(tmp, self._path(self.rank))
        except OSError:
            pass  # a full or vanished disk must not stop training; the peers then see this rank as silent

    def _read_all(self) -> list[dict | None]:
        beats = []
        for rank in range(self.world_size):
            try:
                beats.append(json.loads(self._path(rank).read_text()))
            except (OSError, ValueError):
                beats.append(None)
        return beats

    def _beat(self) -> None:
        observed = None  # (when, every rank's heartbeat) once this phase passed the timeout
        while not self._stopped.is_set():
            self._changed.wait(self.interval)
            self._changed.clear()
            self.beats += 1
            self._write()
            now = time.monotonic()
            if not (self.watched and now - self.since > self.timeout_s):
                observed = None
            elif observed is None:
                observed = now, self._read_all()
            elif now - observed[0] >= OBSERVED_BEATS * (self.interval + MIN_GAP_S):  # the longest between beats
                self._exit_hung(observed[1], self._read_all())
            self._stopped.wait(MIN_GAP_S)

    def _exit_hung(self, before: list[dict | None], after: list[dict | None]) -> None:
        events.record(self.run_dir, "hang", rank=self.rank, step=self.step, culprits=culprits(self, before, after))
        print(f"error: {hang_report(self, before, after)}", file=sys.stderr, flush=True)
        os._exit(HANG_EXIT_CODE)  # the main thread is blocked in the collective: nothing else can end it


def node_ip() -> str:
    """This node's address on the path to MASTER_ADDR (the process group's rendezvous, set by every launcher):
    on a cluster the node's own IP, where host names may all read alike. No packet is sent (UDP connect)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((os.environ.get("MASTER_ADDR", "127.0.0.1"), 1))
            return probe.getsockname()[0]
        except OSError:
            return "?"


def culprits(me: Heartbeat, before: list[dict | None], after: list[dict | None]) -> str:
    """Which ranks stopped beating (host, pid, step, phase), or where the live ones are."""
    def where(beat: dict) -> str:
        return (f"rank {beat['rank']} ({beat['host']}, pid {beat['pid']}, last heartbeat at step {beat['step']} "
                f"in '{beat['phase']}')")

    peers = [r for r in range(me.world_size) if r != me.rank]
    silent = [r for r in peers if after[r] is None or before[r] is None or after[r]["beat"] == before[r]["beat"]]
    if silent:
        return "stopped beating: " + "; ".join(
            where(after[r] or before[r]) if (after[r] or before[r]) else f"rank {r} (no heartbeat file)"
            for r in silent)
    elsewhere = [after[r] for r in peers if (after[r]["step"], after[r]["phase"]) != (me.step, me.phase)]
    return ("every rank is alive; elsewhere: " + "; ".join(where(b) for b in elsewhere) if elsewhere else
            "every rank is alive and in the same phase (a phase slower than the timeout?)")


def hang_report(me: Heartbeat, before: list[dict | None], after: list[dict | None]) -> str:
    """One line: which ranks stopped, where this rank waited, how to continue."""
    return (f"hang: {culprits(me, before, after)}; rank {me.rank} ({me.host}) waited "
            f"{time.monotonic() - me.since:.0f} s at step {me.step} in '{me.phase}' (cluster.hang_timeout_s="
            f"{me.timeout_s:g}); heartbeats in {me.dir}; the checkpoints are intact: continue with "
            f"`dist-moe resume {me.run_dir}`")
