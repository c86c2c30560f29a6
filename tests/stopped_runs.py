"""What a stop must leave in a run dir, whichever launcher got the signal: the step reached saved as a verified
checkpoint that `latest` names, every logged step inside it, and a summary that says the run did not finish."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from dist_moe.train import checkpoint


def logged_steps(run_dir: Path) -> list[int]:
    path = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [row["step"] for row in rows if "train/loss" in row]


def wait_for_steps(run_dir: Path, n: int, alive: Callable[[], bool], timeout: float = 300,
                   log: Callable[[], str] = str) -> None:
    """Until metrics.jsonl has n training steps (the run is past its start-up, mid-training); log: what to show
    when it does not get there."""
    deadline = time.monotonic() + timeout
    while len(logged_steps(run_dir)) < n:
        assert alive(), "the run ended before it was stopped: " + log()[-4000:]
        assert time.monotonic() < deadline, f"no {n} logged steps in {run_dir} after {timeout} s: " + log()[-4000:]
        time.sleep(0.2)


def assert_saved_on_stop(run_dir: Path, signalled_after: int) -> int:
    """The checks every stop test makes; returns the step saved. signalled_after: steps logged before the signal."""
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    step = summary["step"]
    assert summary["completed"] is False and step >= signalled_after > 0, summary
    root = checkpoint.checkpoint_root(run_dir)
    assert (root / "latest").read_text().strip() == f"step_{step:08d}"
    assert checkpoint.verify(root / f"step_{step:08d}") is None
    assert not list(root.glob("*.partial"))
    assert logged_steps(run_dir) == list(range(1, step + 1))  # nothing trained that the checkpoint lacks
    return step
