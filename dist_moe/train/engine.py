"""Process group, device and the DeepSpeed engine: everything that must happen before the first step.

DeepSpeed owns the optimizer state, ZeRO partitioning, bf16, gradient accumulation and clipping, the LR
schedule and the checkpoint files. dist_moe hands it the plain model with DeepSpeed's MoE contract applied
(train/deepspeed_moe.py), an AdamW whose parameter groups keep expert parameters apart (so ZeRO reduces
them over the expert-data-parallel group) and a LambdaLR. deepspeed is first imported in `init_distributed`,
once the device is decided: DeepSpeed picks its accelerator at that import (DS_ACCELERATOR).
"""

from __future__ import annotations

import atexit
import contextlib
import io
import math
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch

from dist_moe.config import Config, check_world_size, grad_accum_dtype, use_bf16
from dist_moe.parallel.groups import skip_shm_comm_op
from dist_moe.train.deepspeed_moe import apply_deepspeed_moe


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_process_group: bool  # created here (not by Ray Train): destroyed at exit once a run completes

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device_type(cfg: Config) -> str:
    if cfg.train.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        from dist_moe.config import ConfigError

        raise ConfigError("config key 'train.device' = 'cuda': no CUDA device is visible")
    return cfg.train.device


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def destroy_process_group_at_exit() -> None:
    """At interpreter exit, not when the run returns: DeepSpeed keeps the group in its own globals, so a second
    run in the same process (a notebook, a test) must find it still there."""
    def destroy() -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    atexit.register(destroy)


def process_group_timeout(cfg: Config) -> timedelta:
    """After this a blocked gloo collective raises and NCCL's own watchdog aborts the process: a backstop well
    behind the heartbeat watchdog (cluster.hang_timeout_s), which names the stopped ranks first. Never below
    30 minutes (torch's gloo default): ranks wait at a barrier for as long as rank 0 takes to tokenize the corpus."""
    return timedelta(seconds=max(1800.0, 2 * cfg.cluster.hang_timeout_s))


def init_distributed(cfg: Config) -> DistContext:
    """Join (or create) the process group: env:// under --nproc, Ray's group under Ray Train, else 1 rank.

    The first import of deepspeed in a run happens here, after DS_ACCELERATOR is set for train.device=cpu
    (also on a machine with GPUs; a DS_ACCELERATOR set by the user wins). Nothing imported before it
    imports deepspeed: tests/train/test_deepspeed_import.py checks that.
    """
    device_type = pick_device_type(cfg)
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    owns_process_group = not torch.distributed.is_initialized()
    if owns_process_group and "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
        if owns_process_group:  # bound to this rank's GPU, so NCCL need not guess it from the rank
            torch.distributed.init_process_group("nccl", device_id=device, timeout=process_group_timeout(cfg))
    import deepspeed

    skip_shm_comm_op(deepspeed)
    backend = "nccl" if device_type == "cuda" else "gloo"
    with contextlib.redirect_stdout(io.StringIO()):  # verbose=False leaves prints; stdout is the product's
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   timeout=process_group_timeout(cfg))
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    check_world_size(cfg, world_size)
    return DistContext(rank, world_size, local_rank, device, owns_process_group)


def lr_lambda(cfg: Config):
    """LR factor of the step taken after `done` steps (LambdaLR's epoch): linear warmup to train.lr over
    warmup_steps, then cosine decay to lr * min_lr_ratio, which the last step (max_steps) applies."""
    t = cfg.train

    def factor(done: int) -> float:
        step = done + 1  # the step this LR is applied in, counted from 1
        if step <= t.warmup_steps:
            return step / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def follow_schedule(engine, cfg: Config, done: int) -> None:
    """Put this run's LR for the step after `done` into the optimizer. Loading a checkpoint restores the LR the
    saved run would have applied next; a resume with another train.max_steps or train.lr follows its own
    schedule from its first step instead."""
    scheduler = engine.lr_scheduler
    scheduler.base_lrs = [cfg.train.lr] * len(scheduler.base_lrs)
    scheduler.last_epoch = done - 1
    scheduler.step()  # sets every group's lr to base * factor(done) and records it


def optimizer_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only (not norms, biases); expert parameters split into DeepSpeed's MoE groups."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return split_params_into_different_moe_groups_for_optimizer(groups)


def build_engine(cfg: Config, model: torch.nn.Module, ctx: DistContext):
    """Apply DeepSpeed's MoE contract to model (in place), then deepspeed.initialize with our AdamW + LambdaLR;
    returns the DeepSpeedEngine (engine.module is the model)."""
    import deepspeed

    t = cfg.train
    model = apply_deepspeed_moe(model, cfg)
    model.to(ctx.device)
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, t.weight_decay), lr=t.lr,
                                  betas=(t.beta1, t.beta2), eps=1e-8, fused=True)  # one pass, not ~10
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, ctx.world_size, ctx.device.type),
    )
    return engine


def deepspeed_config(cfg: Config, world_size: int, device_type: str) -> dict:
    """The DeepSpeed JSON config this run hands to deepspeed.initialize."""
    t = cfg.train
    ds: dict[str, object] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": use_bf16(cfg, device_type)},
        "steps_per_print": 10**9,  # dist_moe prints its own progress
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,  # our torch AdamW under ZeRO-1/2
    }
    if grad_accum_dtype(cfg, device_type) == "fp32" and use_bf16(cfg, device_type):
        ds["data_types"] = {"grad_accum_dtype": "fp32"}  # DeepSpeed's default is the parameters' dtype
    return ds
