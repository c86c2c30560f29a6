"""Where DeepSpeed's engine meets the model: `apply_deepspeed_moe(model, cfg)`, once, before deepspeed.initialize.
The engine's MoE handling (expert gradients reduced over the expert-data-parallel group, ZeRO's 'moe' parameter
groups, per-expert checkpoint files) turns on only for instances of `deepspeed.moe.layer.MoE`, so each MoELayer
becomes one (or, with moe.impl=deepspeed, DeepSpeed's own layer). deepspeed is imported only when this runs.
"""

from __future__ import annotations

from torch import nn

from dist_moe.config import Config
from dist_moe.model.moe.layer import MoELayer
from dist_moe.train.deepspeed_keys import use_deepspeed_keys
from dist_moe.parallel.groups import create_expert_groups, expert_group_name

_ENGINE_CLASSES: dict[type, type] = {}  # MoELayer class -> its engine-facing subclass


class _EngineFacing:
    """What the engine calls on an MoE layer besides reading its attributes."""

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the engine during initialize: the groups named by expert_group_name must exist."""
        create_expert_groups(self.ep_size, use_data_before_expert_parallel_)


def _engine_class(cls: type) -> type:
    if cls not in _ENGINE_CLASSES:
        from deepspeed.moe.layer import MoE

        _ENGINE_CLASSES[cls] = type(f"DeepSpeed{cls.__name__}", (_EngineFacing, cls, MoE), {"__module__": __name__})
    return _ENGINE_CLASSES[cls]


def mark_expert_parameters(layer: MoELayer) -> None:
    """DeepSpeed's convention (deepspeed/moe/experts.py): ZeRO reduces these over the expert-DP group only."""
    for p in layer.experts.parameters():
        p.allreduce = False
        p.group_name = expert_group_name(layer.ep_size)


def _for_the_engine(layer: MoELayer, cfg: Config) -> nn.Module:
    """moe.impl=dist_moe: the instance's class becomes a subclass of both MoELayer and DeepSpeed's MoE (as FSDP2's
    fully_shard swaps a module's class; MoE.__init__ is skipped, it would build DeepSpeed's own gate and experts),
    with exactly the attributes the engine reads (runtime/engine.py `has_moe_layers`; without them stage 0 raises
    KeyError 'ep_size_P' in `_get_gradients_for_reduction` and ZeRO-2 fails in `average_tensor`), its expert
    parameters marked and its state-dict keys DeepSpeed's per-expert names (deepspeed_keys.py).
    moe.impl=deepspeed: DeepSpeed's own layer holding the same weights (deepspeed_baseline.py)."""
    if cfg.moe.impl == "deepspeed":
        from dist_moe.train.deepspeed_baseline import DeepSpeedMoE

        return DeepSpeedMoE.from_layer(layer)
    layer.__class__ = _engine_class(type(layer))
    layer.expert_group_name = expert_group_name(layer.ep_size)
    layer.enable_expert_tensor_parallelism = False  # read by DeepSpeed's flops profiler
    layer.use_residual = False
    mark_expert_parameters(layer)
    use_deepspeed_keys(layer)
    return layer


def apply_deepspeed_moe(model: nn.Module, cfg: Config) -> nn.Module:
    """Make every MoELayer in model (or model itself, if it is one) what the engine expects; in place where it
    can be, so returns the model to use (a new module only when model is a MoELayer and moe.impl=deepspeed)."""
    if isinstance(model, MoELayer):
        return model if type(model) in _ENGINE_CLASSES.values() else _for_the_engine(model, cfg)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MoELayer) and type(child) not in _ENGINE_CLASSES.values():
                setattr(parent, name, _for_the_engine(child, cfg))
    return model
