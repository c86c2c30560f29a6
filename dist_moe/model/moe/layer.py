"""The MoE FFN: router -> dispatch -> (all-to-all) -> experts -> (all-to-all back) -> weighted combine.

`build_moe_layer(cfg, ep_group)` returns dist_moe's `MoELayer` (moe.impl=dist_moe) or DeepSpeed's own MoE
layer behind the same contract (moe.impl=deepspeed, the baseline):
    forward(x: (B, T, D)) -> (y: (B, T, D), aux_loss: () fp32, z_loss: () fp32)   (unweighted losses)
    layer.last_stats: MoEStats of the last forward (detached tensors, no host sync).
Both save the same state-dict keys (DeepSpeed's per-expert names), so a checkpoint of one loads into the
other, and the same weights for the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from torch import nn
from torch.distributed import ProcessGroup

from dist_moe.config import Config, ConfigError, expert_width
from dist_moe.kernels.moe_permute import combine, permute
from dist_moe.model.moe.dispatch import expert_capacity, expert_choice_route, reroute, route
from dist_moe.model.moe.experts import SwiGLU, SwiGLUExperts, expert_init
from dist_moe.model.moe.router import Router, router_stats, router_z_loss
from dist_moe.parallel.all_to_all import all_to_all, exchange_counts
from dist_moe.parallel.deepspeed_moe import ExpertParallelModule

GATE_KEY = "deepspeed_moe.gate.wg.weight"
EXPERT_KEY = "deepspeed_moe.experts.deepspeed_experts.{}.{}.weight"  # local expert id, w1 | w2 | w3


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
    m = cfg.moe
    if m.dropless:
        return None
    factor = m.capacity_factor if training else m.eval_capacity_factor
    return expert_capacity(num_tokens, m.num_experts, m.top_k, factor, m.min_capacity)


def _layer_seed() -> int:
    """Router-noise seed: drawn from the (seeded) global RNG so layers differ, offset by rank so ranks do."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    return int(torch.randint(2**62, ())) + rank


