"""Scalars to TensorBoard (RUN_DIR/tb) and to RUN_DIR/metrics.jsonl, written by rank 0 only.

Both continue at the step training continues from (0 for a fresh start, s after resuming from step s):
TensorBoard's `purge_step` hides events after it from earlier attempts, and metrics.jsonl drops its lines
after it, so curves have no duplicated or missing points even when an attempt died before its first
checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from dist_moe.atomic import write_bytes_atomic


class Metrics:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True, start_step: int = 0):
        self.enabled = enabled
        self.writer = None
        self.jsonl_path = Path(run_dir) / "metrics.jsonl"
        if not enabled:
            return
        _truncate_jsonl(self.jsonl_path, start_step)  # rows of an earlier attempt past where we continue
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_step + 1)
        self.jsonl = open(self.jsonl_path, "a", buffering=1)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """One row: {'step': step, **scalars}; tags keep their slash-separated TensorBoard names."""
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items() if v is not None and math.isfinite(float(v))}
        if self.writer is not None:
            for tag, value in clean.items():
                self.writer.add_scalar(tag, value, step)
        self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")

    @property
    def tensorboard(self):
        """The SummaryWriter (or None), for components that log histograms, images and layouts."""
        return self.writer

    def close(self) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            self.writer.close()
        self.jsonl.close()


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep rows up to and including last_step (the rows the checkpoint we resume from has seen)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (ValueError, KeyError):
            continue  # a line torn by a kill mid-write
    write_bytes_atomic(path, "".join(line + "\n" for line in kept).encode())
