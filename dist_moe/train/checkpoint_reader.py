"""Read a run's checkpoint folders without an engine or a process group: which checkpoints there are, and the
plain model's weights from one of them.

DeepSpeed writes the dense weights to `mp_rank_00_model_states.pt` and each global expert of each MoE layer
to `layer_{i}_expert_{id}_mp_rank_00_model_states.pt` (whichever EP rank held it), so a checkpoint of any
world size and moe.ep_size reads alike into one process. A checkpoint may come from elsewhere, so every
file is read by load_file, torch's weights-only unpickler: no file of it runs code. This module owns the
listing and the safe loading (train/checkpoint.py uses both); listing needs no torch (`dist-moe status` stays
light), reading imports it.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from types import SimpleNamespace

from dist_moe.config import Config, from_yaml_file, is_moe_layer
from dist_moe.errors import CheckpointError

DENSE_FILE = "mp_rank_00_model_states.pt"


def safe_globals() -> list:
    """What a checkpoint holds besides tensors and plain values: numpy's RNG state (an array of uint32) in
    trainer_rank{r}.pt. np.zeros(0).__reduce__()[0] is numpy's array unpickler, wherever its version keeps it."""
    import numpy as np

    return [np.zeros(0).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_file(file: Path, mmap: bool = False, allowed: list | tuple = ()):
    """A checkpoint file's contents, read without running any of it: a file that holds anything but tensors,
    plain values, safe_globals() and the `allowed` classes is refused in one line naming it (a pickle can call
    any function)."""
    import torch

    try:
        with torch.serialization.safe_globals([*safe_globals(), *allowed]):
            return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = f"a reference to {found[1]}" if found else "an object that is neither a tensor nor a plain value"
        raise CheckpointError(f"{file}: refused, it holds {what}, which loading would run (a checkpoint holds "
                              "only tensors and plain values; was it made elsewhere?)") from None
    except (RuntimeError, OSError, EOFError) as exc:
        raise CheckpointError(f"{file}: not a readable torch checkpoint file ({str(exc).splitlines()[0]})") from None


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Completed checkpoint dirs, oldest first (partial and unusable ones are never listed)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and "." not in p.name)


def candidates(run_dir: Path) -> list[Path]:
    """Checkpoints to try, best first: the one `latest` names, then the others newest first."""
    complete = complete_checkpoints(run_dir)
    latest_file = checkpoint_root(run_dir) / "latest"
    named = []
    if latest_file.exists():
        path = checkpoint_root(run_dir) / latest_file.read_text().strip()
        if path in complete:
            named = [path]
    return named + [p for p in reversed(complete) if p not in named]


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("_")[1])


def checkpoint_dir(run_dir: Path, step: int | None = None) -> Path:
    """The checkpoint of `step`, or the best one to read (see candidates)."""
    if step is None:
        found = candidates(run_dir)
        if not found:
            raise CheckpointError(f"{checkpoint_root(run_dir)}: no complete checkpoint")
        return found[0]
    complete = complete_checkpoints(run_dir)
    wanted = [p for p in complete if checkpoint_step(p) == step]
    if not wanted:
        steps = ", ".join(str(checkpoint_step(p)) for p in complete) or "none"
        raise CheckpointError(f"{checkpoint_root(run_dir)}: no checkpoint of step {step} (complete: {steps})")
    return wanted[0]


def read_checkpoint_state(path: Path, cfg: Config) -> dict:
    """Every weight of a checkpoint dir under the names DeepSpeed's files hold (per-expert keys with global
    expert ids); every expert of every MoE layer must be there."""
    dense = path / DENSE_FILE
    if not dense.is_file():
        raise CheckpointError(f"{dense}: missing (the dense model file of every checkpoint)")
    state = dict(load_file(dense)["module"])
    num_moe_layers = sum(is_moe_layer(cfg, i) for i in range(cfg.model.num_layers))
    for moe_index in range(num_moe_layers):
        for expert in range(cfg.moe.num_experts):
            file = path / f"layer_{moe_index}_expert_{expert}_{DENSE_FILE}"
            if not file.is_file():
                raise CheckpointError(f"{file}: missing (every global expert has its own file)")
            state.update(load_file(file))
    return state


def to_module_names(state: dict, cfg: Config) -> dict:
    """DeepSpeed's per-expert names -> the plain model's (router.weight, stacked experts.w13 and experts.w2),
    for a model holding every expert (moe.ep_size=1)."""
    from dist_moe.train.deepspeed_keys import from_deepspeed_keys

    whole_layer = SimpleNamespace(num_local_experts=cfg.moe.num_experts)  # all of a layer's experts are local
    for i in range(cfg.model.num_layers):
        if is_moe_layer(cfg, i):
            from_deepspeed_keys(whole_layer, state, f"blocks.{i}.ffn.")
    return state


def read_model_state(run_dir: str | Path, step: int | None = None) -> tuple[int, dict]:
    """(step, state dict of the plain Transformer with moe.ep_size=1) from run_dir's newest checkpoint or `step`'s."""
    run_dir = Path(run_dir)
    path = checkpoint_dir(run_dir, step)
    cfg = from_yaml_file(run_dir / "config.yaml")
    return checkpoint_step(path), to_module_names(read_checkpoint_state(path, cfg), cfg)
