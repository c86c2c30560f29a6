"""`dist-moe generate RUN_DIR`: sample text from a run's newest checkpoint, in one process.

The weights are read from the checkpoint files into the plain model (train/checkpoint_reader.py): no
DeepSpeed engine, optimizer or process group, so a checkpoint saved on any number of ranks and any
moe.ep_size loads here with every expert on this process, in about the time it takes to read the files.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dist_moe.config import ConfigError, from_yaml_file
from dist_moe.data.tokenizer import Tokenizer
from dist_moe.model.transformer import Transformer, generate
from dist_moe.train.checkpoint_reader import read_model_state
from dist_moe.train.engine import pick_device_type


@dataclass
class Sample:
    text: str  # the prompt and its continuation
    new_tokens: int
    load_seconds: float  # reading the config, tokenizer and weights
    sample_seconds: float  # prefill and every new token

    def speed(self) -> str:
        tokens = f"{self.new_tokens} token{'s' if self.new_tokens != 1 else ''}"
        return (f"{tokens} in {self.sample_seconds:.2f} s ({self.new_tokens / self.sample_seconds:.1f} tokens/s) "
                f"after {self.load_seconds:.2f} s loading")


def load_model(run_dir: Path) -> tuple[Transformer, int]:
    """The run's plain model (every expert local) with its newest checkpoint's weights, in eval mode; its step."""
    saved = from_yaml_file(run_dir / "config.yaml")
    cfg = dataclasses.replace(saved, moe=dataclasses.replace(saved.moe, ep_size=1))
    step, state = read_model_state(run_dir)
    model = Transformer(cfg)
    model.load_state_dict(state)
    device = torch.device("cuda" if pick_device_type(cfg) == "cuda" else "cpu")
    return model.to(device).eval(), step


def generate_text(run_dir: str | Path, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: int = 50, seed: int = 0) -> Sample:
    start = time.perf_counter()
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"run dir '{run_dir}' has no config.yaml (is it a dist-moe run dir?)")
    model, _ = load_model(run_dir)
    tokenizer = Tokenizer(run_dir / "tokenizer.model")
    device = model.embed.weight.device
    healed, first_allowed = tokenizer.heal_prompt(prompt)
    ids = torch.tensor([[tokenizer.eos_id, *healed]], device=device)  # EOS: a document starts here
    room = model.cfg.model.max_seq_len - ids.shape[1]
    if room <= 0:
        raise ConfigError(f"prompt of {ids.shape[1]} tokens leaves no room under model.max_seq_len="
                          f"{model.cfg.model.max_seq_len}")
    loaded = time.perf_counter()
    with torch.no_grad():
        out = generate(model, ids, min(max_new_tokens, room), temperature, top_k,
                       generator=torch.Generator(device).manual_seed(seed),
                       first_allowed=torch.tensor(first_allowed, dtype=torch.long, device=device))
    done = time.perf_counter()
    return Sample(tokenizer.decode(out[0, 1:].tolist()), out.shape[1] - ids.shape[1], loaded - start, done - loaded)
