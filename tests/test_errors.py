"""The error convention of dist_moe.errors.run_guarded: user mistakes are one line and exit code 2, a CUDA
out-of-memory is one line that says what to change, anything else names its type and points at --debug."""

import pytest
import torch

from dist_moe.config import ConfigError
from dist_moe.errors import run_guarded

TORCH_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.11 GiB of which "
             "1.06 GiB is free. Of the allocated memory 75.2 GiB is allocated by PyTorch, and 1.1 GiB is reserved "
             "by PyTorch but unallocated.")


def fail_with(exc: BaseException):
    def fn():
        raise exc
    return fn


def test_each_failure_is_one_line_with_its_exit_code(capsys):
    assert run_guarded(fail_with(ConfigError("config key 'train.lr' = 'x': expected a float"))) == 2
    assert capsys.readouterr().err == "error: config key 'train.lr' = 'x': expected a float\n"

    assert run_guarded(fail_with(torch.OutOfMemoryError(TORCH_OOM))) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("error: CUDA out of memory. Tried to allocate 2.00 GiB. Lower train.micro_batch_size")
    assert "train.grad_accum_steps" in err and "79.11" not in err

    assert run_guarded(fail_with(ValueError("bad"))) == 1
    assert capsys.readouterr().err == "error: ValueError: bad (run with --debug for the traceback)\n"
    assert run_guarded(lambda: 3) == 3


def test_debug_re_raises_what_is_not_a_user_error():
    with pytest.raises(torch.OutOfMemoryError):
        run_guarded(fail_with(torch.OutOfMemoryError(TORCH_OOM)), debug=True)
