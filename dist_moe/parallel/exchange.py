"""The expert-parallel exchange: rows to the EP ranks owning their experts and back, in chunks of experts
pipelined with the experts' compute (forward and backward). A chunk is a slice of every rank's local experts,
so each expert's rows stay in one GEMM and chunks' weight gradients are disjoint. Three layouts
(`moe.exchange`): padded, ragged, bounded; docs/expert_parallelism.md compares them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from dist_moe.parallel.all_to_all import NodeLayout, Pending, start_all_to_all, start_hierarchical

ChunkExperts = list[tuple[int, int]]  # per chunk, its local experts [lo, hi)


def pipeline(num_chunks: int, dispatch: Callable[[int], Pending],
             compute: Callable[[int, torch.Tensor], torch.Tensor], combine: Callable[[int, torch.Tensor], Pending],
             shared_expert: Optional[Callable[[], None]] = None) -> list[torch.Tensor]:
    """Chunk c+1 is dispatched before chunk c computes, and chunk c is combined while c+1 computes; the shared
    expert (independent of the exchange) runs under the first dispatch. Returns the combined chunks."""
    in_flight = dispatch(0)
    if shared_expert is not None:
        shared_expert()
    returning = []
    for c in range(num_chunks):
        received = in_flight.wait()
        if c + 1 < num_chunks:
            in_flight = dispatch(c + 1)
        returning.append(combine(c, compute(c, received)))
    return [pending.wait() for pending in returning]


@dataclass
class Peers:
    """This rank's EP group, and its node layout for the hierarchical all-to-all (None: flat)."""

    group: ProcessGroup
    nodes: Optional[NodeLayout]

    def __post_init__(self):
        self.rank, self.size = dist.get_rank(self.group), dist.get_world_size(self.group)

    def send(self, x: torch.Tensor, rows_between: list[list[int]]) -> Pending:
        """rows_between[i][j]: rows EP rank i sends to EP rank j in this exchange."""
        if self.nodes is not None:
            return start_hierarchical(x, rows_between, self.rank, self.nodes)
        me = self.rank
        return start_all_to_all(x, [row[me] for row in rows_between], rows_between[me], self.group)


