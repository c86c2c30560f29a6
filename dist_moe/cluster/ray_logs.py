"""Ray's own noise on a healthy run, cut to one line each as the driver prints the workers' logs.

- Ray Train's PlacementGroupCleaner (a detached helper that removes the run's placement group should the
  controller die uncleanly) asks the State API whether the controller lives, without an address: on a machine
  with several Ray clusters (namespace nodes, other users) or a slow GCS the lookup raises something its
  monitor thread does not catch ("Found multiple active Ray instances", "Timed out while waiting for GCS"),
  and the thread dies with a 30-line traceback. Training is unaffected; only that cleanup is lost.
- When a worker group restarts after a node loss, Ray Train first asks for the full group while the dead node
  still counts as alive, and logs WorkerGroupStartupTimeoutError with its traceback before it retries.
Ray Train's PreemptionWatcher (node drains on preemptible clusters; dist_moe does not read it) is turned off
instead, in trainer.py: its actor logged an error-level line at every start.
"""

from __future__ import annotations

import functools
import re

CLEANER = "PlacementGroupCleaner"
STARTUP_TIMEOUT = "WorkerGroupStartupTimeoutError"
_ERROR_LINE = re.compile(r"^[\w.]*(Error|Exception)\b:?")  # the last line of a traceback
_TRACEBACK_LINE = re.compile(r"^(Traceback |Exception in thread |  |\s*\^|The above exception|During handling)")


def filter_lines(data: dict) -> list[str]:
    """The lines of one batch of a Ray process's output worth showing (`data` as Ray's log monitor emits it)."""
    lines = data.get("lines", [])
    text = "\n".join(lines)
    if data.get("actor_name") == CLEANER or "PlacementGroupCleanerMonitor" in text:
        errors = [line for line in lines if _ERROR_LINE.match(line)]
        kept = [line for line in lines if "Cleaning up placement group" in line]  # its one real message
        return kept + [f"Ray Train's placement-group cleaner stopped ({errors[-1][:160]}): Ray's helper; training "
                       "is unaffected (docs/launching.md)"] if errors else kept
    if STARTUP_TIMEOUT in text:
        kept = [line for line in lines if not _TRACEBACK_LINE.match(line) and not _ERROR_LINE.match(line)
                and STARTUP_TIMEOUT not in line]
        return kept + ["Ray Train: the worker group did not start in time (WorkerGroupStartupTimeoutError: a lost "
                       "node may still count as alive); it tries again, on fewer workers with cluster.min_workers"]
    return lines


def quiet_ray_logs() -> None:
    """Put filter_lines in front of the driver's printing of worker logs (after ray.init)."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    for name, handler in list(dispatcher.handlers):
        if name == "ray_print_logs":
            dispatcher.remove_handler(name)
            dispatcher.add_handler(name, functools.partial(_print_filtered, handler))


def _print_filtered(handler, data: dict) -> None:
    lines = filter_lines(data)
    if lines:
        handler({**data, "lines": lines})
