"""Write a transformers folder from our model's weights: safetensors (sharded above max_shard_bytes, with
transformers' index file), config.json (adapter.architecture picks the class), generation_config.json
(dist-moe generate's sampling defaults) and the tokenizer (tokenizer.py). The folder is built under
OUT_DIR.partial and renamed when complete; an existing non-empty OUT_DIR is never written over.

`dist-moe export` (cli.py) composes read -> convert -> write: train/checkpoint_reader.py reads a run's
checkpoint into the model's state dict, adapter.to_hf renames it, and this module writes it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from dist_moe.config import Config, ConfigError
from dist_moe.hf import adapter

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def save_safetensors(state: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors plus transformers' index when it is larger."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = state[name]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def check_target(out_dir: Path, dtype: str) -> None:
    """Refuse, before anything large is read, an unknown dtype or an out_dir that already holds files."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: expected one of {' | '.join(DTYPES)}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"'{out_dir}' exists and is not empty; export writes a new folder")


def write_folder(hf_state: dict[str, torch.Tensor], cfg: Config, tokenizer, tokenizer_model: Path, out_dir: Path,
                 dtype: str = "fp32", max_shard_bytes: int = 5 * 2**30) -> Path:
    """The whole folder (weights in transformers' names, configs, tokenizer and its sentencepiece original
    `tokenizer_model`) at out_dir, which appears only once complete; returns out_dir."""
    check_target(out_dir, dtype)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    write_model(hf_state, cfg, partial, tokenizer.eos_token_id, dtype, max_shard_bytes)
    tokenizer.save_pretrained(partial)
    shutil.copyfile(tokenizer_model, partial / "tokenizer.model")
    if out_dir.exists():
        out_dir.rmdir()  # empty, checked above
    partial.rename(out_dir)
    return out_dir


def write_model(hf_state: dict[str, torch.Tensor], cfg: Config, out_dir: Path, eos_id: int, dtype: str = "fp32",
                max_shard_bytes: int = 5 * 2**30) -> None:
    """Weights (transformers' names, adapter.to_hf), config.json and generation_config.json into out_dir."""
    from dist_moe.hf import require_transformers

    transformers = require_transformers()
    hf_state = {k: v.detach().to(DTYPES[dtype]).contiguous() for k, v in hf_state.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(hf_state, out_dir, max_shard_bytes)
    adapter.hf_config(cfg, eos_id, DTYPES[dtype]).save_pretrained(out_dir)
    transformers.GenerationConfig(do_sample=True, temperature=0.8, top_k=50, eos_token_id=eos_id,
                                  bos_token_id=None, pad_token_id=None).save_pretrained(out_dir)
