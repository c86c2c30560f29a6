"""A CPU start compiles no C++: DeepSpeed's shared-memory all-reduce op (built in ~/.cache/torch_extensions at
every start, 25-100 s) is never loaded, and the gloo group it would have served still reduces."""

import os
import subprocess
import sys

START = """
import torch
from dist_moe.config import load_config
from dist_moe.train.engine import init_distributed
init_distributed(load_config("tiny", ["train.device=cpu"]))
flag = torch.ones(3)
torch.distributed.all_reduce(flag)
import deepspeed.comm, deepspeed.comm.comm
deepspeed.comm.inference_all_reduce(flag)  # the one call the op served: falls back to torch.distributed
print(flag.tolist(), deepspeed.comm.comm.cdb.shm_comm_op)
"""


def test_two_starts_build_no_torch_extension(tmp_path):
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"), "DS_ACCELERATOR": "cpu"}
    for _ in range(2):  # the first start as well as the second: nothing to build, so nothing to cache either
        result = subprocess.run([sys.executable, "-c", START], capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.split("\n")[-2] == "[1.0, 1.0, 1.0] None"
        built = list((tmp_path / "extensions").rglob("*")) if (tmp_path / "extensions").exists() else []
        assert built == [], f"a start wrote into TORCH_EXTENSIONS_DIR: {built[:5]}"
