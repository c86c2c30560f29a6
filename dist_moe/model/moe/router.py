"""Token-choice router: a linear gate, fp32 softmax, noisy top-k selection and the two router losses.

Gating follows DeepSpeed's `sharded_moe` (GShard/Switch) so both implementations route identically:
probabilities are the fp32 softmax of the router logits, and each token picks the k most probable experts.
The combine weights returned here are the raw probabilities of the chosen experts; renormalising them
happens in dispatch, after capacity dropping, exactly where DeepSpeed's top2gating does it.
On CUDA the gating after the router GEMM runs fused (`kernels/moe_router.py`, a few Triton launches);
`top_k_gating` below is its PyTorch reference and the CPU path (where gating stays equal to DeepSpeed's).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dist_moe.kernels.moe_router import fused_router, router_logits

NOISE_POLICIES = ("none", "learned", "jitter", "rsample")


def load_balancing_loss(probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Switch-style aux loss `E * sum_e f_e * P_e`, as DeepSpeed's gating functions compute it.

    P_e: mean router probability of expert e over the T tokens. f_e: for k <= 2, the fraction of tokens
    whose first choice is e (top1gating/top2gating); for k >= 3, the fraction of the T*k assignments that go
    to e (topkgating's `E/k * sum(P * count/T)`). Counted before capacity dropping. Equals 1 when balanced.
    """
    num_experts = probs.shape[1]
    chosen = indices[:, :1] if indices.shape[1] <= 2 else indices
    experts = torch.arange(num_experts, device=indices.device)
    f = (chosen[..., None] == experts).flatten(0, -2).sum(0).float() / chosen.numel()  # bincount syncs on CUDA
    return num_experts * torch.sum(f * probs.mean(dim=0))


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


class Router(nn.Module):
    """Linear gate (no bias) with noisy top-k gating; routes each of T tokens to k of E experts.

    forward(x: (T, D)) -> (weights (T, k) fp32, indices (T, k) int64, aux_loss, z_loss, stats (2,) fp32) as
    top_k_gating returns them. Logits are fp32 (bf16 x and weight on CUDA: tensor cores, fp32 output).
    Noise applies in training only and draws from `self.generator`, which the owner seeds and checkpoints:
    learned = Shazeer et al. 2017 (logits + N(0,1) * softplus(x W_noise)); jitter = DeepSpeed's
    multiplicative_jitter on the router input; rsample = Gumbel noise on the logits for selection only
    (DeepSpeed's RSample, generalised to any k by the Gumbel-top-k trick), weights from the clean softmax.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, noise: str = "none", noise_eps: float = 1e-2,
                 seed: int = 0):
        super().__init__()
        assert noise in NOISE_POLICIES, noise
        self.top_k, self.noise, self.noise_eps = top_k, noise, noise_eps
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, d_model)) if noise == "learned" else None
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)

    def _apply(self, fn, *args, **kwargs):
        """Keep the noise generator on the parameters' device (same seed), so noise is drawn where it is used."""
        super()._apply(fn, *args, **kwargs)
        if self.generator.device != self.weight.device:
            seed = self.generator.initial_seed()
            self.generator = torch.Generator(self.weight.device)
            self.generator.manual_seed(seed)
        return self

    def _uniform(self, like: torch.Tensor, low: float, high: float) -> torch.Tensor:
        u = torch.rand(like.shape, generator=self.generator, device=like.device, dtype=torch.float32)
        return low + (high - low) * u

    def forward(self, x: torch.Tensor):
        noisy = self.training and self.noise != "none"
        if noisy and self.noise == "jitter":
            x = x.float() * self._uniform(x, 1.0 - self.noise_eps, 1.0 + self.noise_eps)
        logits = router_logits(x, self.weight)  # (T, E) fp32
        if noisy and self.noise == "learned":
            std = F.softplus(router_logits(x, self.noise_weight))
            normal = torch.randn(logits.shape, generator=self.generator, device=logits.device)
            logits = logits + normal * std
        if noisy and self.noise == "rsample":
            gumbel = -torch.log(-torch.log(self._uniform(logits, 1e-20, 1.0)))
            return top_k_gating(logits, self.top_k, scores=logits + gumbel)
        if logits.is_cuda and logits.shape[1] <= 256:  # the fused kernels hold a token's E logits in registers
            return fused_router(logits, self.top_k)
        return top_k_gating(logits, self.top_k)
