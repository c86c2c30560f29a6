"""The expert-parallel exchange, chunked so that communication hides behind the experts' compute.

`ExpertExchange(rows, tokens_per_expert, capacity, compute, weights)` sends this rank's rows (sorted by global
expert) to the EP ranks owning their experts, runs `compute` there and brings the results back in the rows'
order. It is a collective over the EP group (every rank of it calls it, also when it sends nothing).

Chunks run along experts (`moe.a2a_chunks`): chunk c is a contiguous slice of every rank's local experts. A
chunk then is a complete piece of expert work (its own slice of the weights, its rows grouped by expert on
arrival), so the experts run unchanged on it, the weight gradients of chunks are disjoint (no accumulation,
and every expert's rows stay in one GEMM, so the arithmetic is that of the unchunked exchange), and each
chunk's rows are contiguous per peer. Chunking along tokens would split every expert's GEMM instead.
`pipeline` is the schedule: while the experts compute chunk c, chunk c+1 travels to them and chunk c-1
travels back; the backward (`_ExpertsBetweenExchanges.backward`) runs the same schedule on the gradients.

Three layouts (`moe.exchange`):
  padded:  every (peer, local expert) pair gets exactly C slots (C = capacity; the bound T when dropless), so
           all sizes are static: no counts travel, no host sync, CUDA-graph friendly (so every rank of the group
           must feed the layer the same number of tokens, as training's fixed micro-batches do). Padding slots
           are zero rows, whose expert outputs and weight-gradient terms are exactly zero, never read back.
  ragged:  only kept rows travel; the counts go first (an all-gather on the device) and the split sizes are
           read on the host once per layer, the only host sync of the exchange.
  bounded: (dropless) every peer gets exactly B rows per chunk, B a host-side bound learned per layer and chunk
           (`PeerSlots`); the counts per (peer, local expert) travel on the device beside the rows and the
           receiver sorts by expert and sizes the GEMMs from them on the device, so no host sync in the layer.
           A peer's rows past B are left out and the need is recorded on the device; the model reads every
           layer's need once per forward (`fit_peer_slots`) and, if one overflowed, raises its bound and redoes
           the forward (model/moe/layer.py: forward_within_bounds) before any backward, so what trains is exact.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from dist_moe.parallel.all_to_all import NodeLayout, Pending, start_all_to_all, start_hierarchical


def pipeline(num_chunks: int, dispatch: Callable[[int], Pending],
             compute: Callable[[int, torch.Tensor], torch.Tensor], combine: Callable[[int, torch.Tensor], Pending],
             beside: Optional[Callable[[], None]] = None) -> list[torch.Tensor]:
    """Chunk c+1 is dispatched before chunk c computes, and chunk c is combined while c+1 computes; `beside`
    (independent work, e.g. the shared expert) runs under the first dispatch. Returns the combined chunks."""
    in_flight = dispatch(0)
    if beside is not None:
        beside()
    returning = []
    for c in range(num_chunks):
        received = in_flight.wait()
        if c + 1 < num_chunks:
            in_flight = dispatch(c + 1)
        returning.append(combine(c, compute(c, received)))
    return [pending.wait() for pending in returning]


class _Layout:
    """Where each chunk's rows sit on both sides; `dispatch`/`combine` move one chunk each way."""

    def __init__(self, bounds: list[tuple[int, int]], group: ProcessGroup, nodes: Optional[NodeLayout]):
        self.bounds, self.group, self.nodes = bounds, group, nodes
        self.ep_rank, self.ep_size = dist.get_rank(group), dist.get_world_size(group)

    def dispatch(self, packed: torch.Tensor, c: int) -> Pending:
        return self.send(self.outgoing(packed, c), self.rows_between(c))

    def combine(self, c: int, out: torch.Tensor) -> Pending:
        rows_between = self.rows_between(c)
        return self.send(self.from_expert_order(c, out), [list(column) for column in zip(*rows_between)])

    def send(self, x: torch.Tensor, rows_between: list[list[int]]) -> Pending:
        """rows_between[i][j]: rows EP rank i sends to EP rank j in this exchange."""
        if self.nodes is not None:
            return start_hierarchical(x, rows_between, self.ep_rank, self.nodes)
        me = self.ep_rank
        return start_all_to_all(x, [row[me] for row in rows_between], rows_between[me], self.group)


