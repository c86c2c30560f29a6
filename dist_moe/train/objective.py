"""What the one training loop optimises. An objective owns its data (prepared before the model exists), the
loss of one micro batch (the MoE router losses included), its evaluation and what it adds to the summary;
`train/loop.py: run` owns everything else (engine, steps, checkpoints, metrics, stopping).

Two objectives: `LanguageModeling` (pretraining, here) and `DPO` (preference tuning, train/dpo.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from dist_moe.config import Config
from dist_moe.data import load_prepared, prepare_data
from dist_moe.data.sampler import TokenSampler
from dist_moe.model.loss import cross_entropy
from dist_moe.model.transformer import ModelOutput
from dist_moe.train.engine import DistContext


class Objective(Protocol):
    sampler: TokenSampler  # anything with state_dict/load_state_dict: its position is saved with checkpoints
    tokens_per_micro_batch: int  # per rank, for throughput and the summary
    vocab_size: int  # the tokenizer's pieces: the model's vocabulary where model.vocab_size is 0

    def start(self, engine) -> None:
        """Called once the engine exists, before a checkpoint of this run (if any) is loaded into it."""

    def micro_step(self, engine) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward one micro batch: (the loss to backpropagate, scalars to log as train/<name>, no sync)."""

    def evaluate(self, engine) -> dict[str, float]:
        """Held-out scalars (averaged over ranks), logged under their names."""

    def describe(self, scores: dict[str, float]) -> str:
        """One short phrase of `evaluate`'s scores for the progress line."""

    def summary(self, scores: dict[str, float]) -> dict:
        """What this objective adds to summary.json, given the last evaluation."""


def build_objective(cfg: Config, run_dir: Path, ctx: DistContext) -> Objective:
    """The objective cfg.objective names, its data prepared (rank 0 first, then the others)."""
    if cfg.objective == "dpo":
        from dist_moe.train.dpo import DPO

        return DPO(cfg, run_dir, ctx)
    return LanguageModeling(cfg, run_dir, ctx)


def with_router_losses(cfg: Config, loss: torch.Tensor, out: ModelOutput) -> tuple[torch.Tensor, dict]:
    """loss + the weighted MoE load-balancing and z losses, and the three for logging."""
    total = loss + cfg.moe.aux_loss_coef * out.aux_loss + cfg.moe.z_loss_coef * out.z_loss
    return total, {"loss": loss.detach(), "aux_loss": out.aux_loss.detach(), "z_loss": out.z_loss.detach()}


def _init_tokenizer(cfg: Config):
    """The tokenizer of the transformers folder the model starts from (init.from_hf / init.upcycle_from), if any."""
    if not (cfg.init.from_hf or cfg.init.upcycle_from):
        return None
    from dist_moe.hf import load as hf_load

    return hf_load.init_tokenizer(cfg)


class LanguageModeling:
    """Pretraining: mean next-token cross-entropy on windows of the corpus's token shards."""

    def __init__(self, cfg: Config, run_dir: Path, ctx: DistContext):
        if ctx.is_main:
            self.prepared = prepare_data(cfg.data, run_dir, show_progress=True, tokenizer=_init_tokenizer(cfg))
        torch.distributed.barrier()
        if not ctx.is_main:
            self.prepared = load_prepared(run_dir)
        self.vocab_size = self.prepared.vocab_size
        self.cfg, self.ctx = cfg, ctx
        self.sampler = TokenSampler(self.prepared.train_path, cfg.data.seq_len, cfg.train.micro_batch_size,
                                    seed=cfg.train.seed, rank=ctx.rank, world_size=ctx.world_size)
        self.tokens_per_micro_batch = cfg.train.micro_batch_size * cfg.data.seq_len

    def start(self, engine) -> None:
        pass

    def micro_step(self, engine) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = (t.to(self.ctx.device, non_blocking=True) for t in self.sampler.next_batch())
        out = engine(x)
        return with_router_losses(self.cfg, cross_entropy(out.logits, y), out)

    @torch.no_grad()
    def evaluate(self, engine) -> dict[str, float]:
        """Mean cross-entropy over a fixed set of val windows (the same every time), averaged over ranks."""
        cfg, ctx = self.cfg, self.ctx
        engine.eval()
        val = TokenSampler(self.prepared.val_path, cfg.data.seq_len, cfg.train.micro_batch_size, seed=0,
                           rank=ctx.rank, world_size=ctx.world_size)
        total = torch.zeros((), device=ctx.device)
        for x, y in val.eval_batches(cfg.train.eval_batches):
            x, y = x.to(ctx.device), y.to(ctx.device)
            total += cross_entropy(engine(x).logits, y)
        torch.distributed.all_reduce(total)
        return {"val/loss": total.item() / (cfg.train.eval_batches * ctx.world_size)}

    def describe(self, scores: dict[str, float]) -> str:
        return f"val loss {scores['val/loss']:.4f}"

    def summary(self, scores: dict[str, float]) -> dict:
        return {"val_loss": scores.get("val/loss", float("nan")),
                "unigram_entropy": self.prepared.unigram_entropy_nats}
