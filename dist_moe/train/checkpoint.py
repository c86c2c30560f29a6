"""Checkpoints in RUN_DIR/checkpoints: DeepSpeed's engine files plus what continuing identically needs.

Layout: `checkpoints/step_00000100/` holds DeepSpeed's files (model, one file per global expert, optimizer,
LR schedule, ZeRO partitions) and one `trainer_rank{r}.pt` per rank (step, sampler position, RNG states
including the router-noise generators, the topology it was saved on). A checkpoint is written under
`step_N.partial`, renamed to `step_N` once every rank has finished, and only then does the `latest` file
move (temporary name, fsync, rename). A kill at any moment leaves the previous checkpoint named by `latest`.
A resume that falls back past unusable checkpoints renames them `step_N.unusable`; rotation keeps the `ckpt.keep`
newest up to the one just saved, so it never counts an unusable (or another attempt's) checkpoint as kept.

Resuming on another topology (world size or moe.ep_size): DeepSpeed's per-expert files re-shard the
weights (each rank loads its global experts) and the LR schedule and step continue. DeepSpeed's optimizer
files are partitioned by rank and expert group, so each checkpoint also holds a topology-independent copy
of the Adam state (portable_optimizer.py), read only on another topology.

A checkpoint may come from elsewhere, so no file of it runs code: ours are read with torch's weights-only
unpickler (tensors and plain values, plus numpy's RNG-state types: checkpoint_reader.load_file, which also
owns the listing of a run's checkpoints), and before DeepSpeed's loader (which
unpickles anything) reads a checkpoint, every file there must pass that same reader, which then also
allows the few plain-data classes DeepSpeed's ZeRO files hold (`check_files`).
"""

from __future__ import annotations

import os
import random
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from dist_moe.atomic import write_bytes_atomic
from dist_moe.errors import CheckpointError
from dist_moe.train.checkpoint_reader import candidates, checkpoint_root, complete_checkpoints, load_file
from dist_moe.train import portable_optimizer
from dist_moe.train.engine import DistContext


# What DeepSpeed's optimizer partitions assume about the model's parameters; raised when that changes.
# 2: each MoE layer's gate and up weights are one parameter, experts.w13 (unmarked, 1: w1 and w3 apart).
PARAMETER_LAYOUT = 2


def check_files(path: Path) -> None:
    """Before DeepSpeed's loader unpickles checkpoint dir `path` (with no restriction): every file in it must
    load with load_file, so that the unrestricted load only ever sees safe bytes. Tensors stay on disk (mmap)."""
    allowed = _deepspeed_globals()
    for file in sorted(path.glob("*.pt")):
        load_file(file, mmap=True, allowed=allowed)


def _deepspeed_globals() -> list:
    """The plain-data classes DeepSpeed's ZeRO optimizer files hold: the stage, partition offsets and the
    static loss scale (bf16 and fp32 training). Only where DeepSpeed's loader runs, so deepspeed is loaded."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler]


def load_weights(engine, path: Path) -> None:
    """The model weights of checkpoint dir `path` into the engine (saved on any topology: DeepSpeed's
    per-expert files), once check_files has passed it."""
    check_files(path)
    engine.load_checkpoint(str(path.parent), tag=path.name, load_module_only=True)


def _tag(step: int) -> str:
    return f"step_{step:08d}"


def noise_generators(model: torch.nn.Module) -> list[torch.Generator]:
    """The router-noise generators of the MoE layers, in module order."""
    return [m.generator for m in model.modules() if isinstance(getattr(m, "generator", None), torch.Generator)]


def rng_state(model: torch.nn.Module) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "routers": [g.get_state() for g in noise_generators(model)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, model: torch.nn.Module) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for generator, saved in zip(noise_generators(model), state["routers"]):
        generator.set_state(saved)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(engine, run_dir: Path, step: int, trainer_state: dict, ctx: DistContext, keep: int) -> Path:
    """Collective: every rank calls it. Returns the completed checkpoint directory."""
    root = checkpoint_root(run_dir)
    partial = root / (_tag(step) + ".partial")
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # debris of an earlier killed save
    torch.distributed.barrier()
    engine.save_checkpoint(str(root), tag=partial.name, save_latest=False)
    state = {**trainer_state, "rng": rng_state(engine.module), "world_size": ctx.world_size,
             "parameter_layout": PARAMETER_LAYOUT}
    torch.save(state, partial / f"trainer_rank{ctx.rank}.pt")
    portable_optimizer.save(engine, partial, trainer_state["ep_size"], ctx)
    torch.distributed.barrier()
    final = root / _tag(step)
    if ctx.is_main:
        for path in partial.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        _fsync_dir(root)
        write_bytes_atomic(root / "latest", (final.name + "\n").encode())
        _fsync_dir(root)
        for old in rotated_out(run_dir, final, keep):
            shutil.rmtree(old, ignore_errors=True)
    torch.distributed.barrier()
    return final


def rotated_out(run_dir: Path, saved: Path, keep: int) -> list[Path]:
    """What rotation deletes after `saved` was written: all but the `keep` newest up to and including it.
    Newer ones (an abandoned attempt's, past the step this run resumed from) are neither kept nor deleted:
    they are not this run's, and its saves replace them as it reaches their steps."""
    upto = [p for p in complete_checkpoints(run_dir) if p.name <= saved.name]
    return upto[:-keep]


def verify(path: Path) -> str | None:
    """None if every file of the checkpoint is a complete torch archive, else what is wrong with it."""
    files = sorted(path.glob("*.pt"))
    if not any(f.name == "trainer_rank0.pt" for f in files):
        return "trainer_rank0.pt is missing"
    for file in files:
        try:
            with zipfile.ZipFile(file) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError) as exc:
            return f"{file.name}: {exc}"
        if bad is not None:
            return f"{file.name}: corrupt member {bad}"
    return None


