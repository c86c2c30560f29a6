"""When the loop stops early or saves between its step-based checkpoints: a stop request (a signal, or the
Ray driver's stop file) and the wall-clock save interval. Ranks agree on both at every step boundary, so all
of them save the same step and leave the loop together.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import torch


class StopRequest:
    """SIGTERM/SIGINT (preemption, Ctrl-C, a launcher passing the signal on) set a flag; so does `stop_file`
    appearing, which is how a Ray driver reaches its workers (Ray Train runs them outside the main thread,
    where no signal handler can be installed, and does not pass signals on)."""

    def __init__(self, stop_file: Path | None = None):
        self.signalled = False
        self.stop_file = stop_file
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (Ray Train workers): the stop file is the only way in
                pass

    def _handler(self, signum, frame):
        self.signalled = True

    @property
    def requested(self) -> bool:
        return self.signalled or (self.stop_file is not None and self.stop_file.exists())


class SaveClock:
    """Due once `every_minutes` of wall clock have passed since the run started or last saved (0 = never)."""

    def __init__(self, every_minutes: float):
        self.every_s = every_minutes * 60
        self.last = time.monotonic()

    def due(self) -> bool:
        return self.every_s > 0 and time.monotonic() - self.last >= self.every_s

    def saved(self) -> None:
        self.last = time.monotonic()


def any_rank(ctx, *flags: bool) -> list[bool]:
    """Each flag is true on every rank if it is true on any (ctx: the run's DistContext); one small MAX
    all-reduce per call."""
    if ctx.world_size == 1:
        return list(flags)
    agreed = torch.tensor([int(f) for f in flags], device=ctx.device)
    torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
    return [bool(f) for f in agreed.tolist()]
