"""The worker body `run(cfg)`: the only training loop in dist_moe, the same in one process, under
`dist-moe train --nproc N` and inside Ray Train workers. It reads as torchtitan's Trainer does: `setup` (what
a run resolves and builds), `train_step`, the logging window (`LogWindow`) and the loop (`train`). What it
optimises (pretraining or DPO) is an objective (train/objective.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
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
        return train(setup(cfg, ctx, heartbeat), stop, heartbeat, grow)
    finally:
        heartbeat.close()


@dataclass
class Trainer:
    """What setup resolved and built; the loop reads nothing else."""

    cfg: Config  # resolved: the init folder's shape, the tokenizer's vocab size (what config.yaml records)
    ctx: DistContext
    run_dir: Path
    objective: Objective
    model: Transformer  # engine.module
    engine: object  # deepspeed.DeepSpeedEngine
    sampler: object  # the objective's; its position is saved with checkpoints
    step: int  # the step resumed from; 0 for a fresh run
    total_params: int
    active_params: int  # per token


def setup(cfg: Config, ctx: DistContext, heartbeat: Heartbeat) -> Trainer:
    """Resolve the config (init folder, tokenizer), prepare the objective's data, build the model and engine,
    load the newest checkpoint when resuming; then record the resolved config in the run dir."""
    run_dir = Path(cfg.run_dir)
    heartbeat.enter("preparing data", watched=False)
    cfg = with_init_config(cfg)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    objective = build_objective(cfg, run_dir, ctx)
    cfg = with_vocab_size(cfg, objective.vocab_size)
    resuming = cfg.resume == "auto" and bool(checkpoint.candidates(run_dir))
    if resuming:
        check_resumable(from_yaml_file(run_dir / "config.yaml"), cfg)
    model = build_model(cfg, ctx, init_weights=not resuming)
    total_params, active_params = num_parameters(model)
    engine = build_engine(cfg, model, ctx)
    objective.start(engine)
    trainer = Trainer(cfg, ctx, run_dir, objective, model, engine, objective.sampler, 0, total_params, active_params)
    if resuming:
        heartbeat.enter("checkpoint load")
        trainer.step = resume(trainer)
    torch.distributed.barrier()
    if ctx.is_main:  # only now: a resume that found no usable checkpoint leaves the run's config as it was
        write_bytes_atomic(run_dir / "config.yaml", to_yaml(cfg).encode())
    return trainer


def with_init_config(cfg: Config) -> Config:
    """cfg with the model's shape from the transformers folder init.from_hf / init.upcycle_from names, if any."""
    if not (cfg.init.from_hf or cfg.init.upcycle_from):
        return cfg
    from dist_moe.hf import load as hf_load

    return hf_load.apply_init_config(cfg)


def with_vocab_size(cfg: Config, tokenizer_vocab_size: int) -> Config:
    """cfg with model.vocab_size the tokenizer's where it is 0; refused where the tokenizer has more pieces."""
    if cfg.model.vocab_size == 0:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=tokenizer_vocab_size))
    if tokenizer_vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"tokenizer of {tokenizer_vocab_size} pieces > model.vocab_size={cfg.model.vocab_size} "
                          "(init.upcycle_from: give the folder the tokenizer.model it was trained with)")
    return cfg


def build_model(cfg: Config, ctx: DistContext, init_weights: bool) -> Transformer:
    """The model, initialised identically on every rank (from the init folder's weights when init.* names one
    and init_weights), with the bounded exchange's check applied where moe.exchange=bounded."""
    torch.manual_seed(cfg.train.seed)  # identical non-expert init on every rank
    model = apply_bounded_exchange(Transformer(cfg, ep_group=expert_parallel_group(cfg.moe.ep_size)))
    if init_weights and (cfg.init.from_hf or cfg.init.upcycle_from):
        from dist_moe.hf import load as hf_load

        hf_load.load_init_weights(model, cfg)
        say(ctx, f"initialised from {cfg.init.from_hf or cfg.init.upcycle_from}"
                 + (" (upcycled: every expert a copy of the dense FFN)" if cfg.init.upcycle_from else ""))
    return model


def resume(t: Trainer) -> int:
    """Load the newest verified checkpoint into the engine, the sampler and the RNGs; returns its step."""
    step, state = checkpoint.load(t.engine, t.run_dir, t.ctx, t.cfg.moe.ep_size)
    follow_schedule(t.engine, t.cfg, step)
    t.sampler.load_state_dict(state["sampler"])
    if "rng" in state:
        checkpoint.set_rng_state(state["rng"], t.model)
    say(t.ctx, f"resumed from {t.run_dir / 'checkpoints'} at step {step}")
    return step


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


