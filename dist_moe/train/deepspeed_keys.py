"""The checkpoint-key adapter: dist_moe's stacked experts <-> DeepSpeed's per-expert state-dict names.

DeepSpeed's `save_checkpoint` writes, for each MoE layer, every key containing "expert" into one file per
global expert, found by the regex `.deepspeed_moe.experts.deepspeed_experts.<local id>.`, and keeps the other
keys in the dense model file (so no other key may contain "expert"). MoELayer keeps its experts stacked
(`experts.w13` = [w1 | w3]: (E_local, D, 2F), laid out by model/moe/experts.py's stack_w13; `experts.w2`:
(E_local, F, D)); these hooks save them as DeepSpeed's per-expert nn.Linear weights (out, in) and read them
back, which is also what moe.impl=deepspeed saves: a checkpoint of either implementation loads into the other.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_moe.model.moe.experts import split_w13, stack_w13

GATE_KEY = "deepspeed_moe.gate.wg.weight"
EXPERT_KEY = "deepspeed_moe.experts.deepspeed_experts.{}.{}.weight"  # local expert id, w1 | w2 | w3


def to_deepspeed_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata=None) -> None:
    """state_dict post-hook: router and stacked experts under DeepSpeed's names (what save_checkpoint expects)."""
    state_dict[prefix + GATE_KEY] = state_dict.pop(prefix + "router.weight")
    w1, w3 = split_w13(state_dict.pop(prefix + "experts.w13"))
    stacks = {"w1": w1, "w2": state_dict.pop(prefix + "experts.w2"), "w3": w3}  # (E_local, in, out)
    for name, stacked in stacks.items():
        for i in range(stacked.shape[0]):
            state_dict[prefix + EXPERT_KEY.format(i, name)] = stacked[i].t()  # nn.Linear layout (out, in)


def from_deepspeed_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: DeepSpeed's names back to the router and stacked experts (others pass through)."""
    if prefix + GATE_KEY not in state_dict:
        return
    state_dict[prefix + "router.weight"] = state_dict.pop(prefix + GATE_KEY)
    stacks = {name: torch.stack([state_dict.pop(prefix + EXPERT_KEY.format(i, name)).t()
                                 for i in range(module.num_local_experts)]) for name in ("w1", "w2", "w3")}
    state_dict[prefix + "experts.w13"] = stack_w13(stacks["w1"], stacks["w3"])
    state_dict[prefix + "experts.w2"] = stacks["w2"]


def use_deepspeed_keys(layer: nn.Module) -> None:
    """Save and load `layer` (a MoELayer) under DeepSpeed's per-expert names."""
    layer.register_state_dict_post_hook(to_deepspeed_keys)
    layer.register_load_state_dict_pre_hook(from_deepspeed_keys)


def deepspeed_state_dict(layer: nn.Module) -> dict:
    """A MoELayer's state dict under DeepSpeed's names, whether or not its hooks are registered."""
    state = layer.state_dict()
    if GATE_KEY not in state:
        to_deepspeed_keys(layer, state, "")
    return state
