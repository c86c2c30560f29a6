"""Expert-load dashboards: every MoE layer's routing statistics, summed between logs, into TensorBoard.

The loop calls `accumulate()` after each training forward: it adds the layers' `last_stats` (and the aux
and z losses their forward returned) into one device tensor, with no host sync. Every log.expert_every
steps `log(writer, step)` all-reduces those sums once over `group` (each rank counts all global experts
over its own tokens, so a plain sum is the global count, with or without expert parallelism), rank 0
writes scalars, histograms and heatmap images, and the sums start again from zero. Routers with a
selection bias (moe.balance=aux_free|both) also get their bias drawn per expert (identical on every rank).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dist_moe.analysis.plots import load_heatmap, to_rgb

LOAD_TAG = "expert_load/layer_{layer}/expert_{expert}"  # fraction of the layer's kept assignments
STAT_TAG = "routing/layer_{layer}/{stat}"
BIAS_TAG = "expert_bias/layer_{layer}/expert_{expert}"
HISTOGRAM_TAG = "expert_load_histogram/layer_{layer}"
HEATMAP_TAG, HEATMAP_CHANGE_TAG = "expert_load/heatmap", "expert_load/heatmap_change"
STATS = ("dropped_fraction", "rerouted_fraction", "capacity_utilisation", "imbalance_max_over_mean", "imbalance_cv",
         "router_entropy", "top1_prob", "aux_loss", "z_loss")

# Columns of the summed table, one row per MoE layer: E kept counts, then these.
DEVICE_SUMS = ("dropped", "rerouted", "router_entropy_sum", "top1_prob_sum", "aux_loss_sum", "z_loss_sum")
HOST_SUMS = ("routed", "capacity_slots", "num_tokens", "forwards")


def moe_layers(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(block index, module) for every module exposing `last_stats` (dist_moe's and DeepSpeed's MoE FFN).
    The index is the first integer in the module's name (`blocks.3.ffn` -> 3), else its rank in order."""
    found = [(name, module) for name, module in model.named_modules() if hasattr(module, "last_stats")]
    layers = []
    for order, (name, module) in enumerate(found):
        numbers = [int(part) for part in name.split(".") if part.isdigit()]
        layers.append((numbers[0] if numbers else order, module))
    return layers


def routing_scalars(kept: np.ndarray, sums: dict[str, float]) -> dict[str, float]:
    """One layer's dashboard values from its summed counts: kept (E,) assignments per expert, and
    DEVICE_SUMS + HOST_SUMS summed over forwards and ranks. Imbalance uses kept counts (population CV)."""
    mean = kept.mean()
    return {
        "dropped_fraction": sums["dropped"] / sums["routed"],
        "rerouted_fraction": sums["rerouted"] / sums["routed"],
        "capacity_utilisation": kept.sum() / sums["capacity_slots"],
        "imbalance_max_over_mean": kept.max() / mean if mean > 0 else float("nan"),
        "imbalance_cv": kept.std() / mean if mean > 0 else float("nan"),
        "router_entropy": sums["router_entropy_sum"] / sums["num_tokens"],
        "top1_prob": sums["top1_prob_sum"] / sums["num_tokens"],
        "aux_loss": sums["aux_loss_sum"] / sums["forwards"],
        "z_loss": sums["z_loss_sum"] / sums["forwards"],
    }


def custom_scalars_layout(layers: list[int], biased: bool = False) -> dict:
    """TensorBoard custom-scalars layout: one multiline chart per layer (a line per expert), then one per
    routing statistic (a line per layer), and with selection biases one chart per layer of those."""
    layout = {
        "expert load": {f"layer {i}": ["Multiline", [rf"^expert_load/layer_{i}/expert_\d+$"]] for i in layers},
        "routing": {stat: ["Multiline", [rf"^routing/layer_\d+/{stat}$"]] for stat in STATS},
    }
    if biased:
        layout["expert bias"] = {f"layer {i} bias": ["Multiline", [rf"^expert_bias/layer_{i}/expert_\d+$"]]
                                 for i in layers}
    return layout