class Layout(Protocol):
    """Where each chunk's rows sit on both sides of one exchange (one forward of one layer)."""

    chunk_experts: ChunkExperts
    peers: Peers

    def pack(self, rows: torch.Tensor) -> torch.Tensor:
        """(R, D) rows in global-expert order -> what `outgoing` slices each chunk from."""

    def rows_between(self, c: int) -> list[list[int]]:
        """[i][j]: rows EP rank i sends EP rank j for chunk c."""

    def outgoing(self, packed: torch.Tensor, c: int) -> torch.Tensor:
        """Chunk c's rows to send, peer by peer."""

    def to_expert_order(self, c: int, received: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Received rows (peer by peer) -> (rows by local expert, counts per local expert of the chunk)."""

    def from_expert_order(self, c: int, out: torch.Tensor) -> torch.Tensor:
        """The inverse of to_expert_order's permutation: results peer by peer, to send back."""

    def unpack(self, chunks: list[torch.Tensor]) -> torch.Tensor:
        """Every chunk's returned rows -> (R, D) in the rows' order, zero where nothing came back."""


def _dispatch(layout: Layout, packed: torch.Tensor, c: int) -> Pending:
    return layout.peers.send(layout.outgoing(packed, c), layout.rows_between(c))


def _combine(layout: Layout, c: int, out: torch.Tensor) -> Pending:
    back = [list(column) for column in zip(*layout.rows_between(c))]  # what j sent i, i now sends j
    return layout.peers.send(layout.from_expert_order(c, out), back)


class _Padded:
    """Every (peer, local expert) pair gets exactly C slots (C = capacity; T when dropless): all sizes are static,
    no counts travel, no host sync (so every rank of the group must feed the layer as many tokens). Row r of
    expert e sits at slot e*C + (its place within e); padding slots are zero rows, never read back."""

    def __init__(self, tokens_per_expert: torch.Tensor, num_rows: int, capacity: int, chunk_experts: ChunkExperts,
                 peers: Peers):
        self.chunk_experts, self.peers, self.capacity = chunk_experts, peers, capacity
        num_experts = len(tokens_per_expert)
        self.shape = (peers.size, num_experts // peers.size, capacity)
        ends = torch.cumsum(tokens_per_expert, 0)
        row = torch.arange(num_rows, device=ends.device)
        expert = torch.searchsorted(ends, row, right=True)  # E for rows past the kept ones
        first_row = (ends - tokens_per_expert)[expert.clamp(max=num_experts - 1)]
        self.slot = torch.where(expert < num_experts, expert * capacity + row - first_row, num_experts * capacity)

    def pack(self, rows: torch.Tensor) -> torch.Tensor:
        peers, num_local, capacity = self.shape
        slots = rows.new_zeros(peers * num_local * capacity + 1, rows.shape[1])  # the last one is the spare
        return slots.index_copy_(0, self.slot, rows)[:-1].view(*self.shape, -1)  # (P, E_local, C, D)

    def rows_between(self, c: int) -> list[list[int]]:
        lo, hi = self.chunk_experts[c]
        return [[(hi - lo) * self.capacity] * self.peers.size] * self.peers.size  # (E_c, C) slots to every peer

    def outgoing(self, packed: torch.Tensor, c: int) -> torch.Tensor:
        lo, hi = self.chunk_experts[c]
        return packed[:, lo:hi].reshape(-1, packed.shape[-1])

    def to_expert_order(self, c: int, received: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.chunk_experts[c]
        peers, _, capacity = self.shape
        rows = received.view(peers, hi - lo, capacity, -1).transpose(0, 1).reshape(-1, received.shape[-1])
        return rows, torch.full((hi - lo,), peers * capacity, device=received.device)

    def from_expert_order(self, c: int, out: torch.Tensor) -> torch.Tensor:
        lo, hi = self.chunk_experts[c]
        peers, _, capacity = self.shape
        return out.view(hi - lo, peers, capacity, -1).transpose(0, 1).reshape(-1, out.shape[-1])

    def unpack(self, chunks: list[torch.Tensor]) -> torch.Tensor:
        peers, _, capacity = self.shape
        slots = torch.cat([x.view(peers, -1, capacity, x.shape[-1]) for x in chunks], dim=1).flatten(0, 2)
        return torch.cat([slots, slots.new_zeros(1, slots.shape[1])])[self.slot]  # (R, D); past N zero


class _Ragged:
    """Only the kept rows travel; the counts go first (an all-gather on the device) and the split sizes are read
    on the host once per layer, the exchange's one host sync."""

    def __init__(self, tokens_per_expert: torch.Tensor, num_rows: int, chunk_experts: ChunkExperts, peers: Peers):
        self.chunk_experts, self.peers, self.num_rows = chunk_experts, peers, num_rows
        ep_size, me = peers.size, peers.rank
        counts = tokens_per_expert.new_empty(ep_size * len(tokens_per_expert))
        dist.all_gather_into_tensor(counts, tokens_per_expert, group=peers.group)
        counts = counts.view(ep_size, ep_size, -1)  # (P src, P dst, E_local)
        recv = counts[:, me]  # (P, E_local): from EP rank j for this rank's local expert l
        counts_host = counts.tolist()  # the layer's one host sync
        send_host = counts_host[me]
        self.chunk_rows, self.position, self.by_expert, self.counts = [], [], [], []
        device = tokens_per_expert.device
        starts = [sum(map(sum, send_host[:j])) for j in range(ep_size)]
        for lo, hi in chunk_experts:
            self.chunk_rows.append([[sum(per_expert[lo:hi]) for per_expert in row] for row in counts_host])
            received = [row[me] for row in self.chunk_rows[-1]]
            self.position.append(torch.cat([torch.arange(s + sum(send_host[j][:lo]), s + sum(send_host[j][:hi]),
                                                         device=device) for j, s in enumerate(starts)]))
            expert = torch.arange(hi - lo, device=device).repeat(ep_size)
            local_expert = torch.repeat_interleave(expert, recv[:, lo:hi].flatten(), output_size=sum(received))
            self.by_expert.append(torch.argsort(local_expert, stable=True))  # (source, expert) -> (expert, source)
            self.counts.append(recv[:, lo:hi].sum(0))

    def pack(self, rows: torch.Tensor) -> torch.Tensor:
        return rows

    def rows_between(self, c: int) -> list[list[int]]:
        return self.chunk_rows[c]

    def outgoing(self, packed: torch.Tensor, c: int) -> torch.Tensor:
        return packed[self.position[c]]

    def to_expert_order(self, c: int, received: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return received[self.by_expert[c]], self.counts[c]

    def from_expert_order(self, c: int, out: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(out).index_copy_(0, self.by_expert[c], out)

    def unpack(self, chunks: list[torch.Tensor]) -> torch.Tensor:
        out = chunks[0].new_zeros(self.num_rows, chunks[0].shape[1])
        return out.index_copy_(0, torch.cat(self.position), torch.cat(chunks))  # (R, D); past N zero


class _Bounded:
    """(dropless) Every peer gets exactly rows_per_peer[c] rows in chunk c: its rows for the chunk's experts in
    expert order, then zero rows; rows past that are left out, and the most any peer needed is kept on the device
    (`need`) for `check_overflows`. The kept counts (P, E_local) travel ahead on the device, so the receiver
    sorts and sizes its GEMMs with no host sync."""

    def __init__(self, tokens_per_expert: torch.Tensor, num_rows: int, rows_per_peer: list[int],
                 chunk_experts: ChunkExperts, peers: Peers):
        self.chunk_experts, self.peers, self.num_rows = chunk_experts, peers, num_rows
        self.rows_per_peer = rows_per_peer
        per_peer = tokens_per_expert.view(peers.size, -1)  # (P, E_local) rows for each peer's local experts
        first_row = (torch.cumsum(tokens_per_expert, 0) - tokens_per_expert).view(peers.size, -1)
        self.gather, kept, need = [], [], []
        for (lo, hi), limit in zip(chunk_experts, rows_per_peer):
            ends = torch.cumsum(per_peer[:, lo:hi], 1)  # (P, E_c) within the chunk's rows for each peer
            need.append(ends[:, -1].max())
            kept.append(ends.clamp(max=limit).diff(dim=1, prepend=ends.new_zeros(peers.size, 1)))
            place = torch.arange(limit, device=ends.device)
            row = first_row[:, lo, None] + place  # (P, limit); the spare zero row num_rows past the peer's rows
            self.gather.append(torch.where(place < ends[:, -1:], row, num_rows).flatten())
        self.need = torch.stack(need)  # (chunks,) the most rows this rank had for one peer in each chunk
        self.counts_in_flight = start_all_to_all(torch.cat(kept, 1), [1] * peers.size, [1] * peers.size,
                                                 peers.group)  # (P, E_local) kept rows from EP rank j for local l
        self.by_expert, self.counts = None, None

    def _receive_counts(self) -> None:
        """Expert order of every chunk's received rows, from the counts (device work only)."""
        received = self.counts_in_flight.wait()
        self.by_expert, self.counts = [], []
        for (lo, hi), limit in zip(self.chunk_experts, self.rows_per_peer):
            counts = received[:, lo:hi]  # (P, E_c)
            place = torch.arange(limit, device=counts.device).expand(self.peers.size, limit).contiguous()
            local_expert = torch.searchsorted(torch.cumsum(counts, 1), place, right=True)  # (P, limit); E_c: padding
            self.by_expert.append(torch.argsort(local_expert.flatten(), stable=True))  # (source, place) -> expert
            self.counts.append(counts.sum(0))

    def pack(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.cat([rows, rows.new_zeros(1, rows.shape[1])])  # the spare zero row for padding

    def rows_between(self, c: int) -> list[list[int]]:
        return [[self.rows_per_peer[c]] * self.peers.size] * self.peers.size

    def outgoing(self, packed: torch.Tensor, c: int) -> torch.Tensor:
        return packed[self.gather[c]]

    def to_expert_order(self, c: int, received: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.by_expert is None:
            self._receive_counts()
        return received[self.by_expert[c]], self.counts[c]  # padding rows last, past the counts

    def from_expert_order(self, c: int, out: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(out).index_copy_(0, self.by_expert[c], out)

    def unpack(self, chunks: list[torch.Tensor]) -> torch.Tensor:
        out = chunks[0].new_zeros(self.num_rows + 1, chunks[0].shape[1])  # padding rows land on the spare
        return out.index_copy_(0, torch.cat(self.gather), torch.cat(chunks))[:-1]  # (R, D); left-out rows zero


class _ExpertsBetweenExchanges(torch.autograd.Function):
    """rows -> (dispatch, compute(rows, counts, *weight slices), combine) per chunk -> rows' results. Each
    chunk's compute is recorded on detached leaves, so the backward can run it chunk by chunk in the mirror
    schedule (gradients dispatched to the experts, their backward, input gradients combined back)."""

    @staticmethod
    def forward(ctx, rows, layout: Layout, compute, shared_expert, *weights):
        record = any(ctx.needs_input_grad)
        ctx.layout, ctx.graphs = layout, []

        def run(c: int, received: torch.Tensor) -> torch.Tensor:
            lo, hi = layout.chunk_experts[c]
            x, counts = layout.to_expert_order(c, received)
            with torch.set_grad_enabled(record), torch.profiler.record_function("moe.experts"):
                leaves = [t.detach().requires_grad_(record) for t in (x, *(w[lo:hi] for w in weights))]
                out = compute(leaves[0], counts, *leaves[1:])
            ctx.graphs.append((leaves, out))
            return out.detach()

        packed = layout.pack(rows)
        with torch.set_grad_enabled(record):  # the shared expert's graph belongs to the caller
            chunks = pipeline(len(layout.chunk_experts), lambda c: _dispatch(layout, packed, c), run,
                              lambda c, out: _combine(layout, c, out), shared_expert)
        return layout.unpack(chunks)

    @staticmethod
    def backward(ctx, grad):
        layout, weight_grads = ctx.layout, []

        def run(c: int, received: torch.Tensor) -> torch.Tensor:
            leaves, out = ctx.graphs[c]
            grad_out, _ = layout.to_expert_order(c, received)
            with torch.profiler.record_function("moe.experts.backward"):
                grad_x, *grad_w = torch.autograd.grad(out, leaves, grad_out)
            weight_grads.append(grad_w)
            return grad_x

        packed = layout.pack(grad.contiguous())
        chunks = pipeline(len(layout.chunk_experts), lambda c: _dispatch(layout, packed, c), run,
                          lambda c, out: _combine(layout, c, out))
        ctx.graphs = None
        return (layout.unpack(chunks), None, None, None, *(torch.cat(g) for g in zip(*weight_grads)))


class RowsPerPeer:
    """The bounded layout's rows per peer, per chunk: what any rank of the EP group may send any one peer. It
    lives on the host and changes only with needs all-reduced over every rank (`check_overflows`), so all ranks
    agree. Starts at `factor` x the balanced load, grows to GROWTH x a need that overflowed it, and shrinks to
    that of the largest need of the last SHRINK_AFTER forwards when it is more than twice that."""

    GROWTH, ALIGN, SHRINK_AFTER = 1.25, 8, 200

    def __init__(self, factor: float, num_experts: int):
        self.factor, self.num_experts = factor, num_experts
        self.limits: Optional[list[int]] = None  # per chunk, from the first forward's row count
        self.need: Optional[torch.Tensor] = None  # (chunks,) device: the last forward's, until check_overflows
        self.seen: list[int] = []  # per chunk, the largest need since the last shrink check
        self.forwards = 0
        self.overflows = 0  # forwards that overflowed (each one redone), since the model was built

    def for_forward(self, num_rows: int, capacity: int, chunk_experts: ChunkExperts) -> list[int]:
        """Rows per peer per chunk for a forward of num_rows rows (no peer can need more than min(rows,
        experts x capacity))."""
        if self.limits is None:
            self.limits = [self._rounded(self.factor * num_rows * (hi - lo) / self.num_experts)
                           for lo, hi in chunk_experts]
            self.seen = [0] * len(chunk_experts)
        return [min(limit, num_rows, (hi - lo) * capacity) for limit, (lo, hi) in zip(self.limits, chunk_experts)]

    def _rounded(self, rows: float) -> int:
        """rows rounded up to a multiple of ALIGN (at least ALIGN)."""
        return max(self.ALIGN, math.ceil(math.ceil(rows) / self.ALIGN) * self.ALIGN)

    def update(self, need: list[int]) -> bool:
        """need: the last forward's, all-reduced. Grows the limits it exceeded (True: that forward left rows out)."""
        overflowed = [n > limit for n, limit in zip(need, self.limits)]
        self.limits = [self._rounded(self.GROWTH * n) if over else limit
                       for n, limit, over in zip(need, self.limits, overflowed)]
        self.seen = [max(n, seen) for n, seen in zip(need, self.seen)]
        self.forwards += 1
        if self.forwards == self.SHRINK_AFTER:
            targets = [self._rounded(self.GROWTH * seen) for seen in self.seen]
            self.limits = [target if limit > 2 * target else limit for limit, target in zip(self.limits, targets)]
            self.seen, self.forwards = [0] * len(self.seen), 0
        self.overflows += any(overflowed)
        return any(overflowed)


def check_overflows(rows_per_peer: Sequence[RowsPerPeer]) -> list[int]:
    """After a forward: every bounded exchange's need, max over all ranks (one small all-reduce over the world, so
    every rank takes the same decision, also where the forward holds other collectives) and read on the host in
    one transfer: the forward's one host sync. Returns the indices of those that overflowed (their limits grown)."""
    pending = [(i, learned) for i, learned in enumerate(rows_per_peer) if learned.need is not None]
    if not pending:
        return []
    need = torch.cat([learned.need for _, learned in pending])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(need, op=dist.ReduceOp.MAX)
    need, overflowed = need.tolist(), []
    for i, learned in pending:
        mine, need = need[:len(learned.limits)], need[len(learned.limits):]
        learned.need = None
        if learned.update(mine):
            overflowed.append(i)
    return overflowed


class ExpertExchange:
    """Moves rows between the EP ranks of `group`; EP rank j owns global experts [j*E_local, (j+1)*E_local). A
    collective: every rank of the group calls it, also when it sends nothing. `rows_per_peer_factor`: the bounded
    layout's first rows per peer, x the balanced load."""

    def __init__(self, group: ProcessGroup, num_local_experts: int, chunks: int, layout: str,
                 nodes: Optional[NodeLayout], rows_per_peer_factor: float):
        assert 1 <= chunks <= num_local_experts, "moe.a2a_chunks must be in [1, experts per rank]"
        assert layout in ("padded", "ragged", "bounded"), layout
        self.layout, self.peers = layout, Peers(group, nodes)
        self.chunk_experts = [(num_local_experts * c // chunks, num_local_experts * (c + 1) // chunks)
                              for c in range(chunks)]
        self.rows_per_peer = (RowsPerPeer(rows_per_peer_factor, num_local_experts * self.peers.size)
                              if layout == "bounded" else None)

    def __call__(self, rows: torch.Tensor, tokens_per_expert: torch.Tensor, capacity: int,
                 compute: Callable[..., torch.Tensor], weights: Sequence[torch.Tensor],
                 shared_expert: Optional[Callable[[], torch.Tensor]] = None):
        """rows (R, D): N kept rows sorted by global expert, then unused ones; tokens_per_expert (E,) int64, each
        <= capacity. compute(rows sorted by local expert, counts (E_c,), *weights[lo:hi]) for each chunk's
        experts [lo, hi). Returns ((R, D) results in rows' order, zero past N; shared_expert() or None). Bounded:
        rows past a peer's limit come back zero, and the need stays in rows_per_peer.need for check_overflows."""
        layout: Layout
        if self.layout == "padded":
            layout = _Padded(tokens_per_expert, len(rows), capacity, self.chunk_experts, self.peers)
        elif self.layout == "ragged":
            layout = _Ragged(tokens_per_expert, len(rows), self.chunk_experts, self.peers)
        else:
            assert self.rows_per_peer.need is None, "a bounded exchange's overflow went unchecked: check_overflows"
            limits = self.rows_per_peer.for_forward(len(rows), capacity, self.chunk_experts)
            layout = _Bounded(tokens_per_expert, len(rows), limits, self.chunk_experts, self.peers)
            self.rows_per_peer.need = layout.need
        result = []
        run_shared = None if shared_expert is None else (lambda: result.append(shared_expert()))
        out = _ExpertsBetweenExchanges.apply(rows, layout, compute, run_shared, *weights)
        return out, (result[0] if result else None)
