"""Asynchronous all-to-alls over an EP group: flat, or hierarchical (inside each node, then across nodes once).
`start_all_to_all` returns at once with a `Pending` whose `wait()` hands back the received rows: under NCCL the
collective runs on the group's own stream and `wait()` only orders the current stream after it (no host sync);
under gloo it runs on gloo's thread. Collectives: every rank of the group starts them, even with nothing to send.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


@dataclass
class NodeLayout:
    """This rank's two-level groups inside an EP group ordered node by node, `sizes[n]` EP ranks on node n:
    `intra` holds this node's EP ranks; `inter` the EP ranks `inter_ranks` it exchanges with across nodes: the
    ranks at its position on every node when all nodes hold as many ranks, else the whole EP group."""

    sizes: list[int]
    intra: ProcessGroup
    inter: ProcessGroup
    inter_ranks: list[int]


class Pending:
    """An exchange in flight: `wait()` returns its output, running any stage that had to wait for it."""

    def __init__(self, out: torch.Tensor, work, then: Optional[Callable[[torch.Tensor], "Pending"]] = None):
        self.out, self.work, self.then = out, work, then

    def wait(self) -> torch.Tensor:
        self.work.wait()
        return self.then(self.out).wait() if self.then is not None else self.out


def start_all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: ProcessGroup) -> Pending:
    """Rows x[sum(in_splits[:j]) : sum(in_splits[:j+1])] go to rank j of the group; the output holds the rows
    from rank j at offset sum(out_splits[:j])."""
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    work = dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group, async_op=True)
    return Pending(out, work)


def start_hierarchical(x: torch.Tensor, rows_between: list[list[int]], ep_rank: int, nodes: NodeLayout) -> Pending:
    """The all-to-all of `start_all_to_all` over the EP group, in two stages; rows_between[i][j] = rows EP rank i
    sends to EP rank j (x holds this rank's, by destination). Rank d's rows leave node n through one relay,
    rank `relay(n, d)` of node n at d's position modulo the node's size (d's own position when every node holds
    as many ranks). Stage 1 (intra-node): each rank hands its rows to their relays on its node. Stage 2
    (inter-node, one exchange): each relay sends what it carries to the destinations, which receive them in
    EP rank order (node by node, a node's sources in order)."""
    sizes = nodes.sizes
    starts = list(itertools.accumulate(sizes, initial=0))
    node_of = [n for n, size in enumerate(sizes) for _ in range(size)]
    position = [r - starts[node_of[r]] for r in range(len(node_of))]

    def relay(n: int, dst: int) -> int:
        return starts[n] + position[dst] % sizes[n]

    node = node_of[ep_rank]
    here = range(starts[node], starts[node + 1])  # this node's EP ranks, the intra group in order
    ep_ranks = range(len(node_of))
    carried = [d for d in ep_ranks if relay(node, d) == ep_rank]  # destinations this rank relays for, ascending
    by_relay = _reorder(x, rows_between[ep_rank], sorted(ep_ranks, key=lambda d: (relay(node, d), d)))
    first = start_all_to_all(by_relay,
                             [sum(rows_between[src][d] for d in carried) for src in here],
                             [sum(rows_between[ep_rank][d] for d in ep_ranks if relay(node, d) == r) for r in here],
                             nodes.intra)

    def across_nodes(received: torch.Tensor) -> Pending:  # blocks (local source, carried destination)
        sizes_in = [rows_between[src][d] for src in here for d in carried]
        by_destination = _reorder(received, sizes_in, [i * len(carried) + j for j in range(len(carried))
                                                       for i in range(len(here))])
        sources_of = lambda m: range(starts[node_of[m]], starts[node_of[m] + 1])  # noqa: E731
        return start_all_to_all(by_destination,
                                [sum(rows_between[src][ep_rank] for src in sources_of(m))
                                 if relay(node_of[m], ep_rank) == m else 0 for m in nodes.inter_ranks],
                                [sum(rows_between[src][m] for src in here) if m in carried else 0
                                 for m in nodes.inter_ranks],
                                nodes.inter)

    return Pending(first.out, first.work, across_nodes)


def _reorder(x: torch.Tensor, sizes: list[int], order: list[int]) -> torch.Tensor:
    """x holds blocks of `sizes` rows one after another; returns them in `order` (block indices)."""
    starts = list(itertools.accumulate(sizes, initial=0))
    return x[torch.cat([torch.arange(starts[b], starts[b] + sizes[b], device=x.device) for b in order])]