class ExpertLoadTracker:
    """Sums routing statistics of `model`'s MoE layers between logs; see the module docstring.

    group: the process group to reduce over (None = the default world group; no reduction when
    torch.distributed is not initialised). Every rank must call `log` at the same steps (it is collective).
    """

    def __init__(self, model: nn.Module, num_experts: int, group: dist.ProcessGroup | None = None):
        found = moe_layers(model)
        self.layer_ids = [index for index, _ in found]
        self.layers = [module for _, module in found]
        self.num_experts, self.group = num_experts, group
        self._losses: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.layers)
        for j, layer in enumerate(self.layers):
            layer.register_forward_hook(self._keep_losses(j))
        self._counted: list[object] = [None] * len(self.layers)
        self._previous: np.ndarray | None = None  # load matrix of the last heatmap, for the change image
        self._layout_written = False
        self._reset()

    def _keep_losses(self, j: int):
        def hook(module: nn.Module, inputs, output) -> None:
            _, aux_loss, z_loss = output  # the MoE FFN contract: (y, aux_loss, z_loss)
            self._losses[j] = (aux_loss.detach(), z_loss.detach())
        return hook

    def _reset(self) -> None:
        self._sums: torch.Tensor | None = None  # (L, E + len(DEVICE_SUMS)) float64 on the stats' device
        self._host = np.zeros((len(self.layers), len(HOST_SUMS)), dtype=np.float64)

    @torch.no_grad()
    def accumulate(self) -> None:
        """Add the last forward's stats of every MoE layer. Device-side adds only; a forward is counted once
        however often this is called after it."""
        stats = [layer.last_stats for layer in self.layers]
        if not stats or any(s is None for s in stats) or all(s is c for s, c in zip(stats, self._counted)):
            return
        self._host += [(s.routed, s.capacity * self.num_experts, s.num_tokens, 1) for s in stats]  # HOST_SUMS
        # a handful of kernels whatever the layer count: this runs after every micro batch
        counts = torch.cat([torch.stack([s.tokens_per_expert for s in stats]),
                            torch.stack([s.dropped for s in stats])[:, None],
                            torch.stack([s.rerouted for s in stats])[:, None]], dim=1)  # (L, E + 2) int64
        assert counts.shape[1] == self.num_experts + 2, f"layers report {counts.shape[1] - 2} experts, not E"
        sums = torch.stack([value for s, losses in zip(stats, self._losses)
                            for value in (s.router_entropy_sum, s.top1_prob_sum, *losses)])  # (L * 4,)
        rows = torch.cat([counts.double(), sums.view(len(stats), 4).double()], dim=1)  # (L, E + 6) = DEVICE_SUMS
        self._sums = rows if self._sums is None else self._sums.add_(rows)
        self._counted = stats

    def log(self, writer, step: int) -> dict[str, float]:
        """Collective: reduce the sums over the group, write them with `writer` (a SummaryWriter on rank 0,
        None elsewhere), reset. Returns {tag: value} of the scalars on every rank; {} when no rank counted
        a forward since the last log (or the model has no MoE layer)."""
        if not self.layers:
            return {}
        sums = self._sums
        if sums is None:  # still take part in the collective
            device = next(self.layers[0].parameters()).device
            sums = torch.zeros(len(self.layers), self.num_experts + len(DEVICE_SUMS), dtype=torch.float64,
                               device=device)
        table = torch.cat([sums, torch.from_numpy(self._host).to(sums.device)], dim=1)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(table, group=self.group)
        table = table.cpu().numpy()  # (L, E + 6 + 4)
        self._reset()
        if table[0, -1] == 0:  # no forwards anywhere
            return {}
        E = self.num_experts
        names = DEVICE_SUMS + HOST_SUMS
        kept = table[:, :E]  # (L, E)
        kept_total = kept.sum(axis=1, keepdims=True)
        load = np.divide(kept, kept_total, out=np.zeros_like(kept), where=kept_total > 0)  # (L, E) rows sum to 1
        scalars: dict[str, float] = {}
        for j, layer in enumerate(self.layer_ids):
            for e in range(E):
                scalars[LOAD_TAG.format(layer=layer, expert=e)] = float(load[j, e])
            layer_sums = dict(zip(names, table[j, E:].tolist()))
            for stat, value in routing_scalars(kept[j], layer_sums).items():
                scalars[STAT_TAG.format(layer=layer, stat=stat)] = float(value)
            bias = getattr(getattr(self.layers[j], "router", None), "selection_bias", None)
            for e, value in enumerate([] if bias is None else bias.tolist()):
                scalars[BIAS_TAG.format(layer=layer, expert=e)] = value
        if writer is not None:
            self._write(writer, step, scalars, load)
        return scalars

    def _write(self, writer, step: int, scalars: dict[str, float], load: np.ndarray) -> None:
        if not self._layout_written:
            biased = any(tag.startswith("expert_bias/") for tag in scalars)
            writer.add_custom_scalars(custom_scalars_layout(self.layer_ids, biased))
            self._layout_written = True
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)
        for j, layer in enumerate(self.layer_ids):
            writer.add_histogram(HISTOGRAM_TAG.format(layer=layer), load[j], step)
        image = load_heatmap(load, self.layer_ids, f"expert load at step {step}")
        writer.add_image(HEATMAP_TAG, to_rgb(image), step, dataformats="HWC")
        if self._previous is not None and self._previous.shape == load.shape:
            change = load_heatmap(load - self._previous, self.layer_ids, f"change in expert load up to step {step}",
                                  change=True)
            writer.add_image(HEATMAP_CHANGE_TAG, to_rgb(change), step, dataformats="HWC")
        self._previous = load
        writer.flush()