class LogWindow:
    """The steps since the last log line: their throughput, and what one line logs (train scalars averaged over
    ranks, LR, gradient norm, MFU, redone forwards of a bounded exchange, the objective's window scalars)."""

    def __init__(self, t: Trainer, metrics: Metrics):
        cfg, ctx = t.cfg, t.ctx
        self.t, self.metrics = t, metrics
        self.tokens_per_step = t.objective.tokens_per_micro_batch * cfg.train.grad_accum_steps * ctx.world_size
        self.flops_per_token = training_flops_per_token(cfg, t.active_params)
        self.peak = peak_flops(ctx.device)
        self.overflows = overflows(t.engine.module)  # moe.exchange=bounded: forwards redone so far
        self.start, self.tokens = time.perf_counter(), 0

    def add_step(self) -> None:
        self.tokens += self.tokens_per_step

    def log(self, step: int, train_scalars: dict[str, torch.Tensor], lr: float) -> None:
        """Log the window ending at `step` (a collective: every rank calls it) and start the next one."""
        cfg, ctx = self.t.cfg, self.t.ctx
        tokens_per_second = self.tokens / (time.perf_counter() - self.start)
        means = mean_over_ranks(torch.stack(list(train_scalars.values())))
        scalars = {f"train/{name}": value for name, value in zip(train_scalars, means)} | {
            "train/lr": lr, "train/grad_norm": _grad_norm(self.t.engine), "perf/tokens_per_second": tokens_per_second,
            "perf/mfu": mfu(self.flops_per_token, tokens_per_second / ctx.world_size, self.peak),
        }
        scalars |= self.exchange_scalars() | self.objective_scalars()
        self.metrics.log(step, scalars)
        say(ctx, f"step {step:>6}/{cfg.train.max_steps} | loss {scalars['train/loss']:.4f} | "
                 f"aux {scalars['train/aux_loss']:.3f} | lr {scalars['train/lr']:.2e} | "
                 f"{tokens_per_second:,.0f} tok/s" + (f" | MFU {scalars['perf/mfu']:.1%}" if self.peak else ""))
        self.start, self.tokens = time.perf_counter(), 0

    def exchange_scalars(self) -> dict[str, float]:
        """moe.exchange=bounded: forwards redone in this window (evaluations included)."""
        if self.t.cfg.moe.exchange != "bounded":
            return {}
        before, self.overflows = self.overflows, overflows(self.t.engine.module)
        return {"moe/bound_overflows": self.overflows - before}

    def objective_scalars(self) -> dict[str, float]:
        """What the objective logs once per window (an optional `window_scalars()`), e.g. per-source losses."""
        window_scalars = getattr(self.t.objective, "window_scalars", None)
        return window_scalars() if window_scalars is not None else {}


class Checkpoints:
    """Saves the run's checkpoints (engine, sampler position, EP size) and keeps the wall-clock schedule."""

    def __init__(self, t: Trainer, heartbeat: Heartbeat):
        self.t, self.heartbeat, self.clock = t, heartbeat, SaveClock(t.cfg.ckpt.every_minutes)

    def save(self, step: int) -> None:
        t = self.t
        self.heartbeat.enter("checkpoint save")
        state = {"step": step, "sampler": t.sampler.state_dict(), "ep_size": t.cfg.moe.ep_size}
        path = checkpoint.save(t.engine, t.run_dir, step, state, t.ctx, t.cfg.ckpt.keep)
        self.clock.saved()
        say(t.ctx, f"checkpoint {path}")

    def after_step(self, step: int, stop: StopRequest, grow) -> bool:
        """True when a rank was asked to stop (the caller saves and ends); else a periodic save, or one before
        Ray Train grows the worker group (`grow`), whose restart it then waits for."""
        cfg, ctx = self.t.cfg, self.t.ctx
        self.heartbeat.enter("stop check (all-reduce)")
        stop_now, time_due = any_rank(ctx, stop.requested, self.clock.due())
        if stop_now:
            say(ctx, f"stop requested: saving step {step} and exiting")
            return True
        more = step < cfg.train.max_steps
        periodic = more and (time_due or (cfg.ckpt.every and step % cfg.ckpt.every == 0))
        if periodic:
            self.save(step)
        if grow is not None and more and grow.pending(ctx):
            say(ctx, f"more workers can start: saving step {step} before Ray Train resizes the worker group")
            if not periodic:  # else saved just above
                self.save(step)
            self.heartbeat.enter("waiting for Ray Train to resize", watched=False)
            grow.wait()
        return False


