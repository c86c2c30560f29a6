"""The worker body: `run(cfg)`. The same function runs in one process, under `dist-moe train --nproc N`
and inside Ray Train workers; it is the only training loop in dist_moe. What it optimises (pretraining or
DPO) is an objective (train/objective.py) that owns the data, the micro-batch loss and the evaluation.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from dist_moe.atomic import write_bytes_atomic
from dist_moe.config import Config, ConfigError, check_resumable, from_yaml_file, grad_accum_dtype, to_yaml
from dist_moe.model.moe.router import end_router_step
from dist_moe.model.transformer import Transformer, num_parameters
from dist_moe.parallel.groups import expert_parallel_group, node_layout
from dist_moe.train import checkpoint
from dist_moe.train.bounded_exchange import apply_bounded_exchange, overflows
from dist_moe.train.engine import (DistContext, build_engine, destroy_process_group_at_exit, follow_schedule,
                                   init_distributed)
from dist_moe.train.expert_load import ExpertLoadTracker
from dist_moe.train.flops import mfu, peak_flops, training_flops_per_token
from dist_moe.train.heartbeat import Heartbeat
from dist_moe.train.metrics import Metrics
from dist_moe.train.objective import Objective, build_objective
from dist_moe.train.stop import SaveClock, StopRequest, any_rank


def say(ctx: DistContext, message: str) -> None:
    if ctx.is_main:
        print(message, flush=True)


def run(cfg: Config, grow=None, stop_file: Path | None = None) -> dict:
    """Train cfg.train.max_steps optimizer steps (continuing from a checkpoint if cfg.resume=auto). A signal,
    or stop_file appearing, saves the current step and returns early (summary "completed": false). `grow`
    (elastic Ray runs, cluster.trainer.GrowBack) says when a larger worker group can start: the loop then
    saves and waits for Ray Train to restart the group from that checkpoint."""
    stop = StopRequest(stop_file)
    ctx = init_distributed(cfg)
    run_dir = Path(cfg.run_dir)
    if cfg.resume == "never" and checkpoint.candidates(run_dir):  # never train over a run's checkpoints
        raise ConfigError(f"run dir '{run_dir}' already holds checkpoints: continue it with "
                          f"`dist-moe resume {run_dir}` (or resume=auto), or pick another run_dir")
    heartbeat = Heartbeat(run_dir, ctx.rank, ctx.world_size, cfg.cluster.hang_timeout_s)
    try:
        return _train(cfg, ctx, stop, heartbeat, grow)
    finally:
        heartbeat.close()


def _train(cfg: Config, ctx: DistContext, stop: StopRequest, heartbeat: Heartbeat, grow) -> dict:
    run_dir = Path(cfg.run_dir)
    heartbeat.enter("preparing data", watched=False)
    hf_init = bool(cfg.init.from_hf or cfg.init.upcycle_from)
    if hf_init:  # the model's shape (and the tokenizer, where the folder has one) come from a transformers folder
        from dist_moe.hf import load as hf_load

        hf_load.apply_init_config(cfg)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    objective = build_objective(cfg, run_dir, ctx)
    resuming = cfg.resume == "auto" and bool(checkpoint.candidates(run_dir))
    if resuming:
        check_resumable(from_yaml_file(run_dir / "config.yaml"), cfg)

    torch.manual_seed(cfg.train.seed)  # identical non-expert init on every rank
    model = apply_bounded_exchange(Transformer(cfg, ep_group=expert_parallel_group(cfg.moe.ep_size)))
    if hf_init and not resuming:
        hf_load.load_init_weights(model, cfg)
        say(ctx, f"initialised from {cfg.init.from_hf or cfg.init.upcycle_from}"
                 + (" (upcycled: every expert a copy of the dense FFN)" if cfg.init.upcycle_from else ""))
    total_params, active_params = num_parameters(model)
    engine = build_engine(cfg, model, ctx)
    objective.start(engine)
    sampler = objective.sampler

    step = 0
    if resuming:
        heartbeat.enter("checkpoint load")
        step, state = checkpoint.load(engine, run_dir, ctx, cfg.moe.ep_size)
        follow_schedule(engine, cfg, step)
        sampler.load_state_dict(state["sampler"])
        if "rng" in state:
            checkpoint.set_rng_state(state["rng"], model)
        say(ctx, f"resumed from {run_dir / 'checkpoints'} at step {step}")
    torch.distributed.barrier()
    if ctx.is_main:  # only now: a resume that found no usable checkpoint leaves the run's config as it was
        write_bytes_atomic(run_dir / "config.yaml", to_yaml(cfg).encode())

    metrics = Metrics(run_dir, enabled=ctx.is_main, tensorboard=cfg.log.tensorboard, start_step=step)
    expert_load = ExpertLoadTracker(engine.module, cfg.moe.num_experts)
    tokens_per_step = objective.tokens_per_micro_batch * cfg.train.grad_accum_steps * ctx.world_size
    flops_per_token = training_flops_per_token(cfg, active_params)
    peak = peak_flops(ctx.device)
    say(ctx, f"model: {total_params / 1e6:.2f}M parameters, {active_params / 1e6:.2f}M active per token; "
             f"{ctx.world_size} rank(s) on {ctx.device.type}, EP={cfg.moe.ep_size}, ZeRO-{cfg.train.zero_stage}"
             + (f"; hierarchical all-to-all over nodes of {node_layout(cfg.moe.ep_size).sizes} EP ranks"
                if cfg.moe.a2a == "hierarchical" and cfg.moe.ep_size > 1 else "")
             + (f"; gradients summed over {cfg.train.grad_accum_steps} micro steps in "
                f"{grad_accum_dtype(cfg, ctx.device.type)}" if cfg.train.grad_accum_steps > 1 else ""))

    clock = SaveClock(cfg.ckpt.every_minutes)

    def save(at_step: int) -> None:
        heartbeat.enter("checkpoint save")
        state = {"step": at_step, "sampler": sampler.state_dict(), "ep_size": cfg.moe.ep_size}
        path = checkpoint.save(engine, run_dir, at_step, state, ctx, cfg.ckpt.keep)
        clock.saved()
        say(ctx, f"checkpoint {path}")

    overflows_before = overflows(engine.module)  # moe.exchange=bounded: redone forwards, logged per window
    scores: dict[str, float] = {}  # no evaluation yet (a stop before the first one): null in summary.json
    if step == 0:  # where training starts from, as a baseline for every later evaluation
        heartbeat.enter("evaluation")
        scores = objective.evaluate(engine)
        metrics.log(0, scores)
        say(ctx, f"step {0:>6} | {objective.describe(scores)}")
    window_start, window_tokens = time.perf_counter(), 0
    stopped_early = False
    while step < cfg.train.max_steps:
        lr = engine.get_lr()[0]  # the LR this step applies; engine.step() moves it on to the next step's
        train_scalars = train_step(cfg, engine, objective, expert_load, heartbeat, step + 1)
        end_router_step(engine.module, cfg.moe.bias_update_rate)  # aux-free bias: the whole step's load
        step += 1
        window_tokens += tokens_per_step
        if step % cfg.log.every == 0 or step == cfg.train.max_steps:
            heartbeat.enter("logging (all-reduce)")
            elapsed = time.perf_counter() - window_start
            tokens_per_second = window_tokens / elapsed
            means = mean_over_ranks(torch.stack(list(train_scalars.values())))
            scalars = {f"train/{name}": value for name, value in zip(train_scalars, means)} | {
                "train/lr": lr,
                "train/grad_norm": _grad_norm(engine), "perf/tokens_per_second": tokens_per_second,
                "perf/mfu": mfu(flops_per_token, tokens_per_second / ctx.world_size, peak),
            }
            if cfg.moe.exchange == "bounded":  # forwards redone since the last line (evaluations included)
                overflows_now = overflows(engine.module)
                scalars["moe/bound_overflows"], overflows_before = overflows_now - overflows_before, overflows_now
            metrics.log(step, scalars)
            say(ctx, f"step {step:>6}/{cfg.train.max_steps} | loss {scalars['train/loss']:.4f} | "
                     f"aux {scalars['train/aux_loss']:.3f} | lr {scalars['train/lr']:.2e} | "
                     f"{tokens_per_second:,.0f} tok/s" + (f" | MFU {scalars['perf/mfu']:.1%}" if peak else ""))
            window_start, window_tokens = time.perf_counter(), 0
        if step % cfg.log.expert_every == 0 or step == cfg.train.max_steps:
            expert_load.log(metrics.tensorboard, step)
        if step % cfg.train.eval_every == 0 or step == cfg.train.max_steps:
            heartbeat.enter("evaluation")
            scores = objective.evaluate(engine)
            metrics.log(step, scores)
            say(ctx, f"step {step:>6} | {objective.describe(scores)}")
        heartbeat.enter("stop check (all-reduce)")
        stop_now, time_due = any_rank(ctx, stop.requested, clock.due())
        if stop_now:
            say(ctx, f"stop requested: saving step {step} and exiting")
            stopped_early = True
            break
        periodic = step < cfg.train.max_steps and (time_due or (cfg.ckpt.every and step % cfg.ckpt.every == 0))
        if periodic:
            save(step)
        if grow is not None and step < cfg.train.max_steps and grow.pending(ctx):
            say(ctx, f"more workers can start: saving step {step} before Ray Train resizes the worker group")
            if not periodic:  # else saved just above
                save(step)
            grow.wait()

    save(step)
    heartbeat.enter("finished", watched=False)
    metrics.close()
    summary = {
        "step": step, "max_steps": cfg.train.max_steps, "completed": not stopped_early,
        "n_total": total_params, "n_active": active_params, "num_experts": cfg.moe.num_experts,
        "tokens": step * tokens_per_step, "flops": step * tokens_per_step * flops_per_token,
        **objective.summary(scores),
    }
    summary = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in summary.items()}  # strict
    if ctx.is_main:  # JSON: a diverged run's NaN loss is null
        write_bytes_atomic(run_dir / "summary.json", (json.dumps(summary, indent=2, allow_nan=False) + "\n").encode())
        print(f"run dir: {run_dir}\nTensorBoard: dist-moe tensorboard {run_dir}", flush=True)
    if ctx.owns_process_group:  # only after a run completed: a failing rank's peers may still wait on the group
        destroy_process_group_at_exit()
    return summary


def train_step(cfg: Config, engine, objective: Objective, expert_load: ExpertLoadTracker, heartbeat: Heartbeat,
               step: int) -> dict[str, torch.Tensor]:
    """Optimizer step `step` over grad_accum_steps micro batches; returns the objective's scalars averaged over
    them (tensors, no sync)."""
    engine.train()
    sums: dict[str, torch.Tensor] = {}
    for _ in range(cfg.train.grad_accum_steps):
        heartbeat.enter("forward (MoE all-to-all)", step)
        loss, scalars = objective.micro_step(engine)
        expert_load.accumulate()
        heartbeat.enter("backward (all-to-all, gradient reduce)")
        engine.backward(loss)
        heartbeat.enter("optimizer step (gradient norm all-reduce)")
        engine.step()
        sums = {name: sums.get(name, 0.0) + value for name, value in scalars.items()}
    return {name: value / cfg.train.grad_accum_steps for name, value in sums.items()}


def mean_over_ranks(values: torch.Tensor) -> list[float]:
    """Average a few logged scalars over ranks (on log steps only: one small all-reduce)."""
    values = values.detach().float().clone()
    torch.distributed.all_reduce(values)
    return (values / torch.distributed.get_world_size()).tolist()


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)
