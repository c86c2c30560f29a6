"""moe.impl=deepspeed: DeepSpeed's own `deepspeed.moe.layer.MoE` with SwiGLU experts, behind MoELayer's contract.

The baseline and the reference for gating semantics: same config semantics where DeepSpeed has them (drop by
position, use_rts off; no 2nd-expert sampling unless noise=rsample; renormalised top-2 weights). It is built
from a MoELayer (`from_layer`) and takes its weights, so both start from the same seed identically and save
the same state-dict keys. validate() refuses what DeepSpeed's gating cannot do (top_k > 2, drop_policy=probs).
"""

from __future__ import annotations

from typing import Optional

import torch
from deepspeed.moe.layer import MoE
from torch import nn
from torch.distributed import ProcessGroup

from dist_moe.config import Config, expert_width
from dist_moe.model.moe.experts import SwiGLU
from dist_moe.model.moe.layer import MoELayer, MoEStats
from dist_moe.model.moe.router import router_stats, router_z_loss
from dist_moe.train.deepspeed_keys import deepspeed_state_dict


class DeepSpeedMoE(MoE):
    """forward(x: (B, T, D)) -> (y, aux_loss, z_loss) and last_stats, as MoELayer; the z-loss is computed here
    from the gate's logits (DeepSpeed has none)."""

    def __init__(self, cfg: Config, ep_group: Optional[ProcessGroup]):
        m, d_model, d_ff = cfg.moe, cfg.model.d_model, expert_width(cfg)
        super().__init__(d_model, SwiGLU(d_model, d_ff), m.num_experts, m.ep_size, m.top_k, m.capacity_factor,
                         m.eval_capacity_factor, m.min_capacity,
                         noisy_gate_policy={"none": None, "jitter": "Jitter", "rsample": "RSample"}[m.noise],
                         drop_tokens=not m.dropless, use_rts=False, top2_2nd_expert_sampling=m.noise == "rsample")
        self.shared_mlp = SwiGLU(d_model, d_ff) if m.shared_expert else None
        self.top_k = m.top_k
        if m.ep_size > 1 and ep_group is not None:
            self.deepspeed_moe._set_ep_group(ep_group)
        self.last_stats: Optional[MoEStats] = None
        self._routes = None
        self.deepspeed_moe.gate.register_forward_hook(self._keep_routes)

    @classmethod
    def from_layer(cls, layer: MoELayer) -> "DeepSpeedMoE":
        """DeepSpeed's layer holding layer's weights (its construction leaves the global RNG untouched)."""
        with torch.random.fork_rng(devices=[]):
            baseline = cls(layer.cfg, layer.ep_group)
        baseline.load_state_dict(deepspeed_state_dict(layer), strict=True)
        return baseline.to(next(layer.parameters()).device)

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
