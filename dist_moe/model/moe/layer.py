"""The MoE FFN: router -> dispatch -> (exchange) -> experts -> (exchange back) -> weighted combine.
`MoELayer(cfg, ep_group)` is plain PyTorch: forward(x (B, T, D)) -> (y (B, T, D), aux_loss, z_loss: () fp32,
unweighted); `last_stats` holds the last forward's routing statistics. What DeepSpeed's engine needs of it and the
bounded exchange's overflow check are applied from outside (train/deepspeed_moe.py, train/bounded_exchange.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from dist_moe.config import Config, expert_width
from dist_moe.model.moe.dispatch import expert_capacity, expert_choice_route, reroute, route
from dist_moe.model.moe.experts import SwiGLU, SwiGLUExperts, swiglu_experts
from dist_moe.model.moe.router import Router
from dist_moe.parallel.exchange import ExpertExchange
from dist_moe.parallel.groups import node_layout


@dataclass
class MoEStats:
    """Routing statistics of one forward over this rank's tokens, for the expert-load dashboards."""

    tokens_per_expert: torch.Tensor  # (E,) int64 kept assignments per global expert
    dropped: torch.Tensor  # () int64 assignments over capacity (expert choice: tokens no expert chose)
    routed: int  # assignments before dropping = tokens * k (expert choice: tokens)
    capacity: int  # per-expert limit applied (dropless: the token count)
    router_entropy_sum: torch.Tensor  # () fp32 sum over tokens of the routing distribution's entropy (nats)
    top1_prob_sum: torch.Tensor  # () fp32 sum over tokens of the largest router probability
    num_tokens: int
    rerouted: torch.Tensor  # () int64 kept assignments that moved to another expert (overflow=reroute)

    @classmethod
    def of(cls, router_stats: torch.Tensor, tokens_per_expert: torch.Tensor, dropped: torch.Tensor, capacity: int,
           num_tokens: int, routed: int, rerouted: Optional[torch.Tensor] = None) -> "MoEStats":
        """router_stats (2,): (entropy sum, top-1 probability sum), as the router returns them."""
        rerouted = torch.zeros_like(dropped) if rerouted is None else rerouted
        return cls(tokens_per_expert.detach(), dropped, routed, capacity, router_stats[0], router_stats[1],
                   num_tokens, rerouted)


def _capacity(cfg: Config, num_tokens: int, training: bool) -> Optional[int]:
    """Per-expert capacity over num_tokens local tokens; None when dropless."""
    m = cfg.moe
    if m.dropless:
        return None
    factor = m.capacity_factor if training else m.eval_capacity_factor
    return expert_capacity(num_tokens, m.num_experts, m.top_k, factor, m.min_capacity)


def _layer_seed() -> int:
    """Router-noise seed: drawn from the (seeded) global RNG so layers differ, offset by rank so ranks do."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    return int(torch.randint(2**62, ())) + rank


class MoELayer(nn.Module):
    """dist_moe's MoE FFN with E experts, E/ep_size of them on this rank; ep_group = this rank's EP group.

    Capacity is per expert over this rank's tokens (see dispatch.py). With an EP group, kept rows travel
    to the rank owning their expert and back (parallel/exchange.py); the rest is the same code as one process.
    """

    def __init__(self, cfg: Config, ep_group: Optional[ProcessGroup]):
        super().__init__()
        m, d_model = cfg.moe, cfg.model.d_model
        if m.ep_size > 1:
            assert ep_group is not None and dist.get_world_size(ep_group) == m.ep_size, "EP group != moe.ep_size"
        self.cfg, self.ep_group = cfg, ep_group if m.ep_size > 1 else None
        self.num_experts, self.ep_size = m.num_experts, m.ep_size
        self.num_local_experts = m.num_experts // m.ep_size
        self.exchange = None
        if self.ep_group is not None:
            nodes = node_layout(m.ep_size) if m.a2a == "hierarchical" else None
            self.exchange = ExpertExchange(self.ep_group, self.num_local_experts, m.a2a_chunks, m.exchange, nodes,
                                           m.bound_factor)
        ep_rank = dist.get_rank(self.ep_group) if self.ep_group is not None else 0
        self.router = Router(d_model, m.num_experts, m.top_k, m.noise, m.noise_eps, score=m.score, balance=m.balance,
                             aux_loss_scope=m.aux_loss_scope, aux_loss_accumulate=m.aux_loss_accumulate,
                             keep_scores=m.overflow == "reroute" or m.routing == "expert_choice")
        self.experts = SwiGLUExperts(m.num_experts, self.num_local_experts, ep_rank * self.num_local_experts,
                                     d_model, expert_width(cfg))
        with torch.random.fork_rng(devices=[]):  # nn.Linear's own init must not shift the RNG stream
            self.shared_mlp = SwiGLU(d_model, expert_width(cfg)) if m.shared_expert else None
        self.last_stats: Optional[MoEStats] = None
        self.reset_parameters(cfg.model.init_std)
        self.router.generator.manual_seed(_layer_seed())

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        """Router, then every global expert in order (see expert_init), then the shared expert."""
        self.router.weight.normal_(0.0, std)
        self.experts.reset_parameters(std)
        if self.shared_mlp is not None:
            for linear in (self.shared_mlp.w1, self.shared_mlp.w3, self.shared_mlp.w2):
                linear.weight.normal_(0.0, std)

    def forward(self, x: torch.Tensor):
        m = self.cfg.moe
        tokens = x.reshape(-1, x.shape[-1])  # (B*T, D)
        gating = self.router(tokens, num_sequences=x.shape[0] if x.dim() == 3 else 1)
        capacity, rerouted = _capacity(self.cfg, len(tokens), self.training), None
        if m.routing == "expert_choice":
            plan = expert_choice_route(gating.scores, gating.selection, capacity)
        else:
            indices, weights = gating.indices, gating.weights
            if m.overflow == "reroute" and capacity is not None:
                indices, weights, rerouted = reroute(indices, gating.scores, gating.selection, capacity,
                                                     m.reroute_tries, m.drop_policy, score=m.score)
                rerouted = rerouted.sum()
            plan = route(indices, weights, self.num_experts, capacity, m.drop_policy, m.normalize_weights)
        shared = None if self.shared_mlp is None else (lambda: self.shared_mlp(tokens))
        if self.exchange is None:  # the experts permute, gate-weight and combine their rows themselves
            y = self.experts(tokens, plan.tokens_per_expert, (plan.token_index, plan.row_index, plan.row_weights()))
            shared_y = shared() if shared is not None else None
        else:  # rows (k*B*T, D) expert-ordered, dropped last, to their experts' ranks and back; shared under it
            rows, shared_y = self.exchange(plan.permute(tokens), plan.tokens_per_expert, plan.capacity,
                                           swiglu_experts, (self.experts.w13, self.experts.w2), shared)
            y = plan.combine(rows)  # gate-weighted sum in fp32, x's dtype
        if shared_y is not None:
            y = y + shared_y
        routed = len(tokens) * (1 if m.routing == "expert_choice" else m.top_k)
        self.last_stats = MoEStats.of(gating.stats, plan.tokens_per_expert, plan.dropped, plan.capacity, len(tokens),
                                      routed, rerouted)
        return y.view_as(x), gating.aux_loss, gating.z_loss
