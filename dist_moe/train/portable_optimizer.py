"""Topology-independent Adam state: written with every checkpoint, read only when resuming on another topology.

DeepSpeed's optimizer files are partitioned by rank and expert group, so they load only on the topology
that wrote them. Beside them each checkpoint holds `portable_optim_rank{r}.pt`: every parameter's full fp32
`exp_avg`, `exp_avg_sq` and step (plus its fp32 master weight under bf16), stacked experts split per global
expert, read through DeepSpeed's `safe_get/set_full_*` helpers (partitioned optimizers) or the AdamW state
itself (ZeRO-0). moe.impl=deepspeed names experts by local id and gets none: its moments restart from zero
there, with a warning (checkpoint.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dist_moe.errors import CheckpointError
from dist_moe.model.moe.experts import SwiGLUExperts
from dist_moe.parallel.groups import expert_data_parallel_group
from dist_moe.train.engine import DistContext

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


def save(engine, directory: Path, ep_size: int, ctx: DistContext) -> None:
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


def load(engine, directory: Path) -> bool:
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
