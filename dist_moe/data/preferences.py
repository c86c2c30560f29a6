"""Preference pairs for DPO: a .jsonl of {"prompt", "chosen", "rejected"} rows -> padded token batches.

Each response becomes one sequence `EOS + prompt + response + EOS` (the leading EOS is the document boundary
the model saw in pretraining, so an empty prompt still gives the first response token a context). Inputs
are the sequence without its last token, targets without its first; the mask selects the targets that are
response tokens, so prompt tokens and padding never count. A batch of B pairs is 2B rows, the B chosen
sequences first and then the B rejected ones (TRL's concatenated forward), right-padded to its longest row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dist_moe.data.corpus import DataError
from dist_moe.data.tokenizer import Tokenizer

FIELDS = ("prompt", "chosen", "rejected")


def read_preferences(path: Path | str) -> list[dict[str, str]]:
    """Every row of the file, checked: a malformed one is a DataError naming the file and its line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"data.prefs '{path}': no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"data.prefs '{path}': cannot read it as UTF-8 text ({exc.__class__.__name__})") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{path}:{number}: not a JSON object ({exc})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: expected a JSON object with keys prompt, chosen, rejected")
        missing = [k for k in FIELDS if k not in row]
        if missing:
            raise DataError(f"{path}:{number}: missing key(s) {', '.join(missing)} "
                            "(a row needs prompt, chosen, rejected)")
        wrong = [k for k in FIELDS if not isinstance(row[k], str)]
        if wrong:
            raise DataError(f"{path}:{number}: {', '.join(wrong)} must be string(s)")
        if not row["chosen"] or not row["rejected"]:
            raise DataError(f"{path}:{number}: chosen and rejected must be non-empty")
        rows.append({k: row[k] for k in FIELDS})
    if len(rows) < 2:
        raise DataError(f"data.prefs '{path}': {len(rows)} row(s); need at least 2 (training and held-out pairs)")
    return rows


@dataclass(frozen=True)
class TokenizedPair:
    prompt: list[int]  # after the leading EOS, truncated from the left if the pair does not fit
    chosen: list[int]  # response tokens then EOS, truncated from the right if it does not fit
    rejected: list[int]


def tokenize_pairs(rows: list[dict[str, str]], tokenizer: Tokenizer, seq_len: int) -> list[TokenizedPair]:
    """Fit each pair into seq_len + 1 tokens (seq_len predictions). Both responses share the prompt, so the
    prompt is cut first (keeping its end, next to the response) but keeps at least half the window; then
    the longer response loses its end."""
    eos = tokenizer.eos_id
    encoded = tokenizer.encode_batch([text for row in rows for text in (row["prompt"], row["chosen"], row["rejected"])])
    budget = seq_len  # seq_len + 1 tokens, one of them the leading EOS
    pairs = []
    for i in range(len(rows)):
        prompt, chosen, rejected = encoded[3 * i], encoded[3 * i + 1] + [eos], encoded[3 * i + 2] + [eos]
        longest = max(len(chosen), len(rejected))
        keep = min(len(prompt), max(budget - longest, budget // 2))
        prompt = prompt[len(prompt) - keep:]
        pairs.append(TokenizedPair(prompt, chosen[:budget - keep], rejected[:budget - keep]))
    return pairs


def split_pairs(pairs: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): a fixed random val_fraction of the pairs (at least one) is held out."""
    order = np.random.default_rng(seed).permutation(len(pairs))
    held = max(1, round(val_fraction * len(pairs)))
    return [pairs[i] for i in sorted(order[held:])], [pairs[i] for i in sorted(order[:held])]


def collate(pairs: list[TokenizedPair], eos_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B pairs -> inputs, targets (2B, T) int64 and the response mask (2B, T) bool, chosen rows first."""
    sequences = [[eos_id] + p.prompt + p.chosen for p in pairs] + [[eos_id] + p.prompt + p.rejected for p in pairs]
    starts = [len(p.prompt) for p in pairs] * 2  # index in targets of the first response token
    width = max(len(s) for s in sequences) - 1
    inputs = torch.full((len(sequences), width), eos_id, dtype=torch.int64)
    targets = torch.zeros((len(sequences), width), dtype=torch.int64)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, (seq, start) in enumerate(zip(sequences, starts)):
        n = len(seq) - 1
        inputs[row, :n] = torch.tensor(seq[:-1])
        targets[row, :n] = torch.tensor(seq[1:])
        mask[row, start:n] = True
    return inputs, targets, mask


class PreferenceSampler:
    """Deterministic, resumable batches of pairs: pair i of the global stream is pair order[e][i % n] of epoch
    e = i // n, with order[e] a permutation seeded by (seed, e); step s takes stream positions
    [s * B * W, (s + 1) * B * W) and rank r its rows [r * B, (r + 1) * B). Resuming needs only the step."""

    def __init__(self, pairs: list[TokenizedPair], batch_size: int, eos_id: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        assert pairs and 0 <= rank < world_size
        self.pairs, self.batch_size, self.eos_id, self.seed = pairs, batch_size, eos_id, seed
        self.rank, self.world_size = rank, world_size
        self.step = 0

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, global_batch = len(self.pairs), self.batch_size * self.world_size
        start = step * global_batch + self.rank * self.batch_size
        orders: dict[int, np.ndarray] = {}
        batch = []
        for position in range(start, start + self.batch_size):
            epoch, index = divmod(position, n)
            if epoch not in orders:
                orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(n)
            batch.append(self.pairs[orders[epoch][index]])
        return collate(batch, self.eos_id)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step, "pairs": len(self.pairs),
                "global_batch_size": self.batch_size * self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Restore the position; the seed, pair count and batch shape must match, or the data would change."""
        mine = self.state_dict()
        for key in ("seed", "pairs", "global_batch_size"):
            if state.get(key) != mine[key]:
                raise DataError(f"preference sampler state: {key}={state.get(key)!r} does not match this run's "
                                f"{mine[key]!r}")
        self.step = int(state["step"])
