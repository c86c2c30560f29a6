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
of the Adam state, `portable_optim_rank{r}.pt`: every parameter's full fp32 `exp_avg`, `exp_avg_sq` and
step (plus its fp32 master weight under bf16), stacked experts split per global expert. It is read only on
another topology. moe.impl=deepspeed names experts by local id and gets none: its moments restart from
zero there, with a warning.
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
from dist_moe.model.moe.experts import SwiGLUExperts
from dist_moe.parallel.groups import expert_data_parallel_group


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected; the message names the path."""


# What DeepSpeed's optimizer partitions assume about the model's parameters; raised when that changes.
# 2: each MoE layer's gate and up weights are one parameter, experts.w13 (unmarked, 1: w1 and w3 apart).
PARAMETER_LAYOUT = 2


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


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


def save(engine, run_dir: Path, step: int, trainer_state: dict, ctx, keep: int) -> Path:
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
    save_portable_optimizer(engine, partial, trainer_state["ep_size"], ctx)
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


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Completed checkpoint dirs, oldest first (partial ones are never listed)."""
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


def load(engine, run_dir: Path, ctx, ep_size: int) -> tuple[int, dict]:
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


UNUSABLE = ".unusable"


def _set_aside(path: Path) -> None:
    """Rename an unusable checkpoint out of the listing; an older set-aside copy of the same step goes."""
    target = path.with_name(path.name + UNUSABLE)
    shutil.rmtree(target, ignore_errors=True)
    path.rename(target)


def _load_from(engine, path: Path, ctx, ep_size: int) -> tuple[int, dict]:
    saved = torch.load(path / "trainer_rank0.pt", weights_only=False)
    if saved.get("parameter_layout", 1) != PARAMETER_LAYOUT:
        raise CheckpointError(f"{path}: saved by an earlier dist_moe that kept the experts' gate and up weights "
                              "apart, so its optimizer state would load into the wrong parameters; resume it with "
                              "the version that wrote it (`dist-moe generate` still reads its weights)")
    same_topology = saved["world_size"] == ctx.world_size and saved["ep_size"] == ep_size
    if same_topology:
        engine.load_checkpoint(str(path.parent), tag=path.name)
        state = torch.load(path / f"trainer_rank{ctx.rank}.pt", weights_only=False)
        return int(state["step"]), state
    engine.load_checkpoint(str(path.parent), tag=path.name, load_module_only=True)
    schedule = torch.load(path / "mp_rank_00_model_states.pt", weights_only=False)["lr_scheduler"]
    engine.lr_scheduler.load_state_dict(schedule)  # its step count; the LR itself follows the resuming run's schedule
    moments = load_portable_optimizer(engine, path)
    if ctx.is_main:
        warnings.warn(f"{path.name} was saved on {saved['world_size']} rank(s) with moe.ep_size={saved['ep_size']}; "
                      f"resuming on {ctx.world_size} with moe.ep_size={ep_size}: weights "
                      + ("and Adam state re-sharded" if moments else
                         "re-sharded, optimizer moments restart from zero (no portable optimizer state)"))
    saved.pop("rng")  # RNG streams belong to the old ranks; the run re-seeds
    return int(saved["step"]), saved


# ----------------------------------------------------------------------------------------------------
# Topology-independent Adam state: written with every checkpoint, read only on another topology

PORTABLE = "portable_optim_rank{}.pt"
MOMENTS = ("exp_avg", "exp_avg_sq")


def expert_layout(model: torch.nn.Module) -> dict[int, int] | None:
    """id(param) -> first global expert, for every stacked-expert parameter (SwiGLUExperts, (E_local, ...));
    None when other expert parameters exist (moe.impl=deepspeed names experts by local id)."""
    first = {id(p): m.first_expert for m in model.modules() if isinstance(m, SwiGLUExperts) for p in m.parameters()}
    others = [p for p in model.parameters() if getattr(p, "allreduce", True) is False and id(p) not in first]
    return None if others else first


def _torch_optimizer(engine) -> torch.optim.Optimizer:
    """The AdamW itself: DeepSpeed's wrappers (ZeRO-1/2, bf16) keep it as .optimizer; ZeRO-0 fp32 uses it bare."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _masters(engine) -> dict[int, torch.Tensor] | None:
    """id(model param) -> the tensor AdamW updates, for unpartitioned optimizers (ZeRO-0): the parameter itself
    in fp32, its fp32 master copy in bf16 (FP16_UnfusedOptimizer pairs them group by group). None under
    ZeRO-1/2 and DeepSpeed's bf16 optimizer, whose parameters map to fragments of flat partitions instead."""
    opt = engine.optimizer
    if hasattr(next(engine.module.parameters()), "_hp_mapping"):
        return None
    if hasattr(opt, "fp16_groups"):
        return {id(p): m for low, high in zip(opt.fp16_groups, opt.fp32_groups) for p, m in zip(low, high)}
    return {id(p): p for group in opt.param_groups for p in group["params"]}


def _link_fragments(engine, params: list[torch.Tensor]) -> None:
    """Partitioned optimizers point each parameter's fragment at the flat partition's state only during a step;
    do it now so that safe_get/set_full_optimizer_state also work before one (right after a load)."""
    optimizer = _torch_optimizer(engine)
    for p in params:
        mapping = p._hp_mapping
        if mapping is not None:
            flat = optimizer.param_groups[mapping.param_group_index]["params"][0]
            if optimizer.state.get(flat):
                mapping.set_optim_state_fragment(flat, optimizer.state[flat])


