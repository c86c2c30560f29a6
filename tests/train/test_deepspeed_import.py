"""deepspeed meets dist_moe in one place: the model runs without it, and the run imports it only once
engine.init_distributed has set DS_ACCELERATOR for the decided device."""

import os
import subprocess
import sys

PROBE_ENV = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}

MODEL_WITHOUT_DEEPSPEED = """
import sys
sys.modules["deepspeed"] = None  # `import deepspeed` (and any deepspeed.*) now raises ImportError
import torch
from dist_moe.config import load_config
from dist_moe.model.transformer import Transformer
cfg = load_config("tiny", ["model.vocab_size=97", "model.d_model=32", "model.num_layers=2", "model.num_heads=4",
                           "model.num_kv_heads=2", "model.d_ff=48", "moe.num_experts=4", "moe.d_expert=40",
                           "moe.shared_expert=true"])
torch.manual_seed(0)
model = Transformer(cfg)
out = model(torch.randint(0, 97, (2, 9)))
(out.logits.square().mean() + out.aux_loss + out.z_loss).backward()
grads = [p.grad for p in model.parameters()]
assert all(g is not None and torch.isfinite(g).all() for g in grads)
assert any(g.abs().sum() > 0 for g in (model.blocks[1].ffn.experts.w13.grad, model.blocks[1].ffn.experts.w2.grad))
print("ran", sum(b.is_moe for b in model.blocks), "MoE layers")
"""


def test_the_model_builds_and_trains_a_step_with_deepspeed_unimportable():
    result = subprocess.run([sys.executable, "-c", MODEL_WITHOUT_DEEPSPEED], capture_output=True, text=True,
                            env=PROBE_ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[:2] == ["ran", "2"]


DEEPSPEED_AFTER_DEVICE = """
import importlib.abc, os, sys
import torch
torch.cuda.is_available = lambda: True  # a GPU machine, as far as dist_moe can tell

seen = []
class Recorder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "deepspeed" and not seen:
            seen.append(os.environ.get("DS_ACCELERATOR"))
        return None
sys.meta_path.insert(0, Recorder())

import dist_moe.cli, dist_moe.train.loop, dist_moe.train.generate, dist_moe.cluster.trainer  # the run's imports
assert "deepspeed" not in sys.modules and not seen, "imported before the device was decided"
from dist_moe.config import load_config
from dist_moe.train.engine import init_distributed
init_distributed(load_config("tiny", ["train.device=cpu"]))
print(seen)
"""


def test_deepspeed_is_first_imported_by_init_distributed_with_the_cpu_accelerator_set():
    """train.device=cpu on a machine with GPUs: DS_ACCELERATOR=cpu must be set before deepspeed is imported."""
    result = subprocess.run([sys.executable, "-c", DEEPSPEED_AFTER_DEVICE], capture_output=True, text=True,
                            env=PROBE_ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "['cpu']"