class MoELayer(ExpertParallelModule):
    """dist_moe's MoE FFN with E experts, E/ep_size of them on this rank; ep_group = this rank's EP group.

    Capacity is per expert over this rank's tokens (see dispatch.py). With an EP group, kept rows travel
    to the rank owning their expert and back; the rest is the same code as one process.
    """

    def __init__(self, cfg: Config, ep_group: Optional[ProcessGroup]):
        m, d_model = cfg.moe, cfg.model.d_model
        super().__init__(m.num_experts, m.ep_size)
        if m.ep_size > 1:
            assert ep_group is not None and dist.get_world_size(ep_group) == m.ep_size, "EP group != moe.ep_size"
        self.cfg, self.ep_group = cfg, ep_group if m.ep_size > 1 else None
        ep_rank = dist.get_rank(self.ep_group) if self.ep_group is not None else 0
        self.router = Router(d_model, m.num_experts, m.top_k, m.noise, m.noise_eps, score=m.score, balance=m.balance,
                             aux_loss_scope=m.aux_loss_scope, aux_loss_accumulate=m.aux_loss_accumulate,
                             keep_scores=m.overflow == "reroute" or m.routing == "expert_choice")
        self.experts = SwiGLUExperts(m.num_experts, self.num_local_experts, ep_rank * self.num_local_experts,
                                     d_model, expert_width(cfg), m.ep_size)
        with torch.random.fork_rng(devices=[]):  # nn.Linear's own init must not shift the RNG stream
            self.shared_mlp = SwiGLU(d_model, expert_width(cfg)) if m.shared_expert else None
        self.last_stats: Optional[MoEStats] = None
        self.reset_parameters(cfg.model.init_std)
        self.router.generator.manual_seed(_layer_seed())
        self.register_state_dict_post_hook(_to_deepspeed_keys)
        self.register_load_state_dict_pre_hook(_from_deepspeed_keys)

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
                                                     m.reroute_tries, m.drop_policy)
                rerouted = rerouted.sum()
            plan = route(indices, weights, self.num_experts, capacity, m.drop_policy, m.normalize_weights)
        if self.ep_group is None:  # the experts permute, gate-weight and combine their rows themselves
            y = self.experts(tokens, plan.tokens_per_expert, (plan.token_index, plan.row_index, plan.row_weights()))
        else:
            rows = permute(tokens, plan.token_index, plan.row_index)  # (k*B*T, D) expert-ordered, dropped last
            rows = self._exchange_and_run(rows, plan.tokens_per_expert)
            y = combine(rows, plan.row_index, plan.combine_weights)  # gate-weighted sum in fp32, x's dtype
        if self.shared_mlp is not None:
            y = y + self.shared_mlp(tokens)
        routed = len(tokens) * (1 if m.routing == "expert_choice" else m.top_k)
        self.last_stats = MoEStats.of(gating.stats, plan.tokens_per_expert, plan.dropped, plan.capacity, len(tokens),
                                      routed, rerouted)
        return y.view_as(x), gating.aux_loss, gating.z_loss

    def _exchange_and_run(self, rows: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """rows (R, D): N kept rows sorted by global expert, then unused ones -> expert outputs in the same
        order (rows past N zero). The kept rows for experts [j*E_local, (j+1)*E_local) go to EP rank j and
        come back after its experts ran; N is read on the host here (the split sizes)."""
        send_counts = tokens_per_expert.view(self.ep_size, self.num_local_experts)  # (P, E_local)
        recv_counts = exchange_counts(send_counts, self.ep_group)  # (P, E_local): from rank j, for local l
        send_splits, recv_splits = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
        received = all_to_all(rows[:sum(send_splits)], recv_splits, send_splits, self.ep_group)  # (M, D)
        local_expert = torch.repeat_interleave(
            torch.arange(self.num_local_experts, device=rows.device).repeat(self.ep_size), recv_counts.flatten())
        by_expert = torch.argsort(local_expert, stable=True)  # (source, expert) order -> (expert, source)
        out = self.experts(received[by_expert], recv_counts.sum(0))
        out = out[torch.argsort(by_expert)]  # back to (source, expert) order
        out = all_to_all(out, send_splits, recv_splits, self.ep_group)  # (N, D)
        return torch.nn.functional.pad(out, (0, 0, 0, rows.shape[0] - out.shape[0]))


def _to_deepspeed_keys(module: MoELayer, state_dict: dict, prefix: str, local_metadata) -> None:
    """Save stacked experts as DeepSpeed's per-expert nn.Linear weights (what save_checkpoint expects)."""
    state_dict[prefix + GATE_KEY] = state_dict.pop(prefix + "router.weight")
    w1, w3 = state_dict.pop(prefix + "experts.w13").chunk(2, dim=2)
    stacks = {"w1": w1, "w2": state_dict.pop(prefix + "experts.w2"), "w3": w3}  # (E_local, in, out)
    for name, stacked in stacks.items():
        for i in range(stacked.shape[0]):
            state_dict[prefix + EXPERT_KEY.format(i, name)] = stacked[i].t()  # nn.Linear layout (out, in)


def _from_deepspeed_keys(module: MoELayer, state_dict: dict, prefix: str, *args) -> None:
    if prefix + GATE_KEY not in state_dict:
        return
    state_dict[prefix + "router.weight"] = state_dict.pop(prefix + GATE_KEY)
    stacks = {name: torch.stack([state_dict.pop(prefix + EXPERT_KEY.format(i, name)).t()
                                 for i in range(module.num_local_experts)]) for name in ("w1", "w2", "w3")}
    state_dict[prefix + "experts.w13"] = torch.cat([stacks["w1"], stacks["w3"]], dim=2)
    state_dict[prefix + "experts.w2"] = stacks["w2"]


class DeepSpeedMoE(MoE):
    """moe.impl=deepspeed: `deepspeed.moe.layer.MoE` with SwiGLU experts, behind MoELayer's contract.

    Same config semantics where DeepSpeed has them: drop by position (use_rts off), no 2nd-expert sampling
    unless noise=rsample, renormalised top-2 weights. The z-loss is computed here from the gate's logits.
    """

    def __init__(self, cfg: Config, ep_group: Optional[ProcessGroup]):
        m, d_model, d_ff = cfg.moe, cfg.model.d_model, expert_width(cfg)
        if m.drop_policy != "position":
            raise ConfigError(f"config key 'moe.drop_policy' = {m.drop_policy!r}: expected 'position' with "
                              "moe.impl=deepspeed (DeepSpeed's top-1/top-2 gating drops by position)")
        with torch.random.fork_rng(devices=[]):  # construction draws are overwritten by reset_parameters
            super().__init__(d_model, SwiGLU(d_model, d_ff), m.num_experts, m.ep_size, m.top_k, m.capacity_factor,
                             m.eval_capacity_factor, m.min_capacity,
                             noisy_gate_policy={"none": None, "jitter": "Jitter", "rsample": "RSample"}[m.noise],
                             drop_tokens=not m.dropless, use_rts=False,
                             top2_2nd_expert_sampling=m.noise == "rsample")
            self.shared_mlp = SwiGLU(d_model, d_ff) if m.shared_expert else None
        self.top_k = m.top_k
        if m.ep_size > 1 and ep_group is not None:
            self.deepspeed_moe._set_ep_group(ep_group)
        self.last_stats: Optional[MoEStats] = None
        self._routes = None
        self.deepspeed_moe.gate.register_forward_hook(self._keep_routes)
        self.reset_parameters(cfg.model.init_std, dist.get_rank(ep_group) if m.ep_size > 1 and ep_group else 0)
        _layer_seed()  # the draw MoELayer makes for its router noise, so both leave the RNG in the same state

    @torch.no_grad()
    def reset_parameters(self, std: float, ep_rank: int) -> None:
        """The same draws in the same order as MoELayer.reset_parameters (DeepSpeed deep-copies one expert)."""
        self.deepspeed_moe.gate.wg.weight.normal_(0.0, std)
        experts = self.deepspeed_moe.experts.deepspeed_experts
        first = ep_rank * self.num_local_experts
        d_model, d_ff = self.deepspeed_moe.gate.wg.weight.shape[1], experts[0].w1.weight.shape[0]
        for e, w1, w3, w2 in expert_init(self.num_experts, d_model, d_ff, std):
            if first <= e < first + self.num_local_experts:
                expert = experts[e - first]
                expert.w1.weight.copy_(w1.t()), expert.w3.weight.copy_(w3.t()), expert.w2.weight.copy_(w2.t())
        if self.shared_mlp is not None:
            for linear in (self.shared_mlp.w1, self.shared_mlp.w3, self.shared_mlp.w2):
                linear.weight.normal_(0.0, std)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        if self.deepspeed_moe.ep_group is None:  # DeepSpeed asserts if the group is set twice
            super().set_deepspeed_parallelism(use_data_before_expert_parallel_)

    def _keep_routes(self, gate: nn.Module, inputs, output) -> None:
        self._routes = output  # sparse routes: (l_aux, capacity, E, indices (k, T) with -1 = dropped, ...)

    def forward(self, x: torch.Tensor):
        logits = nn.functional.linear(x.reshape(-1, x.shape[-1]).float(), self.deepspeed_moe.gate.wg.weight.float())
        y, aux_loss, _ = super().forward(x)
        if self.shared_mlp is not None:
            y = y + self.shared_mlp(x)
        _, capacity, num_experts, indices = self._routes[:4]
        kept = torch.bincount(indices.long().flatten() + 1, minlength=num_experts + 1)[1:]  # -1 -> bin 0
        num_tokens, stats = len(logits), router_stats(torch.softmax(logits, -1))
        self.last_stats = MoEStats.of(stats, kept, num_tokens * self.top_k - kept.sum(), int(capacity), num_tokens,
                                      num_tokens * self.top_k)
        return y, aux_loss, router_z_loss(logits)


def build_moe_layer(cfg: Config, ep_group: Optional[ProcessGroup]) -> nn.Module:
    """The MoE FFN for moe.impl; ep_group is this rank's expert-parallel group (None for one process)."""
    return DeepSpeedMoE(cfg, ep_group) if cfg.moe.impl == "deepspeed" else MoELayer(cfg, ep_group)