def _full_state(engine, p: torch.Tensor, masters: dict | None) -> dict:
    """p's {exp_avg, exp_avg_sq: full fp32 on the CPU, step: int[, fp32: master weight when p is not fp32]};
    zeros and step 0 before the first step, as AdamW would create them. Collective when partitioned
    (masters None): safe_get_full_* all-reduce over p's data-parallel group."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    optimizer = _torch_optimizer(engine)
    partitioned_steps = [int(s["step"]) for s in optimizer.state.values() if s] if masters is None else []
    state = optimizer.state.get(masters[id(p)]) if masters is not None else None
    if partitioned_steps:  # one step count per flat partition, all equal
        entry = {k: safe_get_full_optimizer_state(p, k) for k in MOMENTS} | {"step": max(partitioned_steps)}
        if p.dtype != torch.float32:
            entry["fp32"] = safe_get_full_fp32_param(p)
    elif state:
        entry = {k: state[k] for k in MOMENTS} | {"step": int(state["step"])}
        if p.dtype != torch.float32:
            entry["fp32"] = masters[id(p)]
    else:
        entry = {k: torch.zeros(p.shape) for k in MOMENTS} | {"step": 0}
    return {k: v.detach().float().cpu() if torch.is_tensor(v) else v for k, v in entry.items()}


def save_portable_optimizer(engine, directory: Path, ep_size: int, ctx) -> None:
    """Collective. Writes `portable_optim_rank{r}.pt` = {"dense": {name: state}, "experts": {name: {global
    expert: state}}} (states as _full_state gives them): rank 0 the non-expert parameters, each expert-data-
    parallel rank 0 its experts' slices. Nothing for moe.impl=deepspeed."""
    layout = expert_layout(engine.module)
    if layout is None:
        return
    params = [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]
    masters = _masters(engine)
    if masters is None:
        _link_fragments(engine, [p for _, p in params])
    writes_experts = bool(layout) and torch.distributed.get_rank(expert_data_parallel_group(ep_size)) == 0
    dense, experts = {}, {}
    for name, p in params:
        state = _full_state(engine, p, masters)  # on every rank: it may be collective
        if id(p) not in layout and ctx.is_main:
            dense[name] = state
        elif id(p) in layout and writes_experts:
            experts[name] = {layout[id(p)] + i: {k: v[i].clone() if torch.is_tensor(v) else v  # clone: not the stack
                                                 for k, v in state.items()} for i in range(p.shape[0])}
    if dense or experts:
        torch.save({"dense": dense, "experts": experts}, directory / PORTABLE.format(ctx.rank))


def _read_portable(directory: Path, params: list[tuple[str, torch.Tensor]], layout: dict[int, int]) -> dict:
    """name -> full state of this rank's parameter (expert slices stacked in local order), from all the files."""
    dense, experts = {}, {}
    for file in sorted(directory.glob(PORTABLE.format("*"))):
        saved = torch.load(file, weights_only=True, mmap=True)
        dense.update(saved["dense"])
        for name, per_expert in saved["experts"].items():
            experts.setdefault(name, {}).update(per_expert)
    states = {}
    for name, p in params:
        if id(p) not in layout:
            if name not in dense:
                raise CheckpointError(f"{directory / PORTABLE.format(0)}: no optimizer state for {name}")
            states[name] = dense[name]
            continue
        wanted = range(layout[id(p)], layout[id(p)] + p.shape[0])
        missing = [e for e in wanted if e not in experts.get(name, {})]
        if missing:
            raise CheckpointError(f"{directory}: no optimizer state for expert {missing[0]} of {name} in "
                                  f"{PORTABLE.format('*')}")
        per = [experts[name][e] for e in wanted]
        states[name] = {k: torch.stack([s[k] for s in per]) for k in per[0] if k != "step"}
        states[name]["step"] = max(s["step"] for s in per)
    return states


def _step_tensor(step: int, group: dict, device: torch.device) -> torch.Tensor:
    """AdamW's step as it creates it: a float scalar on the CPU, on the parameter's device if capturable/fused."""
    return torch.tensor(float(step), device=device if group.get("capturable") or group.get("fused") else "cpu")


def load_portable_optimizer(engine, directory: Path) -> bool:
    """Set every parameter's Adam state and step (and fp32 master weight under bf16) from the portable files,
    taking this rank's experts. Call after load_module_only. False (nothing changed) if there are none."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    layout = expert_layout(engine.module)
    if layout is None or not any(directory.glob(PORTABLE.format("*"))):
        return False
    params = [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]
    states = _read_portable(directory, params, layout)
    optimizer, masters = _torch_optimizer(engine), _masters(engine)
    if masters is None:  # partitioned: AdamW's state is per flat partition, created at the first step
        step = max(s["step"] for s in states.values())
        for group in optimizer.param_groups:
            for flat in group["params"]:
                for k in MOMENTS:
                    optimizer.state[flat].setdefault(k, torch.zeros_like(flat))
                optimizer.state[flat]["step"] = _step_tensor(step, group, flat.device)
        _link_fragments(engine, [p for _, p in params])
        for name, p in params:
            for k in MOMENTS:
                safe_set_full_optimizer_state(p, states[name][k].to(p.device), k)
            if p.dtype != torch.float32 and "fp32" in states[name]:
                safe_set_full_fp32_param(p, states[name]["fp32"].to(p.device))
        return True
    group_of = {id(m): group for group in optimizer.param_groups for m in group["params"]}
    for name, p in params:
        master, state = masters[id(p)], states[name]
        optimizer.state[master] = {"step": _step_tensor(state["step"], group_of[id(master)], master.device)} | {
            k: state[k].to(master.device, master.dtype).clone() for k in MOMENTS}
        if p.dtype != torch.float32 and "fp32" in state:
            master.data.copy_(state["fp32"])
    return True
