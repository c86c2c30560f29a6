"""dist_moe.accelerator: DeepSpeed is told its accelerator before the model imports it."""

import os
import subprocess
import sys

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback is what is told")
def test_importing_the_moe_layer_without_cuda_selects_the_cpu_accelerator_without_a_warning():
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    probe = ("import os, dist_moe.model.moe.layer; from deepspeed.accelerator import get_accelerator; "
             "print(os.environ['DS_ACCELERATOR'], get_accelerator().device_name())")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["cpu", "cpu"]
    assert "unable to detect" not in result.stdout + result.stderr


def test_a_user_choice_of_accelerator_wins():
    env = {**os.environ, "DS_ACCELERATOR": "user-choice"}
    probe = "import os, dist_moe.model; print(os.environ['DS_ACCELERATOR'])"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "user-choice", result.stderr[-2000:]
