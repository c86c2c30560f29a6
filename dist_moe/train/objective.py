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
from dist_moe.data.sampler import MixtureSampler
from dist_moe.model.loss import cross_entropy, with_router_losses
from dist_moe.train.engine import DistContext


class Objective(Protocol):
    sampler: MixtureSampler  # anything with state_dict/load_state_dict: its position is saved with checkpoints
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
    return LanguageModeling(cfg, ctx, prepared_manifest(cfg, run_dir, ctx))


def _init_tokenizer(cfg: Config):
    """The tokenizer of the transformers folder the model starts from (init.from_hf / init.upcycle_from), if any."""
    if not (cfg.init.from_hf or cfg.init.upcycle_from):
        return None
    from dist_moe.hf import load as hf_load

    return hf_load.init_tokenizer(cfg)


def prepared_manifest(cfg: Config, run_dir: Path, ctx: DistContext):
    """The prepared data's manifest (docs/data.md): rank 0 prepares it (or finds it cached; on Ray Data where
    the corpus is large), then every rank reads it from the run dir's record."""
    if ctx.is_main:
        prepare_data(cfg.data, run_dir, show_progress=True, tokenizer=_init_tokenizer(cfg), cluster_cfg=cfg.cluster)
    torch.distributed.barrier()
    return load_prepared(run_dir).manifest


class LanguageModeling:
    """Pretraining: mean next-token cross-entropy on windows drawn from the prepared sources' token shards,
    each source in proportion to its mixture weight; evaluated per source on its held-out documents."""

    def __init__(self, cfg: Config, ctx: DistContext, manifest):
        self.cfg, self.ctx, self.vocab_size = cfg, ctx, manifest.vocab_size
        self.unigram_entropy_nats = manifest.unigram_entropy_nats
        shape = dict(seq_len=cfg.data.seq_len, batch_size=cfg.train.micro_batch_size, rank=ctx.rank,
                     world_size=ctx.world_size)
        self.sampler = MixtureSampler(manifest, "train", seed=cfg.train.seed, **shape)
        self.val = MixtureSampler(manifest, "val", seed=0, **shape)
        self.tokens_per_micro_batch = cfg.train.micro_batch_size * cfg.data.seq_len

    def start(self, engine) -> None:
        pass

    def micro_step(self, engine) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = (t.to(self.ctx.device, non_blocking=True) for t in self.sampler.next_batch())
        out = engine(x)
        return with_router_losses(self.cfg.moe, cross_entropy(out.logits, y), out)

    def window_scalars(self) -> dict[str, float]:
        """data/tokens/<source>: tokens drawn per source since step 0 (counted on the host, no sync); logged
        with each log window by the loop when an objective has this method."""
        return self.sampler.tokens_seen_scalars()

    @torch.no_grad()
    def evaluate(self, engine) -> dict[str, float]:
        """val/loss/<source>: mean cross-entropy over a fixed set of the source's val windows (the same every
        time), averaged over ranks; val/loss: their mean weighted by the mixture weights, so held-out sources
        (weight 0) appear only under their own name."""
        cfg, ctx, val = self.cfg, self.ctx, self.val
        engine.eval()
        totals = torch.zeros(len(val.sources), device=ctx.device)
        for i, source in enumerate(val.sources):
            for x, y in val.eval_batches(cfg.train.eval_batches, source):
                x, y = x.to(ctx.device), y.to(ctx.device)
                totals[i] += cross_entropy(engine(x).logits, y)
        torch.distributed.all_reduce(totals)  # one for all sources
        losses = {source: total / (cfg.train.eval_batches * ctx.world_size)
                  for source, total in zip(val.sources, totals.tolist())}
        scores = {f"val/loss/{val.names[source]}": loss for source, loss in losses.items()}
        weights = {source: float(val.weights[source]) for source in val.sources if val.weights[source] > 0}
        scores["val/loss"] = sum(weights[j] * losses[j] for j in weights) / sum(weights.values())
        return scores

    def describe(self, scores: dict[str, float]) -> str:
        per_source = [f"{name.removeprefix('val/loss/')} {loss:.4f}" for name, loss in scores.items()
                      if name.startswith("val/loss/")]
        return f"val loss {scores['val/loss']:.4f}" + (f" ({', '.join(per_source)})" if len(per_source) > 1 else "")

    def summary(self, scores: dict[str, float]) -> dict:
        """val_loss and the unigram entropy (the loss to beat); with several sources also val_loss per source."""
        by_source = {name.removeprefix("val/loss/"): loss for name, loss in scores.items()
                     if name.startswith("val/loss/")}
        return {"val_loss": scores.get("val/loss", float("nan")), "unigram_entropy": self.unigram_entropy_nats,
                **({"val_loss_by_source": by_source} if len(self.val.sources) > 1 else {})}
