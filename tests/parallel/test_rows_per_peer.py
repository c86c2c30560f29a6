"""The bounded exchange's learned rows per peer (parallel/exchange.py: RowsPerPeer, check_overflows), host-side
logic only; tests/distributed/test_expert_parallel.py runs the exchange itself on 4 gloo processes."""

import torch

from dist_moe.parallel.exchange import RowsPerPeer, check_overflows


def test_first_limit_is_factor_times_balanced_load_rounded_up_and_capped_by_what_a_peer_can_get():
    rows = RowsPerPeer(factor=1.25, num_experts=16)  # e.g. EP=2, 8 local experts in chunks of 2 and 6
    chunks = [(0, 2), (2, 8)]
    # 1000 rows: balanced load to one peer's chunk = 1000 * 2/16 = 125 and 375 rows; x 1.25 = 156.25, 468.75
    assert rows.for_forward(num_rows=1000, capacity=500, chunk_experts=chunks) == [160, 472]
    assert rows.limits == [160, 472]
    # fewer rows (e.g. decoding): no peer can get more than the rows, or its experts x capacity
    assert rows.for_forward(num_rows=40, capacity=20, chunk_experts=chunks) == [40, 40]
    assert rows.for_forward(num_rows=40, capacity=4, chunk_experts=chunks) == [8, 24]
    assert RowsPerPeer(factor=0.001, num_experts=16).for_forward(1000, 500, chunks) == [8, 8]  # at least ALIGN


def test_overflow_grows_the_limit_with_margin_and_reports_it():
    rows = RowsPerPeer(factor=1.0, num_experts=4)
    assert rows.for_forward(64, 64, [(0, 1), (1, 2)]) == [16, 16]
    assert rows.update([16, 9]) is False and rows.limits == [16, 16]  # a need equal to the limit fits
    assert rows.update([17, 3]) is True and rows.limits == [24, 16]  # ceil(1.25 * 17) = 22 -> 24
    assert rows.update([24, 16]) is False
    assert rows.update([25, 17]) is True and rows.limits == [32, 24]
    assert rows.overflows == 2  # forwards that overflowed (and were redone), one per forward however many chunks


def test_limit_shrinks_only_when_far_above_the_window_need():
    rows = RowsPerPeer(factor=1.0, num_experts=2)
    rows.for_forward(1000, 1000, [(0, 1), (1, 2)])
    rows.limits = [400, 100]
    for _ in range(RowsPerPeer.SHRINK_AFTER - 1):
        rows.update([60, 60])
    assert rows.limits == [400, 100]  # not before the window ends
    rows.update([150, 70])
    assert rows.limits == [192, 100]  # 400 > 2 * fit(1.25 * 150) = 2 * 192; 100 <= 2 * 88
    for _ in range(RowsPerPeer.SHRINK_AFTER):
        rows.update([150, 70])
    assert rows.limits == [192, 100]


def test_check_reads_every_pending_need_once_and_names_the_overflowed():
    a, b, idle = RowsPerPeer(1.0, 4), RowsPerPeer(1.0, 4), RowsPerPeer(1.0, 4)
    for rows in (a, b, idle):
        rows.for_forward(32, 32, [(0, 2)])  # limit 16
    a.need, b.need = torch.tensor([12]), torch.tensor([30])
    assert check_overflows([a, b, idle]) == [1]
    assert a.limits == [16] and b.limits == [40] and idle.limits == [16]
    assert a.need is None and b.need is None
    assert check_overflows([a, b, idle]) == []  # nothing pending: no read
