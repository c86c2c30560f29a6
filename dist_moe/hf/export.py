"""`dist-moe export RUN_DIR OUT_DIR`: a run's checkpoint as a folder transformers loads.

Reads DeepSpeed's files on the CPU with no process group, running none of them (checkpoint.load_file): the
dense model file and one file per global expert (`layer_{L}_expert_{id}_mp_rank_00_model_states.pt`,
written by whichever EP rank held the expert), so checkpoints of any world size and moe.ep_size export
alike. Writes safetensors (sharded above
max_shard_bytes, with transformers' index file), config.json (adapter.architecture picks the class),
generation_config.json (dist-moe generate's sampling defaults) and the tokenizer (tokenizer.py). The folder
is built under OUT_DIR.partial and renamed when complete; an existing OUT_DIR is never written over.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from dist_moe.config import Config, ConfigError, from_yaml_file, is_moe_layer
from dist_moe.hf import adapter
from dist_moe.hf.tokenizer import convert
from dist_moe.train import checkpoint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DENSE_FILE = "mp_rank_00_model_states.pt"


def checkpoint_dir(run_dir: Path, step: int | None) -> Path:
    """The checkpoint of `step`, or the newest usable one."""
    if step is None:
        found = checkpoint.candidates(run_dir)
        if not found:
            raise checkpoint.CheckpointError(f"{checkpoint.checkpoint_root(run_dir)}: no checkpoint to export")
        return found[0]
    complete = checkpoint.complete_checkpoints(run_dir)
    wanted = [p for p in complete if p.name == f"step_{step:08d}"]
    if not wanted:
        steps = ", ".join(str(int(p.name.split("_")[1])) for p in complete) or "none"
        raise checkpoint.CheckpointError(f"{checkpoint.checkpoint_root(run_dir)}: no checkpoint of step {step} "
                                         f"(complete: {steps})")
    return wanted[0]


def read_checkpoint(path: Path, cfg: Config) -> dict[str, torch.Tensor]:
    """Every weight of a checkpoint dir by its checkpoint name; every expert of every MoE layer must be there."""
    state = dict(checkpoint.load_file(path / DENSE_FILE)["module"])
    moe_layers = [i for i in range(cfg.model.num_layers) if is_moe_layer(cfg, i)]
    for moe_index in range(len(moe_layers)):
        for expert in range(cfg.moe.num_experts):
            file = path / f"layer_{moe_index}_expert_{expert}_{DENSE_FILE}"
            if not file.is_file():
                raise checkpoint.CheckpointError(f"{file}: missing (every global expert has its own file)")
            state.update(checkpoint.load_file(file))
    return state


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


def export(run_dir: str | Path, out_dir: str | Path, step: int | None = None, dtype: str = "fp32",
           max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write the transformers folder of run_dir's checkpoint (newest, or `step`) to out_dir; returns out_dir."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"run dir '{run_dir}' has no config.yaml (is it a dist-moe run dir?)")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: expected one of {' | '.join(DTYPES)}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"'{out_dir}' exists and is not empty; export writes a new folder")
    cfg = from_yaml_file(run_dir / "config.yaml")
    adapter.architecture(cfg)  # refuse before reading anything large
    tokenizer = convert(run_dir / "tokenizer.model")
    state = read_checkpoint(checkpoint_dir(run_dir, step), cfg)

    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    write_model(state, cfg, partial, tokenizer.eos_token_id, dtype, max_shard_bytes)
    tokenizer.save_pretrained(partial)
    shutil.copyfile(run_dir / "tokenizer.model", partial / "tokenizer.model")  # the sentencepiece original
    if out_dir.exists():
        out_dir.rmdir()  # empty, checked above
    partial.rename(out_dir)
    return out_dir


def write_model(state: dict[str, torch.Tensor], cfg: Config, out_dir: Path, eos_id: int, dtype: str = "fp32",
                max_shard_bytes: int = 5 * 2**30) -> None:
    """Weights (checkpoint or module names), config.json and generation_config.json into out_dir."""
    from dist_moe.hf import require_transformers

    transformers = require_transformers()
    hf_state = adapter.checkpoint_to_hf(state, cfg)
    hf_state = {k: v.detach().to(DTYPES[dtype]).contiguous() for k, v in hf_state.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(hf_state, out_dir, max_shard_bytes)
    adapter.hf_config(cfg, eos_id, DTYPES[dtype]).save_pretrained(out_dir)
    transformers.GenerationConfig(do_sample=True, temperature=0.8, top_k=50, eos_token_id=eos_id,
                                  bos_token_id=None, pad_token_id=None).save_pretrained(out_dir)
