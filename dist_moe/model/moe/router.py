"""Router: a linear gate, fp32 scores, (noisy, biased) top-k selection and the router losses.

Gating follows DeepSpeed's `sharded_moe` (GShard/Switch) where `moe.impl=deepspeed` is the baseline: scores
are the fp32 softmax of the router logits, each token picks the k highest, and the combine weights are
the chosen experts' raw probabilities (renormalised in dispatch, after capacity dropping, where DeepSpeed's
top2gating does it). Beside that baseline (docs/routing.md compares them):
  score=sigmoid:    DeepSeek-V3's sigmoid scores, the k chosen ones normalised to sum to 1;
  balance=aux_free: a per-expert bias added to the scores for selection only (never to the weights), moved
                    after each optimizer step by `end_router_step` (DeepSeek-V3, Wang et al. 2024);
  aux_loss_scope:   the Switch loss's load fractions over the micro batch (DeepSpeed), each sequence, or
                    the global batch (all-reduced over the ranks; Qiu et al. 2025).
On CUDA the baseline gating after the router GEMM runs fused (`kernels/moe_router.py`); `top_k_gating` below
is its PyTorch reference. Every other policy runs the PyTorch path on every device.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dist_moe.kernels.moe_router import fused_router, router_logits

NOISE_POLICIES = ("none", "learned", "jitter", "rsample")


class Gating(NamedTuple):
    """What the router hands to dispatch. T tokens, E experts, k choices.

    weights (T, k) fp32: combine weight of each choice; indices (T, k) int64: chosen experts, best first.
    aux_loss, z_loss: () fp32 (unweighted); stats (2,) fp32 no grad: see router_stats.
    scores (T, E) fp32: every expert's score for the token, softmax probabilities or sigmoid scores, never
    normalised over the chosen k: expert choice weighs by them, rerouting weighs moved choices from them
    (gate_weights); selection (T, E) fp32: what experts are ranked by (scores + bias + selection noise).
    Both None on the fused CUDA path, which serves only the baseline policy (no rerouting, no expert choice).
    """

    weights: torch.Tensor
    indices: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    stats: torch.Tensor
    scores: Optional[torch.Tensor] = None
    selection: Optional[torch.Tensor] = None


def assignment_counts(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E,) fp32 assignments counted by the Switch loss: for k <= 2 each token's first choice
    (DeepSpeed's top1gating/top2gating), for k >= 3 all T*k (topkgating). No bincount: it syncs on CUDA."""
    chosen = indices[..., :1] if indices.shape[-1] <= 2 else indices
    experts = torch.arange(num_experts, device=indices.device)
    return (chosen[..., None] == experts).flatten(0, -2).sum(0).float()


