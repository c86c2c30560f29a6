import json

import numpy as np
import pytest
import torch
from prepared_fixture import counting, write_prepared

from dist_moe.data import DataError
from dist_moe.data.sampler import MixtureSampler

# Source j's shard k holds tokens j*20000 + k*5000 + i: a window's first token names its source, shard, offset.
def source(j, weight, shard_tokens=(3000, 1000), val=(600,)):
    return {"weight": weight, "train": [counting(j * 20_000 + k * 5000, n) for k, n in enumerate(shard_tokens)],
            "val": [counting(j * 20_000 + 15_000 + k * 1000, n) for k, n in enumerate(val)]}


@pytest.fixture
def one(tmp_path):
    return write_prepared(tmp_path / "one", {"corpus": source(0, 1.0, shard_tokens=(10_000,))})


@pytest.fixture
def mix(tmp_path):
    return write_prepared(tmp_path / "mix", {"web": source(0, 3.0), "code": source(1, 1.0), "held": source(2, 0.0)})


def sampler(manifest, batch_size=4, seed=0, rank=0, world_size=1, split="train", seq_len=16):
    return MixtureSampler(manifest, split, seq_len, batch_size, seed, rank=rank, world_size=world_size)


def origin(x):
    """(source, shard, offset) of each row's window, decoded from its first token."""
    first = x[:, 0].numpy().astype(np.int64)
    return first // 20_000, first % 20_000 // 5000, first % 5000


def test_windows_are_contiguous_slices_and_y_is_x_shifted_by_one(mix):
    x, y = sampler(mix, batch_size=32).next_batch()
    assert x.shape == y.shape == (32, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x, x[:, :1] + torch.arange(16)) and torch.equal(y, x + 1)
    assert len(set(x[:, 0].tolist())) > 1


def test_one_source_draws_the_windows_of_the_single_shard_sampler_it_replaced(one):
    """The old TokenSampler's offsets: rng((seed, step)).integers(0, tokens - seq_len, size=G)."""
    s = sampler(one, batch_size=8, seed=7)
    for step in range(3):
        want = np.random.default_rng([7, step]).integers(0, 10_000 - 16, size=8)
        assert s.next_batch()[0][:, 0].tolist() == want.tolist()


