import os

import pytest

# Without a GPU: DeepSpeed picks its accelerator and Triton builds its language helpers at import time,
# so both are told here, before any test module imports them (importing torch imports neither). Under
# TRITON_INTERPRET=1 the Triton kernels run on CPU tensors when a test asks for them; the model itself
# still takes its PyTorch paths on CPU.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Ray >= 2.60 turns token auth on for any cluster started where ~/.ray/auth_token exists, and a local
# ray.init() writes that file: one test's local Ray would change every later test's clusters (and the next
# run's). The test clusters run without it; the netns clusters set their own token explicitly.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One tokenizer/shard cache for every run in the session (the first run builds it)."""
    return tmp_path_factory.mktemp("cache")
