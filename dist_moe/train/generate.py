"""`dist-moe generate RUN_DIR`: sample text from a run's newest checkpoint, in one process.

The checkpoint is loaded through the DeepSpeed engine (weights only), so one saved on any number of ranks
and any moe.ep_size loads here with every expert on this process.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from dist_moe.config import ConfigError, from_yaml_file
from dist_moe.data import Tokenizer, load_prepared
from dist_moe.model.transformer import Transformer, generate
from dist_moe.train import checkpoint
from dist_moe.train.engine import build_engine, init_distributed


def generate_text(run_dir: str | Path, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: int = 50, seed: int = 0) -> str:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"run dir '{run_dir}' has no config.yaml (is it a dist-moe run dir?)")
    saved = from_yaml_file(run_dir / "config.yaml")
    cfg = dataclasses.replace(saved, moe=dataclasses.replace(saved.moe, ep_size=1),
                              train=dataclasses.replace(saved.train, zero_stage=0))
    candidates = checkpoint.candidates(run_dir)
    if not candidates:
        raise checkpoint.CheckpointError(f"{checkpoint.checkpoint_root(run_dir)}: no checkpoint to sample from")
    ctx = init_distributed(cfg)
    tokenizer = Tokenizer(load_prepared(run_dir).tokenizer_path)
    model = Transformer(cfg)
    engine = build_engine(cfg, model, ctx)
    checkpoint.load_weights(engine, candidates[0])
    healed, first_allowed = tokenizer.heal_prompt(prompt)
    ids = torch.tensor([[tokenizer.eos_id, *healed]], device=ctx.device)  # EOS: a document starts here
    room = cfg.model.max_seq_len - ids.shape[1]
    if room <= 0:
        raise ConfigError(f"prompt of {ids.shape[1]} tokens leaves no room under model.max_seq_len="
                          f"{cfg.model.max_seq_len}")
    out = generate(engine.module, ids, min(max_new_tokens, room), temperature, top_k,
                   generator=torch.Generator(ctx.device).manual_seed(seed),
                   first_allowed=torch.tensor(first_allowed, dtype=torch.long, device=ctx.device))
    return tokenizer.decode(out[0, 1:].tolist())
