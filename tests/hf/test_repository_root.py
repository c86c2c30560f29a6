"""Where a user runs `python -c ...`, a notebook or a bench script, the repository root is first on sys.path:
its kernels/ folder must not stand in for the Hugging Face `kernels` package transformers imports, and the
project's kernels still import as dist_moe.kernels."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import dist_moe.kernels.expert_gemm, dist_moe.kernels.flash_attention
import torch
from transformers import (MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig,
                          Qwen3MoeForCausalLM)
shape = dict(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
             intermediate_size=24, num_experts_per_tok=2)
models = [MixtralForCausalLM(MixtralConfig(**shape, num_local_experts=2)),
          Qwen2MoeForCausalLM(Qwen2MoeConfig(**shape, num_experts=2, moe_intermediate_size=8)),
          Qwen3MoeForCausalLM(Qwen3MoeConfig(**shape, num_experts=2, moe_intermediate_size=8))]
for model in models:
    assert model(torch.zeros(1, 3, dtype=torch.long)).logits.shape == (1, 3, 32)
import kernels
print(kernels.__file__)
"""


def test_transformers_moe_classes_load_from_the_repository_root():
    pytest.importorskip("transformers")
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return  # no installed `kernels`: transformers does not import one
    assert Path(done.stdout.strip()).parent.resolve() != ROOT / "kernels"  # the installed package, not our folder