def _agree(ok: bool, device: torch.device) -> bool:
    flag = torch.tensor([int(ok)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def load(engine, run_dir: Path, ctx: DistContext, ep_size: int) -> tuple[int, dict]:
    """Load the newest usable checkpoint into the engine; returns (step, trainer_state for this rank).

    Every rank checks the files first and all agree before DeepSpeed reads them, so a corrupt checkpoint
    makes every rank fall back to the previous one together (with a warning naming both). Once one loads, the
    unusable ones are set aside as `step_N.unusable` (kept, never listed again), so that rotation never
    counts them as kept: every listed checkpoint newer than the loaded one is then one this run wrote.
    """
    skipped = []
    for path in candidates(run_dir):
        problem = verify(path)
        if not _agree(problem is None, ctx.device):
            skipped.append(path)
            if ctx.is_main:
                warnings.warn(f"checkpoint {path} is unusable ({problem or 'on another rank'}); trying the previous one")
            continue
        refused = _refusal(path)
        if not _agree(refused is None, ctx.device):
            raise refused or CheckpointError(f"{path}: refused on another rank (a file that would run code)")
        loaded = _load_from(engine, path, ctx, ep_size)
        if skipped and ctx.is_main:
            for bad in skipped:
                _set_aside(bad)
            warnings.warn(f"resumed from {path.name} instead of {', '.join(p.name for p in skipped)} "
                          f"(set aside as {', '.join(p.name + UNUSABLE for p in skipped)})")
        torch.distributed.barrier()
        return loaded
    raise CheckpointError(f"{checkpoint_root(run_dir)}: no usable checkpoint"
                          + (f" (unusable: {', '.join(p.name for p in skipped)})" if skipped else ""))


def _refusal(path: Path) -> CheckpointError | None:
    """check_files' refusal of `path`, or None: every rank agrees on it before any raises."""
    try:
        check_files(path)
    except CheckpointError as exc:
        return exc
    return None


UNUSABLE = ".unusable"


def _set_aside(path: Path) -> None:
    """Rename an unusable checkpoint out of the listing; an older set-aside copy of the same step goes."""
    target = path.with_name(path.name + UNUSABLE)
    shutil.rmtree(target, ignore_errors=True)
    path.rename(target)


def _load_from(engine, path: Path, ctx: DistContext, ep_size: int) -> tuple[int, dict]:
    saved = load_file(path / "trainer_rank0.pt")
    if saved.get("parameter_layout", 1) != PARAMETER_LAYOUT:
        raise CheckpointError(f"{path}: saved by an earlier dist_moe that kept the experts' gate and up weights "
                              "apart, so its optimizer state would load into the wrong parameters; resume it with "
                              "the version that wrote it (`dist-moe generate` still reads its weights)")
    same_topology = saved["world_size"] == ctx.world_size and saved["ep_size"] == ep_size
    if same_topology:
        engine.load_checkpoint(str(path.parent), tag=path.name)
        state = load_file(path / f"trainer_rank{ctx.rank}.pt")
        return int(state["step"]), state
    engine.load_checkpoint(str(path.parent), tag=path.name, load_module_only=True)
    schedule = load_file(path / "mp_rank_00_model_states.pt")["lr_scheduler"]
    engine.lr_scheduler.load_state_dict(schedule)  # its step count; the LR itself follows the resuming run's schedule
    moments = portable_optimizer.load(engine, path)
    if ctx.is_main:
        warnings.warn(f"{path.name} was saved on {saved['world_size']} rank(s) with moe.ep_size={saved['ep_size']}; "
                      f"resuming on {ctx.world_size} with moe.ep_size={ep_size}: weights "
                      + ("and Adam state re-sharded" if moments else
                         "re-sharded, optimizer moments restart from zero (no portable optimizer state)"))
    saved.pop("rng")  # RNG streams belong to the old ranks; the run re-seeds
    return int(saved["step"]), saved
