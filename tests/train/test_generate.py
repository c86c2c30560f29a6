"""`dist-moe generate` reads the weights without an engine: the plain model it builds from an EP=2 checkpoint
holds exactly the parameters DeepSpeed's engine loads from it, and sampling imports no deepspeed."""

import subprocess
import sys

import pytest
import torch

from dist_moe.train.checkpoint_reader import read_model_state
from tests.train.cli_runs import SMALL, dist_moe

ENGINE_LOAD = """
import dataclasses, sys, torch
from dist_moe.config import from_yaml_file
from dist_moe.model.transformer import Transformer
from dist_moe.train import checkpoint
from dist_moe.train.engine import build_engine, init_distributed
run_dir, out = sys.argv[1], sys.argv[2]
saved = from_yaml_file(run_dir + "/config.yaml")
cfg = dataclasses.replace(saved, moe=dataclasses.replace(saved.moe, ep_size=1),
                          train=dataclasses.replace(saved.train, zero_stage=0))
engine = build_engine(cfg, Transformer(cfg), init_distributed(cfg))
path = checkpoint.candidates(run_dir)[0]
engine.load_checkpoint(str(path.parent), tag=path.name, load_module_only=True)
torch.save({name: p.detach() for name, p in engine.module.named_parameters()}, out)
"""

SAMPLE_WITHOUT_DEEPSPEED = """
import sys
from dist_moe.train.generate import generate_text
sample = generate_text(sys.argv[1], "def main():", 8, temperature=0)
import torch
assert "deepspeed" not in sys.modules and not torch.distributed.is_initialized()
print(sample.new_tokens)
"""


@pytest.fixture(scope="module")
def ep2_run(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("generate") / "run"
    result = dist_moe("train", "--nproc", "2", *SMALL, "moe.ep_size=2", "train.max_steps=2", f"run_dir={run_dir}",
                      cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_reader_gives_the_parameters_the_engine_loads_from_an_ep2_checkpoint(ep2_run, tmp_path):
    out = tmp_path / "engine.pt"
    result = subprocess.run([sys.executable, "-c", ENGINE_LOAD, str(ep2_run), str(out)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    engine_params = torch.load(out, weights_only=True)
    step, state = read_model_state(ep2_run)
    assert step == 2
    assert set(engine_params) <= set(state) and any("experts.w13" in k for k in engine_params)
    for name, param in engine_params.items():
        assert torch.equal(state[name], param), name


def test_generate_prints_the_sample_on_stdout_and_its_speed_on_stderr(ep2_run):
    result = subprocess.run([sys.executable, "-m", "dist_moe.cli", "generate", str(ep2_run), "--prompt",
                             "def main():", "--max-new-tokens", "6", "--temperature", "0"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("def main():") and "tokens/s" in result.stderr and "tokens/s" not in result.stdout
    probe = subprocess.run([sys.executable, "-c", SAMPLE_WITHOUT_DEEPSPEED, str(ep2_run)], capture_output=True,
                           text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert probe.stdout.split() == ["8"]
