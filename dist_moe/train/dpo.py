"""Direct Preference Optimization (Rafailov et al. 2023) as an objective of the one training loop.

The policy starts from a pretraining run's checkpoint (dpo.parent_checkpoint); the reference is a frozen copy
of the same weights, run without gradient in eval mode (as TRL runs its reference model). Per pair, with
logps the sum of a response's token log-probabilities given the prompt:

  h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
  sigmoid: -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)   (eps > 0: conservative DPO)
  ipo:     (h' - 1 / (2 * beta))^2, h' the same difference of per-token averages (TRL normalises IPO by length)

plus the MoE load-balancing and z losses of the policy's forward. Metrics carry TRL's names: rewards/chosen
= beta * (policy_chosen - ref_chosen), rewards/rejected, rewards/accuracies (chosen reward > rejected),
rewards/margins, logps/chosen, logps/rejected (the policy's summed log-probabilities).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from dist_moe.config import (Config, ConfigError, DPOConfig, WEIGHT_SHAPING, check_resumable, from_yaml_file,
                             load_config)
from dist_moe.data import Tokenizer
from dist_moe.data.preferences import PreferenceSampler, collate, read_preferences, split_pairs, tokenize_pairs
from dist_moe.model.loss import with_router_losses
from dist_moe.model.transformer import Transformer
from dist_moe.parallel.groups import expert_parallel_group
from dist_moe.train import checkpoint
from dist_moe.train.deepspeed_moe import apply_deepspeed_moe
from dist_moe.train.engine import DistContext

# `dist-moe dpo` starts from the parent's config with these, then the user's overrides: preference tuning
# takes far fewer and smaller steps than pretraining.
DPO_DEFAULTS = ("train.max_steps=100", "train.lr=3e-4", "train.warmup_steps=10", "train.min_lr_ratio=1.0",
                "train.weight_decay=0.0", "train.eval_every=25", "log.every=5", "ckpt.every=0", "resume=never")
PARENT_FILES = ("tokenizer.model", "data.json")  # what `dist-moe generate` and resuming read from a run dir


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """logits (N, T, V), targets and mask (N, T) -> (N,) float32: the summed log-probability of the masked
    targets (the response tokens) of each row."""
    logps = torch.gather(F.log_softmax(logits.float(), dim=-1), 2, targets.unsqueeze(2)).squeeze(2)  # (N, T)
    return (logps * mask).sum(dim=1)


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor,
                    cfg: DPOConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses (B,) and TRL's metrics (means over the B pairs, detached) from summed log-probs (B,)
    and the responses' token counts (B,), which IPO's per-token averages need."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if cfg.loss == "sigmoid":
        h = cfg.beta * (chosen_ratio - rejected_ratio)
        losses = -(1 - cfg.label_smoothing) * F.logsigmoid(h) - cfg.label_smoothing * F.logsigmoid(-h)
    else:
        h = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (h - 1 / (2 * cfg.beta)) ** 2
    chosen_rewards, rejected_rewards = cfg.beta * chosen_ratio.detach(), cfg.beta * rejected_ratio.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": policy_chosen.detach().mean(), "logps/rejected": policy_rejected.detach().mean(),
    }
    return losses, metrics


class DPO:
    """The DPO objective: pairs from data.prefs, the policy from dpo.parent_checkpoint, a frozen reference."""

    def __init__(self, cfg: Config, run_dir: Path, ctx: DistContext):
        parent = Path(cfg.dpo.parent)
        if ctx.is_main:
            for name in PARENT_FILES:
                if not (run_dir / name).exists():
                    shutil.copyfile(parent / name, run_dir / name)
        torch.distributed.barrier()
        tokenizer = Tokenizer(run_dir / "tokenizer.model")
        self.vocab_size = tokenizer.vocab_size
        pairs = tokenize_pairs(read_preferences(cfg.data.prefs), tokenizer, cfg.data.seq_len)
        self.train_pairs, self.val_pairs = split_pairs(pairs, cfg.dpo.val_fraction, cfg.train.seed)
        self.cfg, self.ctx, self.eos_id = cfg, ctx, tokenizer.eos_id
        self.sampler = PreferenceSampler(self.train_pairs, cfg.train.micro_batch_size, tokenizer.eos_id,
                                         seed=cfg.train.seed, rank=ctx.rank, world_size=ctx.world_size)
        # at most: rows are padded only to the longest row of their batch
        self.tokens_per_micro_batch = 2 * cfg.train.micro_batch_size * cfg.data.seq_len
        self.reference: Transformer | None = None

    def start(self, engine) -> None:
        """Load the parent's weights into the policy (any EP size: DeepSpeed's per-expert files) and freeze a
        copy of them as the reference; a checkpoint of this run, if resuming, then replaces the policy's."""
        path = Path(self.cfg.dpo.parent_checkpoint)
        problem = checkpoint.verify(path) if path.is_dir() else "no such directory"
        if problem:
            raise checkpoint.CheckpointError(f"dpo.parent_checkpoint '{path}': {problem}")
        checkpoint.load_weights(engine, path)
        dtype = next(engine.module.parameters()).dtype
        reference = Transformer(self.cfg, ep_group=expert_parallel_group(self.cfg.moe.ep_size))
        self.reference = apply_deepspeed_moe(reference, self.cfg)  # the engine's module layout and key names
        self.reference.to(self.ctx.device, dtype).load_state_dict(engine.module.state_dict())
        self.reference.requires_grad_(False).eval()

    def micro_step(self, engine) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs, targets, mask = (t.to(self.ctx.device, non_blocking=True) for t in self.sampler.next_batch())
        out = engine(inputs)
        policy = sequence_logps(out.logits, targets, mask)  # (2B,): chosen rows, then rejected rows
        with torch.no_grad():
            ref = sequence_logps(self.reference(inputs).logits, targets, mask)
        losses, metrics = preference_loss(*policy.chunk(2), *ref.chunk(2), *mask.sum(dim=1).chunk(2), self.cfg.dpo)
        loss, scalars = with_router_losses(self.cfg.moe, losses.mean(), out)
        return loss, scalars | metrics

    @torch.no_grad()
    def evaluate(self, engine) -> dict[str, float]:
        """Every held-out pair once: TRL's metrics and the loss as means over pairs (eval/<name>), plus
        eval/logps/accuracies, how often the policy itself gives the chosen response the higher log-prob."""
        engine.eval()
        b, ranks = self.cfg.train.micro_batch_size, self.ctx.world_size
        n = len(self.val_pairs)
        batches = -(-n // (b * ranks))  # every rank runs as many forwards (expert parallelism needs it)
        names = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected", "logps/accuracies")
        sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=self.ctx.device)  # + the pair count
        for i in range(batches):
            first = i * b * ranks + self.ctx.rank * b
            positions = range(first, first + b)
            batch = collate([self.val_pairs[p % n] for p in positions], self.eos_id)
            weight = torch.tensor([float(p < n) for p in positions], device=self.ctx.device)  # wrapped: 0
            inputs, targets, mask = (t.to(self.ctx.device) for t in batch)
            policy = sequence_logps(engine(inputs).logits, targets, mask)
            ref = sequence_logps(self.reference(inputs).logits, targets, mask)
            (pc, pr), (rc, rr), (tc, tr) = policy.chunk(2), ref.chunk(2), mask.sum(dim=1).chunk(2)
            losses, _ = preference_loss(pc, pr, rc, rr, tc, tr, self.cfg.dpo)
            beta = self.cfg.dpo.beta
            per_pair = (losses, beta * (pc - rc), beta * (pr - rr), (pc - rc > pr - rr).float(),
                        beta * ((pc - rc) - (pr - rr)), pc, pr, (pc > pr).float())
            sums += torch.stack([(v * weight).sum() for v in per_pair] + [weight.sum()]).double()
        torch.distributed.all_reduce(sums)
        return {f"eval/{name}": (sums[i] / sums[-1]).item() for i, name in enumerate(names)}

    def describe(self, scores: dict[str, float]) -> str:
        return (f"eval reward accuracy {scores['eval/rewards/accuracies']:.1%}, margin "
                f"{scores['eval/rewards/margins']:.3f}, chosen more likely {scores['eval/logps/accuracies']:.1%}")

    def summary(self, scores: dict[str, float]) -> dict:
        return {"parent": self.cfg.dpo.parent, "parent_checkpoint": self.cfg.dpo.parent_checkpoint,
                "train_pairs": len(self.train_pairs), "held_out_pairs": len(self.val_pairs), **scores}