class _Padded(_Layout):
    """Slots (P, E_local, C): row r of expert e at slot e*C + (its place within e); rows past N to a spare."""

    def __init__(self, tokens_per_expert: torch.Tensor, num_rows: int, capacity: int, **kw):
        super().__init__(**kw)
        num_experts = len(tokens_per_expert)
        self.shape, self.capacity = (self.ep_size, num_experts // self.ep_size, capacity), capacity
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
        lo, hi = self.bounds[c]
        return [[(hi - lo) * self.capacity] * self.ep_size] * self.ep_size  # (E_c, C) slots to every peer

    def outgoing(self, packed: torch.Tensor, c: int) -> torch.Tensor:
        lo, hi = self.bounds[c]
        return packed[:, lo:hi].reshape(-1, packed.shape[-1])

    def to_expert_order(self, c: int, received: torch.Tensor):
        lo, hi = self.bounds[c]
        peers, _, capacity = self.shape
        rows = received.view(peers, hi - lo, capacity, -1).transpose(0, 1).reshape(-1, received.shape[-1])
        return rows, torch.full((hi - lo,), peers * capacity, device=received.device)

    def from_expert_order(self, c: int, out: torch.Tensor) -> torch.Tensor:
        lo, hi = self.bounds[c]
        peers, _, capacity = self.shape
        return out.view(hi - lo, peers, capacity, -1).transpose(0, 1).reshape(-1, out.shape[-1])

    def unpack(self, chunks: list[torch.Tensor]) -> torch.Tensor:
        peers, _, capacity = self.shape
        slots = torch.cat([x.view(peers, -1, capacity, x.shape[-1]) for x in chunks], dim=1).flatten(0, 2)
        return torch.cat([slots, slots.new_zeros(1, slots.shape[1])])[self.slot]  # (R, D); past N zero


class _Ragged(_Layout):
    """Only the kept rows travel, with split sizes from the exchanged counts (read on the host once)."""

    def __init__(self, tokens_per_expert: torch.Tensor, num_rows: int, **kw):
        super().__init__(**kw)
        ep_size = self.ep_size
        counts = tokens_per_expert.new_empty(ep_size * len(tokens_per_expert))
        dist.all_gather_into_tensor(counts, tokens_per_expert, group=self.group)
        counts = counts.view(ep_size, ep_size, -1)  # (P src, P dst, E_local)
        recv = counts[:, self.ep_rank]  # (P, E_local): from EP rank j for this rank's local expert l
        counts_host = counts.tolist()  # the layer's one host sync
        send_host = counts_host[self.ep_rank]
        self.num_rows, self.chunk_rows, self.position, self.by_expert, self.counts = num_rows, [], [], [], []
        device = tokens_per_expert.device
        starts = [sum(map(sum, send_host[:j])) for j in range(ep_size)]
        for lo, hi in self.bounds:
            self.chunk_rows.append([[sum(per_expert[lo:hi]) for per_expert in row] for row in counts_host])
            received = [row[self.ep_rank] for row in self.chunk_rows[-1]]
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

    def to_expert_order(self, c: int, received: torch.Tensor):
        return received[self.by_expert[c]], self.counts[c]

    def from_expert_order(self, c: int, out: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(out).index_copy_(0, self.by_expert[c], out)

    def unpack(self, chunks: list[torch.Tensor]) -> torch.Tensor:
        out = chunks[0].new_zeros(self.num_rows, chunks[0].shape[1])
        return out.index_copy_(0, torch.cat(self.position), torch.cat(chunks))  # (R, D); past N zero


class _Bounded(_Layout):
    """Slots (P, B_c) per chunk c: peer j's rows for the chunk's experts, in expert order, then zero rows; rows
    past B_c are left out. The kept counts (P, E_local) go ahead on the device; nothing is read on the host."""

    def __init__(self, tokens_per_expert: torch.Tensor, num_rows: int, slots: list[int], **kw):
        super().__init__(**kw)
        self.slots, self.num_rows = slots, num_rows
        per_peer = tokens_per_expert.view(self.ep_size, -1)  # (P, E_local) rows for each peer's local experts
        first_row = (torch.cumsum(tokens_per_expert, 0) - tokens_per_expert).view(self.ep_size, -1)
        self.gather, kept, need = [], [], []
        for (lo, hi), bound in zip(self.bounds, slots):
            ends = torch.cumsum(per_peer[:, lo:hi], 1)  # (P, E_c) within the chunk's rows for each peer
            need.append(ends[:, -1].max())
            kept.append(ends.clamp(max=bound).diff(dim=1, prepend=ends.new_zeros(self.ep_size, 1)))
            slot = torch.arange(bound, device=ends.device)
            row = first_row[:, lo, None] + slot  # (P, B_c); the spare zero row num_rows past the peer's rows
            self.gather.append(torch.where(slot < ends[:, -1:], row, num_rows).flatten())
        self.need = torch.stack(need)  # (chunks,) the most rows this rank had for one peer in each chunk
        self.counts_in_flight = start_all_to_all(torch.cat(kept, 1), [1] * self.ep_size, [1] * self.ep_size,
                                                 self.group)  # (P, E_local) kept rows from EP rank j for local l
        self.by_expert, self.counts = None, None

    def _receive_counts(self) -> None:
        """Expert order of every chunk's received slots, from the counts (device work only)."""
        received = self.counts_in_flight.wait()
        self.by_expert, self.counts = [], []
        for (lo, hi), bound in zip(self.bounds, self.slots):
            counts = received[:, lo:hi]  # (P, E_c)
            slot = torch.arange(bound, device=counts.device).expand(self.ep_size, bound).contiguous()
            local_expert = torch.searchsorted(torch.cumsum(counts, 1), slot, right=True)  # (P, B_c); E_c: padding
            self.by_expert.append(torch.argsort(local_expert.flatten(), stable=True))  # (source, slot) -> expert
            self.counts.append(counts.sum(0))

    def pack(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.cat([rows, rows.new_zeros(1, rows.shape[1])])  # the spare zero row for padding slots

    def rows_between(self, c: int) -> list[list[int]]:
        return [[self.slots[c]] * self.ep_size] * self.ep_size

    def outgoing(self, packed: torch.Tensor, c: int) -> torch.Tensor:
        return packed[self.gather[c]]

    def to_expert_order(self, c: int, received: torch.Tensor):
        if self.by_expert is None:
            self._receive_counts()
        return received[self.by_expert[c]], self.counts[c]  # padding slots last, past the counts

    def from_expert_order(self, c: int, out: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(out).index_copy_(0, self.by_expert[c], out)

    def unpack(self, chunks: list[torch.Tensor]) -> torch.Tensor:
        out = chunks[0].new_zeros(self.num_rows + 1, chunks[0].shape[1])  # padding slots land on the spare
        return out.index_copy_(0, torch.cat(self.gather), torch.cat(chunks))[:-1]  # (R, D); left-out rows zero


class _ExpertsBetweenExchanges(torch.autograd.Function):
    """rows -> (dispatch, compute(rows, counts, *weight slices), combine) per chunk -> rows' results. Each
    chunk's compute is recorded on detached leaves, so the backward can run it chunk by chunk in the mirror
    schedule (gradients dispatched to the experts, their backward, input gradients combined back)."""

    @staticmethod
    def forward(ctx, rows, layout, compute, beside, *weights):
        record = any(ctx.needs_input_grad)
        ctx.layout, ctx.graphs = layout, []

        def run(c: int, received: torch.Tensor) -> torch.Tensor:
            lo, hi = layout.bounds[c]
            x, counts = layout.to_expert_order(c, received)
            with torch.set_grad_enabled(record), torch.profiler.record_function("moe.experts"):
                leaves = [t.detach().requires_grad_(record) for t in (x, *(w[lo:hi] for w in weights))]
                out = compute(leaves[0], counts, *leaves[1:])
            ctx.graphs.append((leaves, out))
            return out.detach()

        packed = layout.pack(rows)
        with torch.set_grad_enabled(record):  # beside's graph belongs to the caller
            chunks = pipeline(len(layout.bounds), lambda c: layout.dispatch(packed, c), run, layout.combine, beside)
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
        chunks = pipeline(len(layout.bounds), lambda c: layout.dispatch(packed, c), run, layout.combine)
        ctx.graphs = None
        return (layout.unpack(chunks), None, None, None, *(torch.cat(g) for g in zip(*weight_grads)))


class PeerSlots:
    """The bounded exchange's bound B per chunk: rows any rank of the EP group may send any one peer. It lives on
    the host and changes only with needs all-reduced over every rank (`fit_peer_slots`), so all ranks agree.
    Starts at `factor` x the balanced load, grows to GROWTH x a need that overflowed it, and shrinks to that of
    the largest need of the last SHRINK_AFTER forwards when it is more than twice that."""

    GROWTH, ALIGN, SHRINK_AFTER = 1.25, 8, 200

    def __init__(self, factor: float, num_experts: int):
        self.factor, self.num_experts = factor, num_experts
        self.bound: Optional[list[int]] = None  # per chunk, from the first forward's row count
        self.need: Optional[torch.Tensor] = None  # (chunks,) device: the last forward's, until fit_peer_slots
        self.seen: list[int] = []  # per chunk, the largest need since the last shrink check
        self.forwards = 0
        self.overflows = 0  # forwards this bound overflowed (each one redone), since the model was built

    def slots(self, num_rows: int, capacity: int, bounds: list[tuple[int, int]]) -> list[int]:
        """B per chunk for a forward of num_rows rows (no peer can need more than min(rows, experts x capacity))."""
        if self.bound is None:
            self.bound = [self._rounded(self.factor * num_rows * (hi - lo) / self.num_experts) for lo, hi in bounds]
            self.seen = [0] * len(bounds)
        return [min(bound, num_rows, (hi - lo) * capacity) for bound, (lo, hi) in zip(self.bound, bounds)]

    def _rounded(self, rows: float) -> int:
        """rows rounded up to a multiple of ALIGN (at least ALIGN)."""
        return max(self.ALIGN, math.ceil(math.ceil(rows) / self.ALIGN) * self.ALIGN)

    def update(self, need: list[int]) -> bool:
        """need: the last forward's, all-reduced. Grows the bounds it exceeded (True: that forward dropped rows)."""
        overflowed = [n > bound for n, bound in zip(need, self.bound)]
        self.bound = [self._rounded(self.GROWTH * n) if over else bound
                      for n, bound, over in zip(need, self.bound, overflowed)]
        self.seen = [max(n, seen) for n, seen in zip(need, self.seen)]
        self.forwards += 1
        if self.forwards == self.SHRINK_AFTER:
            targets = [self._rounded(self.GROWTH * seen) for seen in self.seen]
            self.bound = [target if bound > 2 * target else bound for bound, target in zip(self.bound, targets)]
            self.seen, self.forwards = [0] * len(self.seen), 0
        self.overflows += any(overflowed)
        return any(overflowed)


def fit_peer_slots(peer_slots: Sequence[PeerSlots]) -> list[int]:
    """After a forward: every bounded exchange's need, max over all ranks (one small all-reduce over the world, so
    every rank takes the same decision, also where the forward holds other collectives) and read on the host in
    one transfer: the forward's one host sync. Returns the indices of those that overflowed (their bounds grown)."""
    pending = [(i, slots) for i, slots in enumerate(peer_slots) if slots.need is not None]
    if not pending:
        return []
    need = torch.cat([slots.need for _, slots in pending])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(need, op=dist.ReduceOp.MAX)
    need, overflowed = need.tolist(), []
    for i, slots in pending:
        mine, need = need[:len(slots.bound)], need[len(slots.bound):]
        slots.need = None
        if slots.update(mine):
            overflowed.append(i)
    return overflowed


class ExpertExchange:
    """Moves rows between the EP ranks of `group`; EP rank j owns global experts [j*E_local, (j+1)*E_local).
    layout: padded | ragged | bounded (see the module docstring); bound_factor: the bounded layout's first bound."""

    def __init__(self, group: ProcessGroup, num_local_experts: int, chunks: int = 1, layout: str = "ragged",
                 nodes: Optional[NodeLayout] = None, bound_factor: float = 1.25):
        assert 1 <= chunks <= num_local_experts, "moe.a2a_chunks must be in [1, experts per rank]"
        assert layout in ("padded", "ragged", "bounded"), layout
        self.group, self.layout, self.nodes = group, layout, nodes
        self.bounds = [(num_local_experts * c // chunks, num_local_experts * (c + 1) // chunks) for c in range(chunks)]
        ep_size = dist.get_world_size(group)
        self.peer_slots = PeerSlots(bound_factor, num_local_experts * ep_size) if layout == "bounded" else None

    def __call__(self, rows: torch.Tensor, tokens_per_expert: torch.Tensor, capacity: int,
                 compute: Callable[..., torch.Tensor], weights: Sequence[torch.Tensor],
                 beside: Optional[Callable[[], torch.Tensor]] = None):
        """rows (R, D): N kept rows sorted by global expert, then unused ones; tokens_per_expert (E,) int64, each
        <= capacity. compute(rows sorted by local expert, counts (E_c,), *weights[lo:hi]) for each chunk's
        experts [lo, hi). Returns ((R, D) results in rows' order, zero past N; beside() or None). Bounded: rows
        past a peer's bound come back zero, and the need stays in peer_slots.need for fit_peer_slots."""
        kw = dict(bounds=self.bounds, group=self.group, nodes=self.nodes)
        if self.layout == "padded":
            layout = _Padded(tokens_per_expert, len(rows), capacity, **kw)
        elif self.layout == "ragged":
            layout = _Ragged(tokens_per_expert, len(rows), **kw)
        else:
            assert self.peer_slots.need is None, "a bounded exchange's overflow went unchecked: see fit_peer_slots"
            slots = self.peer_slots.slots(len(rows), capacity, self.bounds)
            layout = _Bounded(tokens_per_expert, len(rows), slots, **kw)
            self.peer_slots.need = layout.need
        result = []
        run_beside = None if beside is None else (lambda: result.append(beside()))
        out = _ExpertsBetweenExchanges.apply(rows, layout, compute, run_beside, *weights)
        return out, (result[0] if result else None)
