"""moe.exchange=bounded, applied to a model from outside (`apply_bounded_exchange`): each forward's exchanges
are checked once for rows a peer could not take, and a forward that left rows out is redone with more rows per
peer from the same router state, before any backward, so what trains is exact. The model itself stays plain.
"""

from __future__ import annotations

import logging
from typing import Callable, TypeVar

import torch.distributed as dist
from torch import nn

from dist_moe.model.moe.layer import MoELayer
from dist_moe.parallel.exchange import check_overflows

Output = TypeVar("Output")
_log = logging.getLogger(__name__)


def bounded_layers(model: nn.Module) -> dict[str, MoELayer]:
    """model's MoE layers (model itself, if it is one) whose exchange has the bounded layout."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, MoELayer) and module.exchange is not None
            and module.exchange.rows_per_peer is not None}


def apply_bounded_exchange(model: nn.Module) -> nn.Module:
    """Make every forward of model go through `forward_without_overflow` where it has bounded layers (in place;
    returns model). The redo repeats the whole forward: state a forward keeps outside the routers (a KV cache)
    would be written twice, so generation runs without it (and a bounded layer's second unchecked forward fails)."""
    if bounded_layers(model):
        plain = model.forward
        model.forward = lambda *args, **kwargs: forward_without_overflow(model, lambda: plain(*args, **kwargs))
    return model


def forward_without_overflow(model: nn.Module, forward: Callable[[], Output]) -> Output:
    """Runs forward() (one forward of model) and, while a bounded exchange of model overflowed, grows its rows per
    peer and runs it again from the same router state (noise generators, step counters). One host read per pass
    (check_overflows)."""
    layers = {name: module for name, module in model.named_modules() if isinstance(module, MoELayer)}
    bounded = bounded_layers(model)
    if not bounded:
        return forward()
    routers = {name: layer.router.state() for name, layer in layers.items()}
    while True:
        out = forward()
        overflowed = check_overflows([layer.exchange.rows_per_peer for layer in bounded.values()])
        if not overflowed:
            return out
        del out  # free the dropped attempt's activations before the next one
        _warn_first_overflow(bounded, overflowed)
        for name, layer in layers.items():
            layer.router.set_state(routers[name])


def _warn_first_overflow(bounded: dict[str, MoELayer], overflowed: list[int]) -> None:
    names = list(bounded)
    first = {names[i]: bounded[names[i]].exchange.rows_per_peer.limits for i in overflowed
             if bounded[names[i]].exchange.rows_per_peer.overflows == 1}
    if first and (not dist.is_initialized() or dist.get_rank() == 0):
        _log.warning("moe.exchange=bounded: a layer's rows per peer overflowed for the first time; the forward was "
                     "redone with rows per peer (per chunk) %s. Expected while routing settles; later overflows are "
                     "counted in moe/bound_overflows, not printed", first)


def overflows(model: nn.Module) -> int:
    """Forwards redone so far because a bounded exchange overflowed, summed over model's layers (a forward in which
    two layers overflowed counts twice). The same on every rank: limits move on all-reduced needs."""
    return sum(layer.exchange.rows_per_peer.overflows for layer in bounded_layers(model).values())
