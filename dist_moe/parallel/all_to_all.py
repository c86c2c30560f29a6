"""Asynchronous all-to-alls over an EP group: flat, or hierarchical (inside each node, then across nodes).

`start_all_to_all` launches the exchange and returns at once with a `Pending`; `Pending.wait()` hands back
the received rows. Under NCCL the collective runs on the process group's own CUDA stream (the dedicated
communication stream) and `wait()` only makes the current stream wait for it, with no host sync; under gloo
it runs on gloo's background thread. Both are collectives over the group: every rank of it must start them,
also when it sends or receives nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def exchange_counts(send_counts: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """send_counts (P, E_local): rows this rank sends to EP rank j for its local expert l. Returns
    recv_counts (P, E_local): rows this rank receives from EP rank j for its own local expert l."""
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=group)
    return recv_counts


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


def start_all_to_all(x: torch.Tensor, out_splits: Optional[list[int]], in_splits: Optional[list[int]],
                     group: ProcessGroup, nodes: Optional[NodeLayout] = None) -> Pending:
    """Rows x[sum(in_splits[:j]) : sum(in_splits[:j+1])] go to EP rank j; the output holds the rows from rank j
    at offset sum(out_splits[:j]). Splits None = equal (x.shape[0] / P rows each way). With `nodes` (equal
    splits only) the rows first meet inside the node, then cross between nodes once per peer node."""
    if nodes is not None:
        assert out_splits is None and in_splits is None, "the hierarchical exchange takes equal splits"
        return _start_hierarchical(x, nodes)
    rows = x.shape[0] if out_splits is None else sum(out_splits)
    out = x.new_empty((rows,) + tuple(x.shape[1:]))
    work = dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group, async_op=True)
    return Pending(out, work)


def _start_hierarchical(x: torch.Tensor, nodes: NodeLayout) -> Pending:
    """EP rank (n, l) = node n, position l. Stage 1 (intra): rows for (n', l') go to (n, l'), which then holds
    everything of its node bound for position l'. Stage 2 (inter): (n, l') sends them to (n', l')."""
    rest = tuple(x.shape[1:])
    x = x.reshape(nodes.nodes, nodes.local, -1, *rest).transpose(0, 1)  # (L dest, N dest, X, ...)

    def across_nodes(from_node: torch.Tensor) -> Pending:  # (L src, N dest, X, ...) -> send by node
        by_node = from_node.view(nodes.local, nodes.nodes, -1, *rest).transpose(0, 1).contiguous()
        return start_all_to_all(by_node.view(-1, *rest), None, None, nodes.inter)  # (N src, L src, X, ...)

    first = start_all_to_all(x.reshape(-1, *rest), None, None, nodes.intra)
    return Pending(first.out, first.work, across_nodes)
