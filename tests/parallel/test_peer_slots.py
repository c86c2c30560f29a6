"""The bounded exchange's learned bound (parallel/exchange.py: PeerSlots, fit_peer_slots), host-side logic only;
tests/distributed/test_expert_parallel.py runs the exchange itself on 4 gloo processes."""

import torch

from dist_moe.parallel.exchange import PeerSlots, fit_peer_slots


def test_first_bound_is_factor_times_balanced_load_rounded_up_and_capped_by_what_a_peer_can_get():
    slots = PeerSlots(factor=1.25, num_experts=16)  # e.g. EP=2, 8 local experts in chunks of 2 and 6
    chunks = [(0, 2), (2, 8)]
    # 1000 rows: balanced load to one peer's chunk = 1000 * 2/16 = 125 and 375 rows; x 1.25 = 156.25, 468.75
    assert slots.slots(num_rows=1000, capacity=500, bounds=chunks) == [160, 472]
    assert slots.bound == [160, 472]
    # fewer rows (e.g. decoding): no peer can get more than the rows, or its experts x capacity
    assert slots.slots(num_rows=40, capacity=20, bounds=chunks) == [40, 40]
    assert slots.slots(num_rows=40, capacity=4, bounds=chunks) == [8, 24]
    assert PeerSlots(factor=0.001, num_experts=16).slots(1000, 500, chunks) == [8, 8]  # at least ALIGN


def test_overflow_grows_the_bound_with_margin_and_reports_it():
    slots = PeerSlots(factor=1.0, num_experts=4)
    assert slots.slots(64, 64, [(0, 1), (1, 2)]) == [16, 16]
    assert slots.update([16, 9]) is False and slots.bound == [16, 16]  # a need equal to the bound fits
    assert slots.update([17, 3]) is True and slots.bound == [24, 16]  # ceil(1.25 * 17) = 22 -> 24
    assert slots.update([24, 16]) is False
    assert slots.update([25, 17]) is True and slots.bound == [32, 24]
    assert slots.overflows == 2  # forwards that overflowed (and were redone), one per forward however many chunks


def test_bound_shrinks_only_when_far_above_the_window_need():
    slots = PeerSlots(factor=1.0, num_experts=2)
    slots.slots(1000, 1000, [(0, 1), (1, 2)])
    slots.bound = [400, 100]
    for _ in range(PeerSlots.SHRINK_AFTER - 1):
        slots.update([60, 60])
    assert slots.bound == [400, 100]  # not before the window ends
    slots.update([150, 70])
    assert slots.bound == [192, 100]  # 400 > 2 * fit(1.25 * 150) = 2 * 192; 100 <= 2 * 88
    for _ in range(PeerSlots.SHRINK_AFTER):
        slots.update([150, 70])
    assert slots.bound == [192, 100]


def test_fit_reads_every_pending_need_once_and_names_the_overflowed():
    a, b, idle = PeerSlots(1.0, 4), PeerSlots(1.0, 4), PeerSlots(1.0, 4)
    for slots in (a, b, idle):
        slots.slots(32, 32, [(0, 2)])  # bound 16
    a.need, b.need = torch.tensor([12]), torch.tensor([30])
    assert fit_peer_slots([a, b, idle]) == [1]
    assert a.bound == [16] and b.bound == [40] and idle.bound == [16]
    assert a.need is None and b.need is None
    assert fit_peer_slots([a, b, idle]) == []  # nothing pending: no read
