"""The user-facing error convention: a known mistake is one line on stderr and exit code 2; a traceback
only with --debug. Every entry point (the CLI, each worker process) runs through `run_guarded`.

A known mistake is a `UserError`: each domain's error (ConfigError, DataError, JobError, AnalysisError,
ScalingDataError) subclasses it in its own module, so this module imports nothing of dist_moe. CheckpointError
is defined here because both train/checkpoint.py and train/portable_optimizer.py raise it.
"""

from __future__ import annotations

import sys
import traceback
from typing import Any, Callable


class UserError(Exception):
    """A mistake the user can fix, said in one line that names the key, file or value and what was expected."""


class CheckpointError(UserError, RuntimeError):
    """No usable checkpoint where one was expected, or one that cannot be read; the message names the path."""


USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError)  # a missing path is the user's to fix too


def run_guarded(fn: Callable[[], Any], debug: bool = False) -> int:
    """Run fn; return its int result (or 0), 2 for a user error, 1 for anything else."""
    try:
        result = fn()
        return result if isinstance(result, int) else 0
    except USER_ERRORS as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        if type(exc).__name__ == "OutOfMemoryError":  # torch's, without importing torch here
            print(f"error: {out_of_memory_advice(exc)}", file=sys.stderr)
            return 1
        print(f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 1


def out_of_memory_advice(exc: BaseException) -> str:
    """torch's first two sentences (what and how much), then what to change: the global batch stays the same."""
    what = ". ".join(str(exc).split(". ")[:2]).rstrip(".")
    return (f"{what}. Lower train.micro_batch_size and raise train.grad_accum_steps by the same factor (the "
            "global batch, and so the run, stays the same), or spread the model over more GPUs (moe.ep_size, "
            "train.zero_stage=2)")