def dpo_config(parent: Path, overrides: list[str], default_run_dir: str) -> Config:
    """The config of a DPO run starting from run dir `parent`: its config, then DPO_DEFAULTS, then
    `overrides`; the weights' shape must stay the parent's. Records the parent and its newest checkpoint."""
    saved = parent / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"run dir '{parent}' has no config.yaml (is it a dist-moe run dir?)")
    candidates = checkpoint.candidates(parent)
    if not candidates:
        raise checkpoint.CheckpointError(f"{checkpoint.checkpoint_root(parent)}: no checkpoint to start DPO from")
    recorded = ["objective=dpo", f"dpo.parent={parent.resolve()}", f"dpo.parent_checkpoint={candidates[0].resolve()}"]
    cfg = load_config(str(saved), [*DPO_DEFAULTS, f"run_dir={default_run_dir}", *overrides, *recorded])
    check_resumable(from_yaml_file(saved), cfg, WEIGHT_SHAPING, "DPO starts from that run's weights")
    if Path(cfg.run_dir).resolve() == parent.resolve():
        raise ConfigError(f"run_dir '{cfg.run_dir}' is the parent run: DPO writes a new run dir (pick another)")
    read_preferences(cfg.data.prefs)  # a malformed row stops here, before any worker starts
    return cfg
