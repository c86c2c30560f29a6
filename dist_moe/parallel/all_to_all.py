"""Asynchronous all-to-alls over an EP group: flat, or hierarchical (inside each node, then across nodes once).

`start_all_to_all` launches the exchange and returns at once with a `Pending`; `Pending.wait()` hands back
the received rows. Under NCCL the collective runs on the process group's own CUDA stream (the dedicated
communication stream) and `wait()` only makes the current stream wait for it, with no host sync; under gloo
it runs on gloo's background thread. Both are collectives over the group: every rank of it must start them,
also when it sends or receives nothing.
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
    """This rank's two-level groups inside an EP group of `nodes * local` ranks ordered node by node:
    `intra` holds the EP ranks on this node, `inter` the EP ranks with this rank's position on the others."""

    nodes: int
    local: int
    intra: ProcessGroup
    inter: ProcessGroup


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
    sends to EP rank j (x holds this rank's, by destination). EP rank (n, l) = node n, position l. Stage 1
    (intra-node): rows for (n', l') go to (n, l'), which then holds everything of its node bound for position
    l'. Stage 2 (inter-node): (n, l') sends them to (n', l'), which receives them in EP rank order."""
    num_nodes, local = nodes.nodes, nodes.local
    node, position = divmod(ep_rank, local)

    def rows(n_src: int, l_src: int, n_dst: int, l_dst: int) -> int:
        return rows_between[n_src * local + l_src][n_dst * local + l_dst]

    by_position = _reorder(x, rows_between[ep_rank], [n * local + l for l in range(local) for n in range(num_nodes)])
    first = start_all_to_all(by_position,
                             [sum(rows(node, l, n, position) for n in range(num_nodes)) for l in range(local)],
                             [sum(rows(node, position, n, l) for n in range(num_nodes)) for l in range(local)],
                             nodes.intra)

    def across_nodes(received: torch.Tensor) -> Pending:  # blocks (local source l, node n bound for (n, position))
        sizes = [rows(node, l, n, position) for l in range(local) for n in range(num_nodes)]
        by_node = _reorder(received, sizes, [l * num_nodes + n for n in range(num_nodes) for l in range(local)])
        return start_all_to_all(by_node,
                                [sum(rows(n, l, node, position) for l in range(local)) for n in range(num_nodes)],
                                [sum(rows(node, l, n, position) for l in range(local)) for n in range(num_nodes)],
                                nodes.inter)

    return Pending(first.out, first.work, across_nodes)


def _reorder(x: torch.Tensor, sizes: list[int], order: list[int]) -> torch.Tensor:
    """x holds blocks of `sizes` rows one after another; returns them in `order` (block indices)."""
    starts = list(itertools.accumulate(sizes, initial=0))
    return x[torch.cat([torch.arange(starts[b], starts[b] + sizes[b], device=x.device) for b in order])]
