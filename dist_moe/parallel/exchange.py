"""The expert-parallel exchange: expert-ordered rows travel to the EP rank owning their expert and back.

`ExpertExchange.to_experts` sends this rank's kept rows (sorted by global expert) to their owners and hands
back what this rank's experts must compute, grouped by local expert; `from_experts` returns the experts'
outputs to the ranks the rows came from, in the order they left. Both are collectives over the EP group
(every rank of it must call them, also when it sends or receives nothing); the split sizes are read on
the host between the count exchange and the row exchange.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from dist_moe.parallel.all_to_all import all_to_all, exchange_counts


@dataclass
class ReturnTrip:
    """What from_experts needs to undo to_experts: the splits of both directions and the local sort."""

    send_splits: list[int]  # rows sent to EP rank j
    recv_splits: list[int]  # rows received from EP rank j
    by_expert: torch.Tensor  # (M,) int64: received rows in (source, expert) order -> (expert, source) order
    num_rows: int  # R, the row count of to_experts' input (rows past the kept ones come back as zeros)


class ExpertExchange:
    """Moves rows between the EP ranks of `group`; EP rank j owns global experts [j*E_local, (j+1)*E_local)."""

    def __init__(self, group: ProcessGroup, num_local_experts: int):
        self.group, self.num_local_experts = group, num_local_experts
        self.ep_size = dist.get_world_size(group)

    def to_experts(self, rows: torch.Tensor, tokens_per_expert: torch.Tensor):
        """rows (R, D): N kept rows sorted by global expert, then unused ones; tokens_per_expert (E,) int64.
        Returns (received (M, D) sorted by local expert, local_counts (E_local,) int64, ReturnTrip)."""
        send_counts = tokens_per_expert.view(self.ep_size, self.num_local_experts)  # (P, E_local)
        recv_counts = exchange_counts(send_counts, self.group)  # (P, E_local): from rank j, for local l
        send_splits, recv_splits = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
        received = all_to_all(rows[:sum(send_splits)], recv_splits, send_splits, self.group)  # (M, D)
        local_expert = torch.repeat_interleave(
            torch.arange(self.num_local_experts, device=rows.device).repeat(self.ep_size), recv_counts.flatten())
        by_expert = torch.argsort(local_expert, stable=True)  # (source, expert) order -> (expert, source)
        trip = ReturnTrip(send_splits, recv_splits, by_expert, rows.shape[0])
        return received[by_expert], recv_counts.sum(0), trip

    def from_experts(self, out: torch.Tensor, trip: ReturnTrip) -> torch.Tensor:
        """out (M, D) in to_experts' received order -> (R, D) in its rows' order (rows past N zero)."""
        out = out[torch.argsort(trip.by_expert)]  # back to (source, expert) order
        out = all_to_all(out, trip.send_splits, trip.recv_splits, self.group)  # (N, D)
        return torch.nn.functional.pad(out, (0, 0, 0, trip.num_rows - out.shape[0]))