def load_balancing_loss(probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Switch-style aux loss `E * sum_e f_e * P_e`, as DeepSpeed's gating functions compute it.

    P_e: mean router probability of expert e over the T tokens. f_e: the fraction of the counted
    assignments (see assignment_counts) that go to e. Counted before capacity dropping. 1 when balanced.
    """
    counts = assignment_counts(indices, probs.shape[1])
    return probs.shape[1] * torch.sum(counts / counts.sum() * probs.mean(dim=0))


def sequence_load_balancing_loss(probs: torch.Tensor, indices: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """The Switch loss of each sequence on its own (f and P over its tokens), averaged over sequences:
    penalises an expert that one sequence floods even when the batch as a whole is balanced."""
    probs = probs.view(num_sequences, -1, probs.shape[1])  # (B, S, E)
    indices = indices.view(num_sequences, -1, indices.shape[1])  # (B, S, k)
    return torch.stack([load_balancing_loss(p, i) for p, i in zip(probs, indices)]).mean()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2 (keeps router logits small)."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def router_stats(probs: torch.Tensor) -> torch.Tensor:
    """(2,) fp32, no grad: (sum over tokens of the routing distribution's entropy in nats, sum of top-1 probs)."""
    probs = probs.detach()
    return torch.stack([torch.special.entr(probs).sum(), probs.max(dim=-1).values.sum()])


def top_k_gating(logits: torch.Tensor, top_k: int, scores: Optional[torch.Tensor] = None):
    """logits (T, E) fp32 -> (weights (T, k) fp32, indices (T, k) int64, aux_loss, z_loss, stats (2,)): the k
    experts of highest `scores` (default: the softmax probabilities), most preferred first, weighted by
    their probabilities. The reference of kernels.moe_router.fused_router."""
    probs = torch.softmax(logits, dim=-1)
    indices = torch.topk(probs if scores is None else scores, top_k, dim=-1).indices  # (T, k)
    weights = probs.gather(1, indices)
    return weights, indices, load_balancing_loss(probs, indices), router_z_loss(logits), router_stats(probs)


def gate_weights(scores: torch.Tensor, indices: torch.Tensor, score: str) -> torch.Tensor:
    """(T, k) combine weights of the experts `indices` (T, k) from the router's (T, E) `scores`: softmax, the
    probabilities; sigmoid, the k scores normalised to sum 1 (DeepSeek-V3; k=1 gets 1). The one rule for
    chosen and rerouted choices alike, so Gating.scores stay raw for expert choice."""
    assert score in ("softmax", "sigmoid"), score
    weights = scores.gather(1, indices)
    if score == "sigmoid":
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=1e-20)
    return weights


def gumbel_selection(scores: torch.Tensor, gumbel: torch.Tensor, top_k: int) -> torch.Tensor:
    """DeepSpeed's RSample, (T, E) selection scores: k=1 (top1gating) samples the only choice (scores +
    Gumbel noise); k >= 2 keeps the first choice clean and samples the others among the rest, as
    top2gating's second-expert sampling does (Gumbel-top-k for k >= 3, which DeepSpeed does not have).
    The noise scale is that of logits: `scores` are the logits here."""
    if top_k == 1:
        return scores + gumbel
    first = scores.argmax(dim=-1, keepdim=True)
    noisy = scores + gumbel
    return noisy.scatter(1, first, float("inf"))  # the clean argmax ranks first, the rest by noisy score


class Router(nn.Module):
    """Linear gate (no bias) routing each of T tokens to k of E experts; forward(x (T, D)) -> Gating.

    Logits are fp32 (bf16 x and weight on CUDA: tensor cores, fp32 output). Noise applies in training only
    and draws from `self.generator`, which the owner seeds and checkpoints: learned = Shazeer et al. 2017
    (logits + N(0,1) * softplus(x W_noise)); jitter = DeepSpeed's multiplicative_jitter on the router
    input; rsample = Gumbel noise for selection only (see gumbel_selection), weights from the clean scores.
    `selection_bias` (balance=aux_free|both) is a buffer: checkpointed with the model, kept in fp32 whatever
    the model's dtype, changed only by `end_step`. (Its name avoids "expert": DeepSpeed's checkpointing moves
    every MoE-module key containing that word into the per-expert files.)
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, noise: str = "none", noise_eps: float = 1e-2,
                 seed: int = 0, score: str = "softmax", balance: str = "aux", aux_loss_scope: str = "micro_batch",
                 aux_loss_accumulate: bool = False, keep_scores: bool = False):
        super().__init__()
        assert noise in NOISE_POLICIES, noise
        self.num_experts, self.top_k, self.noise, self.noise_eps = num_experts, top_k, noise, noise_eps
        self.score, self.balance = score, balance
        self.aux_loss_scope, self.aux_loss_accumulate = aux_loss_scope, aux_loss_accumulate
        self.keep_scores = keep_scores  # rerouting and expert choice read Gating.scores and .selection
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, d_model)) if noise == "learned" else None
        if balance in ("aux_free", "both"):
            self.register_buffer("selection_bias", torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.selection_bias = None
        # (E,) selections of this step's training forwards (bias update) and (E + 1,) the global batch's
        # counted assignments and their total so far (aux_loss_accumulate); both reset by end_step()
        self.step_selections = torch.zeros(num_experts)
        self.step_counts = torch.zeros(num_experts + 1)
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)

    def _apply(self, fn, *args, **kwargs):
        """Keep the noise generator on the parameters' device (same seed), so noise is drawn where it is used;
        keep the bias and the step counters in fp32 (a bf16 bias could not take 1e-3 steps near 1)."""
        fp32 = {"selection_bias": self.selection_bias, "step_selections": self.step_selections,
                "step_counts": self.step_counts}
        super()._apply(fn, *args, **kwargs)
        for name, tensor in fp32.items():
            if tensor is not None:
                moved = tensor.to(self.weight.device)
                if name == "selection_bias":
                    self._buffers[name] = moved
                else:
                    setattr(self, name, moved)
        if self.generator.device != self.weight.device:
            seed = self.generator.initial_seed()
            self.generator = torch.Generator(self.weight.device)
            self.generator.manual_seed(seed)
        return self

    def _uniform(self, like: torch.Tensor, low: float, high: float) -> torch.Tensor:
        u = torch.rand(like.shape, generator=self.generator, device=like.device, dtype=torch.float32)
        return low + (high - low) * u

    def _is_baseline(self) -> bool:
        """The policy the fused CUDA kernels implement: softmax, no bias, micro-batch aux loss, top-k only."""
        return (self.score == "softmax" and self.selection_bias is None and self.aux_loss_scope == "micro_batch"
                and self.balance == "aux" and not self.keep_scores)

    def forward(self, x: torch.Tensor, num_sequences: int = 1) -> Gating:
        """x (T, D): num_sequences sequences of equal length, back to back (for aux_loss_scope=sequence)."""
        noisy = self.training and self.noise != "none"
        if noisy and self.noise == "jitter":
            x = x.float() * self._uniform(x, 1.0 - self.noise_eps, 1.0 + self.noise_eps)
        logits = router_logits(x, self.weight)  # (T, E) fp32
        if noisy and self.noise == "learned":
            std = F.softplus(router_logits(x, self.noise_weight))
            normal = torch.randn(logits.shape, generator=self.generator, device=logits.device)
            logits = logits + normal * std
        rsample = noisy and self.noise == "rsample"
        if logits.is_cuda and logits.shape[1] <= 256 and self._is_baseline() and not rsample:
            return Gating(*fused_router(logits, self.top_k))  # the kernels hold a token's E logits in registers
        probs = torch.softmax(logits, dim=-1)
        scores = probs if self.score == "softmax" else torch.sigmoid(logits)
        selection = scores.detach()
        if self.selection_bias is not None:
            selection = selection + self.selection_bias
        if rsample:  # Gumbel-max samples the softmax from logits (config: only with softmax and no bias)
            gumbel = -torch.log(-torch.log(self._uniform(logits, 1e-20, 1.0)))
            selection = gumbel_selection(logits.detach(), gumbel, self.top_k)
        indices = torch.topk(selection, self.top_k, dim=-1).indices  # (T, k)
        weights = gate_weights(scores, indices, self.score)
        if self.training:
            self.step_selections += (indices[..., None] == torch.arange(self.num_experts, device=indices.device)
                                     ).flatten(0, 1).sum(0).detach().to(self.step_selections.dtype)
        # sigmoid: the aux loss and the statistics see each token's scores normalised over all E (Megatron-Core)
        aux_probs = probs if self.score == "softmax" else scores / scores.sum(dim=-1, keepdim=True).clamp(min=1e-20)
        return Gating(weights, indices, self._aux_loss(aux_probs, indices, num_sequences), router_z_loss(logits),
                      router_stats(aux_probs), scores, selection)

    def _aux_loss(self, probs: torch.Tensor, indices: torch.Tensor, num_sequences: int) -> torch.Tensor:
        if self.balance not in ("aux", "both"):
            return probs.new_zeros(())
        if self.aux_loss_scope == "sequence":
            return sequence_load_balancing_loss(probs, indices, num_sequences)
        if self.aux_loss_scope == "micro_batch" or not self.training:
            return load_balancing_loss(probs, indices)
        # global batch: f counted over every rank's tokens (one small all-reduce over the world group, in
        # which every rank holds distinct tokens); P stays local, so averaging the ranks' gradients (data
        # parallelism) gives the gradient of the loss of the whole batch in one process
        counts = assignment_counts(indices, self.num_experts)
        counts = torch.cat([counts, counts.sum()[None]])  # (E + 1,): per expert, then the total
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        if self.aux_loss_accumulate:
            self.step_counts += counts
            counts = self.step_counts.clone()
        return self.num_experts * torch.sum(counts[:-1] / counts[-1] * probs.mean(dim=0))

    def state(self) -> tuple:
        """What a forward changes besides its outputs (noise generator, step counters), for a redone forward."""
        return self.generator.get_state(), self.step_selections.clone(), self.step_counts.clone()

    def set_state(self, state: tuple) -> None:
        generator, selections, counts = state
        self.generator.set_state(generator)
        self.step_selections.copy_(selections), self.step_counts.copy_(counts)

    @torch.no_grad()
    def end_step(self, selections: Optional[torch.Tensor], update_rate: float) -> None:
        """After an optimizer step: with the step's global selection counts (E,) (this router's
        `step_selections` summed over all ranks), bias += rate * sign(mean - load); then reset the counters."""
        if self.selection_bias is not None and selections is not None:
            step = update_rate * torch.sign(selections.mean() - selections)
            self.selection_bias += step.to(self.selection_bias.dtype)
        self.step_selections.zero_()
        self.step_counts.zero_()


@torch.no_grad()
def end_router_step(model: nn.Module, update_rate: float) -> None:
    """Call after every optimizer step, on every rank: moves the selection biases of `model`'s routers by the
    step's load summed over all micro batches and all ranks (one all-reduce of (layers, E) counts, only
    when some router has a bias), and resets their per-step counters."""
    routers = [module for module in model.modules() if isinstance(module, Router)]
    biased = [router for router in routers if router.selection_bias is not None]
    loads = torch.stack([router.step_selections for router in biased]) if biased else None  # (L, E)
    if loads is not None and dist.is_available() and dist.is_initialized():
        dist.all_reduce(loads)
    for router in routers:
        router.end_step(loads[biased.index(router)] if router in biased else None, update_rate)
