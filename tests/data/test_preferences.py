"""Preference pairs: file checks with line numbers, prompt masking, truncation, padding and the sampler."""

import json

import pytest
import torch

from dist_moe.config import load_config
from dist_moe.data import DataError
from dist_moe.data.preferences import (PreferenceSampler, TokenizedPair, collate, read_preferences, split_pairs,
                                       tokenize_pairs)
from dist_moe.model.transformer import Transformer
from dist_moe.train.dpo import sequence_logps

EOS = 1


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})


@pytest.mark.parametrize("bad, expected", [
    ("{not json", "not a JSON object"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"prompt": "p", "chosen": "c"}), "missing key(s) rejected"),
    (json.dumps({"prompt": "p", "chosen": 3, "rejected": "r"}), "chosen must be string(s)"),
    (json.dumps({"prompt": "p", "chosen": "", "rejected": "r"}), "must be non-empty"),
])
def test_a_malformed_row_is_one_line_naming_the_file_and_line(tmp_path, bad, expected):
    path = write(tmp_path / "prefs.jsonl", [GOOD, "", GOOD, bad, GOOD])
    with pytest.raises(DataError) as info:
        read_preferences(path)
    message = str(info.value)
    assert message.startswith(f"{path}:4: ") and expected in message and "\n" not in message


def test_rows_are_read_in_order_and_blank_lines_skipped(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}", "extra": 1} for i in range(3)]
    path = write(tmp_path / "prefs.jsonl", [json.dumps(rows[0]), "  ", json.dumps(rows[1]), json.dumps(rows[2])])
    assert read_preferences(path) == [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
    with pytest.raises(DataError, match="no such file"):
        read_preferences(tmp_path / "missing.jsonl")


class CharTokenizer:
    """One token per character (ids 2 + ord % 50), EOS = 1: lengths are easy to reason about."""

    eos_id = EOS

    def encode_batch(self, texts):
        return [[2 + ord(ch) % 50 for ch in text] for text in texts]


def test_truncation_keeps_the_prompts_end_and_at_least_half_the_window():
    rows = [{"prompt": "a" * 30, "chosen": "b" * 3, "rejected": "c" * 5},  # fits after cutting the prompt
            {"prompt": "a" * 30, "chosen": "b" * 40, "rejected": "c" * 2}]  # the response is cut too
    short, long = tokenize_pairs(rows, CharTokenizer(), seq_len=16)
    assert len(short.prompt) == 16 - 6 and short.chosen[-1] == EOS and len(short.rejected) == 6
    assert len(long.prompt) == 8 and len(long.chosen) == 8 and long.chosen[-1] != EOS and len(long.rejected) == 3
    for pair in (short, long):
        assert 1 + len(pair.prompt) + max(len(pair.chosen), len(pair.rejected)) <= 16 + 1


def test_collate_masks_prompts_and_padding_and_shifts_targets():
    pairs = [TokenizedPair([5, 6], [7, EOS], [8, 9, 10, EOS]), TokenizedPair([], [11, EOS], [12, EOS])]
    inputs, targets, mask = collate(pairs, EOS)
    assert inputs.shape == targets.shape == mask.shape == (4, 6)  # 1 + 2 + 4 tokens, minus one
    assert inputs[2].tolist() == [EOS, 5, 6, 8, 9, 10] and targets[2].tolist() == [5, 6, 8, 9, 10, EOS]
    assert targets[mask].tolist() == [7, EOS, 11, EOS, 8, 9, 10, EOS, 12, EOS]  # responses only, chosen rows first
    assert mask.tolist()[0] == [False, False, True, True, False, False]
    assert mask.tolist()[1] == [True, True, False, False, False, False]  # empty prompt: EOS is the context


def test_padding_does_not_change_a_pairs_log_probs():
    """Right padding is invisible to causal attention and masked out of the sum (dense FFNs here: routed pad
    tokens can take MoE capacity, see docs/dpo.md)."""
    cfg = load_config("tiny", ["model.vocab_size=64", "model.d_model=32", "model.num_layers=2", "model.num_heads=4",
                               "model.d_ff=64", "moe.moe_every=0"])
    torch.manual_seed(0)
    model = Transformer(cfg).double().eval()
    short = TokenizedPair([5, 6], [7, 8, EOS], [9, EOS])
    long = TokenizedPair([20, 21, 22, 23], [24] * 10 + [EOS], [25, 26, EOS])
    alone = sequence_logps(model(collate([short], EOS)[0]).logits, *collate([short], EOS)[1:])
    inputs, targets, mask = collate([short, long], EOS)
    padded = sequence_logps(model(inputs).logits, targets, mask)
    assert inputs.shape[1] > collate([short], EOS)[0].shape[1]
    torch.testing.assert_close(padded[[0, 2]], alone, rtol=1e-12, atol=1e-12)


def test_sampler_is_a_function_of_the_step_splits_ranks_and_covers_each_epoch():
    pairs = [TokenizedPair([i], [100 + i, EOS], [200 + i, EOS]) for i in range(10)]
    whole = PreferenceSampler(pairs, batch_size=4, eos_id=EOS, seed=3)
    ranks = [PreferenceSampler(pairs, batch_size=2, eos_id=EOS, seed=3, rank=r, world_size=2) for r in range(2)]
    seen = []
    for step in range(5):  # 20 positions: two epochs of 10
        x = whole.next_batch()[0]
        parts = [r.batch_at(step)[0] for r in ranks]
        chosen_prompts = x[:4, 1].tolist()  # rank r's rows are rows [2r, 2r + 2) of the one-rank batch
        assert chosen_prompts == [p[row, 1].item() for p in parts for row in (0, 1)]
        seen += chosen_prompts
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]  # each epoch its own order
    resumed = PreferenceSampler(pairs, batch_size=4, eos_id=EOS, seed=3)
    resumed.load_state_dict(whole.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(resumed.next_batch(), whole.batch_at(5)))
    with pytest.raises(DataError, match="pairs=10 does not match this run's 9"):
        PreferenceSampler(pairs[:9], batch_size=4, eos_id=EOS, seed=3).load_state_dict(whole.state_dict())


def test_held_out_split_is_fixed_disjoint_and_complete():
    train, held = split_pairs(list(range(100)), 0.1, seed=5)
    assert len(held) == 10 and sorted(train + held) == list(range(100))
    assert split_pairs(list(range(100)), 0.1, seed=5) == (train, held)
    assert split_pairs(list(range(3)), 0.05, seed=5)[1]  # at least one pair held out