def train(t: Trainer, stop: StopRequest, heartbeat: Heartbeat, grow) -> dict:
    """The loop, from t.step to cfg.train.max_steps (or a stop): steps, log windows, expert load, evaluations and
    checkpoints; then the last save and summary.json. Returns the summary."""
    cfg, engine = t.cfg, t.engine
    metrics = Metrics(t.run_dir, enabled=t.ctx.is_main, tensorboard=cfg.log.tensorboard, start_step=t.step)
    expert_load = ExpertLoadTracker(engine.module, cfg.moe.num_experts)
    window, checkpoints = LogWindow(t, metrics), Checkpoints(t, heartbeat)
    say(t.ctx, banner(t))
    scores: dict[str, float] = {}  # no evaluation yet (a stop before the first one): null in summary.json
    if t.step == 0:  # where training starts from, as a baseline for every later evaluation
        scores = evaluate(t, metrics, heartbeat, 0)
    step, stopped = t.step, False
    while step < cfg.train.max_steps and not stopped:
        lr = engine.get_lr()[0]  # the LR this step applies; engine.step() moves it on to the next step's
        train_scalars = train_step(cfg, engine, t.objective, expert_load, heartbeat, step + 1)
        end_router_step(engine.module, cfg.moe.bias_update_rate)  # aux-free bias: the whole step's load
        step += 1
        window.add_step()
        last = step == cfg.train.max_steps
        if step % cfg.log.every == 0 or last:
            heartbeat.enter("logging (all-reduce)")
            window.log(step, train_scalars, lr)
        if step % cfg.log.expert_every == 0 or last:
            expert_load.log(metrics.tensorboard, step)
        if step % cfg.train.eval_every == 0 or last:
            scores = evaluate(t, metrics, heartbeat, step)
        stopped = checkpoints.after_step(step, stop, grow)
    checkpoints.save(step)
    heartbeat.enter("finished", watched=False)
    metrics.close()
    return finish(t, step, not stopped, scores, window)


def banner(t: Trainer) -> str:
    cfg, ctx = t.cfg, t.ctx
    return (f"model: {t.total_params / 1e6:.2f}M parameters, {t.active_params / 1e6:.2f}M active per token; "
            f"{ctx.world_size} rank(s) on {ctx.device.type}, EP={cfg.moe.ep_size}, ZeRO-{cfg.train.zero_stage}"
            + (f"; hierarchical all-to-all over nodes of {node_layout(cfg.moe.ep_size).sizes} EP ranks"
               if cfg.moe.a2a == "hierarchical" and cfg.moe.ep_size > 1 else "")
            + (f"; gradients summed over {cfg.train.grad_accum_steps} micro steps in "
               f"{grad_accum_dtype(cfg, ctx.device.type)}" if cfg.train.grad_accum_steps > 1 else ""))


def evaluate(t: Trainer, metrics: Metrics, heartbeat: Heartbeat, step: int) -> dict[str, float]:
    heartbeat.enter("evaluation")
    scores = t.objective.evaluate(t.engine)
    metrics.log(step, scores)
    say(t.ctx, f"step {step:>6} | {t.objective.describe(scores)}")
    return scores


def finish(t: Trainer, step: int, completed: bool, scores: dict[str, float], window: LogWindow) -> dict:
    """summary.json (strict JSON: a diverged run's NaN loss is null); the process group is released only after a
    completed run (a failing rank's peers may still wait on it)."""
    cfg, tokens = t.cfg, step * window.tokens_per_step
    summary = {
        "step": step, "max_steps": cfg.train.max_steps, "completed": completed,
        "n_total": t.total_params, "n_active": t.active_params, "num_experts": cfg.moe.num_experts,
        "tokens": tokens, "flops": tokens * window.flops_per_token, **t.objective.summary(scores),
    }
    summary = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in summary.items()}
    if t.ctx.is_main:
        write_bytes_atomic(t.run_dir / "summary.json", (json.dumps(summary, indent=2, allow_nan=False) + "\n").encode())
        print(f"run dir: {t.run_dir}\nTensorBoard: dist-moe tensorboard {t.run_dir}", flush=True)
    if t.ctx.owns_process_group:
        destroy_process_group_at_exit()
    return summary


def mean_over_ranks(values: torch.Tensor) -> list[float]:
    """Average a few logged scalars over ranks (on log steps only: one small all-reduce)."""
    values = values.detach().float().clone()
    torch.distributed.all_reduce(values)
    return (values / torch.distributed.get_world_size()).tolist()


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)