def test_batches_are_a_pure_function_of_seed_and_step(mix):
    a, b = sampler(mix, seed=3), sampler(mix, seed=3)
    first = [a.next_batch()[0] for _ in range(5)]
    assert all(torch.equal(first[s], b.batch_at(s)[0]) for s in range(5))
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first[0], sampler(mix, seed=4).next_batch()[0])


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_split_the_same_global_batch_as_one_rank(mix, world_size):
    whole = sampler(mix, batch_size=8, seed=1)
    ranks = [sampler(mix, 8 // world_size, seed=1, rank=r, world_size=world_size) for r in range(world_size)]
    for _ in range(3):
        x, y = whole.next_batch()
        parts = [s.next_batch() for s in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    assert all(np.array_equal(s.tokens_seen, whole.tokens_seen) for s in ranks)


def resumed(manifest, state, world_size, global_batch=8):
    """The ranks of a run resumed from `state` on world_size ranks with the same global batch."""
    ranks = [sampler(manifest, global_batch // world_size, seed=5, rank=r, world_size=world_size)
             for r in range(world_size)]
    for s in ranks:
        s.load_state_dict(json.loads(json.dumps(state)))  # survives a checkpoint round trip
    return ranks


def global_batches(ranks, steps):
    out = []
    for _ in range(steps):
        parts = [s.next_batch() for s in ranks]
        out.append((torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])))
    states = [s.state_dict() for s in ranks]
    assert all(state == states[0] for state in states)  # every rank saves the same position
    return out, states[0]


def test_resume_1_to_2_to_1_ranks_gives_the_never_stopped_global_batches_and_token_counts(mix):
    straight, end = global_batches(resumed(mix, sampler(mix, 8, seed=5).state_dict(), 1), 12)
    first, state = global_batches(resumed(mix, sampler(mix, 8, seed=5).state_dict(), 1), 4)
    second, state = global_batches(resumed(mix, state, 2), 5)
    third, state = global_batches(resumed(mix, state, 1), 3)
    for (x, y), (want_x, want_y) in zip(first + second + third, straight):
        assert torch.equal(x, want_x) and torch.equal(y, want_y)
    assert state == end and state["step"] == 12
    assert sum(state["tokens_seen"].values()) == 12 * 8 * 16


def test_an_elastic_shrink_keeping_the_global_batch_gives_the_same_global_batches(mix):
    """4 workers at micro batch 2 lose two: 2 workers at micro batch 4 (config.fit_to_workers) carry on."""
    straight, end = global_batches(resumed(mix, sampler(mix, 8, seed=5).state_dict(), 4), 9)
    before, state = global_batches(resumed(mix, sampler(mix, 8, seed=5).state_dict(), 4), 4)
    after, state = global_batches(resumed(mix, state, 2), 5)
    for (x, y), (want_x, want_y) in zip(before + after, straight):
        assert torch.equal(x, want_x) and torch.equal(y, want_y)
    assert state == end


@pytest.mark.parametrize("key, value", [("seed", 6), ("seq_len", 32), ("global_batch_size", 8), ("mixture", "0" * 16),
                                        ("step", -1), ("step", "3"), ("tokens_seen", {"web": 0}), ("tokens_seen", None)])
def test_loading_a_state_that_does_not_match_is_a_data_error(mix, key, value):
    s = sampler(mix, seed=5)
    state = {**s.state_dict(), key: value}
    with pytest.raises(DataError, match=f"sampler state: {key}="):
        s.load_state_dict(state)
    assert s.step == 0


def test_a_resume_on_other_weights_or_shards_or_from_before_mixtures_is_refused(tmp_path, mix):
    state = sampler(mix).state_dict()
    single_shard_era = {k: state[k] for k in ("seed", "step", "seq_len", "global_batch_size")}
    with pytest.raises(DataError, match="sampler state: no 'mixture' .a checkpoint from before data sources"):
        sampler(mix).load_state_dict(single_shard_era)
    reweighted = write_prepared(tmp_path / "w", {"web": source(0, 1.0), "code": source(1, 1.0), "held": source(2, 0.0)})
    with pytest.raises(DataError, match="mixture=.*other data sources, weights or shards"):
        sampler(reweighted).load_state_dict(state)
    longer = write_prepared(tmp_path / "s", {"web": source(0, 3.0, (3000, 1001)), "code": source(1, 1.0),
                                             "held": source(2, 0.0)})
    with pytest.raises(DataError, match="mixture="):
        sampler(longer).load_state_dict(state)
    sampler(write_prepared(tmp_path / "same", {"web": source(0, 3.0), "code": source(1, 1.0),
                                               "held": source(2, 0.0)})).load_state_dict(state)


def worst_window_error(sources, weights, window):
    """The largest |share - weight| of any source over any `window` consecutive steps."""
    onehot = np.stack([np.bincount(sources[s], minlength=len(weights)) for s in range(len(sources))])
    cumulative = np.concatenate([np.zeros((1, len(weights))), np.cumsum(onehot, axis=0)])
    shares = (cumulative[window:] - cumulative[:-window]) / (window * len(sources[0]))
    return np.abs(shares - weights).max()


@pytest.mark.parametrize("weights", [[0.97, 0.03], [0.5, 0.5], [0.6, 0.3, 0.1], [0.001, 0.989, 0.01],
                                     [1 / 3, 1 / 3, 1 / 3], [0.05] * 20])
@pytest.mark.parametrize("global_batch", [1, 8, 96])
def test_every_source_share_is_within_1_percent_over_any_1000_steps(tmp_path, weights, global_batch):
    manifest = write_prepared(tmp_path, {f"s{j}": {"weight": w, "train": [counting(0, 40)], "val": [counting(0, 40)]}
                                         for j, w in enumerate(weights)})
    s = sampler(manifest, batch_size=global_batch)
    sources = [s.row_sources(step) for step in range(5000)]
    assert worst_window_error(sources, np.array(weights), 1000) <= 0.01
    rows = 1000 * global_batch  # in fact within a few rows of the exact quota (measured: at most 4), also over 10 steps
    assert worst_window_error(sources, np.array(weights), 1000) * rows <= 5
    assert worst_window_error(sources, np.array(weights), 10) * 10 * global_batch <= 5
    # rows drawn at random with the weights as probabilities miss by more (measured: 7 to 415 rows)
    rng = np.random.default_rng(0)
    drawn = [rng.choice(len(weights), size=global_batch, p=np.array(weights) / sum(weights)) for _ in range(5000)]
    assert worst_window_error(drawn, np.array(weights), 1000) * rows > 6


def test_rows_hold_their_sources_tokens_and_counts_are_what_was_drawn(mix):
    s = sampler(mix, batch_size=16, seed=2)
    counts = np.zeros(3, dtype=np.int64)
    for step in range(50):
        want = s.row_sources(step)
        got, _, _ = origin(s.next_batch()[0])
        assert got.tolist() == want.tolist()
        counts += np.bincount(want, minlength=3)
    assert counts[2] == 0 and counts.sum() == 800 and abs(counts[0] / 800 - 0.75) <= 0.01
    assert s.tokens_seen.tolist() == (counts * 16).tolist()
    assert s.tokens_seen_scalars() == {"data/tokens/web": counts[0] * 16.0, "data/tokens/code": counts[1] * 16.0}


def test_shards_are_chosen_by_their_windows_and_windows_never_cross_a_shard_end(mix):
    s = sampler(mix, batch_size=64, seed=0)
    src, shard, offset = map(np.concatenate, zip(*(origin(s.next_batch()[0]) for _ in range(200))))
    lengths = np.array([3000, 1000])
    assert offset.min() == 0 and (offset <= lengths[shard] - 17).all()
    for j in (0, 1):  # shard 0 has (3000 - 16) / (3000 - 16 + 1000 - 16) = 0.752 of source j's windows
        share = (shard[src == j] == 0).mean()
        assert abs(share - 2984 / 3968) < 0.03, share


def test_short_shards_are_skipped_and_a_source_without_windows_is_a_data_error(tmp_path):
    manifest = write_prepared(tmp_path / "a", {"web": source(0, 1.0, shard_tokens=(16, 100))})
    s = sampler(manifest, batch_size=64)
    _, shard, offset = origin(s.next_batch()[0])
    assert set(shard.tolist()) == {1} and offset.max() <= 100 - 17
    empty = write_prepared(tmp_path / "b", {"web": source(0, 1.0), "tiny": source(1, 1.0, shard_tokens=(16,))})
    with pytest.raises(DataError, match=r"data source 'tiny': no train shard of at least data.seq_len \+ 1 = 17"):
        sampler(empty)
    with pytest.raises(DataError, match="data source 'web': no val shard"):
        sampler(write_prepared(tmp_path / "c", {"web": source(0, 1.0, val=(10,))}), split="val")
    with pytest.raises(DataError, match="every weight is 0"):
        sampler(write_prepared(tmp_path / "d", {"web": source(0, 0.0)}))


def test_eval_batches_are_fixed_evenly_spread_per_source_and_independent_of_seed_step_and_world_size(mix):
    val = sampler(mix, split="val", seed=0)
    val.step = 123
    assert val.sources == [0, 1, 2]  # the held-out source (weight 0) is evaluated too
    for j in val.sources:
        batches = list(val.eval_batches(3, j))
        starts = torch.cat([x[:, 0] for x, _ in batches])
        assert len(batches) == 3 and (origin(batches[0][0])[0] == j).all()
        assert starts[0] == j * 20_000 + 15_000 and starts[-1] == j * 20_000 + 15_000 + 600 - 17
        assert bool((starts.diff() > 0).all())
        again = [sampler(mix, 2, seed=9, rank=r, world_size=2, split="val").eval_batches(3, j) for r in range(2)]
        for (x, y), x0y0, x1y1 in zip(batches, *again):
            assert torch.equal(torch.cat([x0y0[0], x1y1[0]]), x) and torch.equal(torch.cat([x0y0[1], x1y1[1]]), y)


def test_eval_windows_spread_over_all_of_a_sources_shards(tmp_path):
    manifest = write_prepared(tmp_path, {"web": source(0, 1.0, val=(100, 100))})
    (x, _), = sampler(manifest, batch_size=10, split="val").eval_batches(1, 0)
    firsts = x[:, 0].tolist()  # 84 + 84 windows, evenly spaced: 0, 19, 37, ... across both shards
    assert firsts[0] == 15_000 and firsts[-1] == 16_000 + 100 - 17
    assert {f // 1000 for f in firsts} == {15, 16}


def test_uint32_shards_are_read_with_their_dtype(tmp_path):
    manifest = write_prepared(tmp_path, {"big": {"weight": 1.0, "train": [counting(70_000, 100)],
                                                 "val": [counting(70_000, 100)]}}, dtype="uint32")
    (x, y), = sampler(manifest, seq_len=8, split="val").eval_batches(1, 0)
    assert x[-1, 0] == 70_000 + 100 - 9 and torch.equal(x, x[:, :1] + torch.arange(8)) and torch.equal(y, x + 1)


def test_shard_file_errors_name_the_path(tmp_path, mix):
    s = sampler(mix, batch_size=64)
    (mix.folder / mix.shards[0].file).unlink()
    with pytest.raises(DataError, match=r"0-train-00000.bin': no such file"):
        s.next_batch()
    (mix.folder / mix.shards[0].file).write_bytes(b"\0" * 10)
    with pytest.raises(DataError, match=r"0-train-00000.bin': 5 uint16 tokens, the manifest says 3000"):
        sampler(mix, batch_size=64).next_batch()


def test_source_names_become_distinct_metric_tags(tmp_path):
    manifest = write_prepared(tmp_path, {"/data/web crawl": source(0, 1.0), "data/web crawl": source(1, 1.0)})
    assert sampler(manifest).names == ["data_web_crawl_0", "data_web_crawl_1"]
