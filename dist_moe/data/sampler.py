"""Deterministic, resumable sampling of training windows from a mixture of memmapped token shards.

The global batch for step s is a pure function of (seed, s). Its G = batch_size * world_size rows are the
global rows t = s*G .. s*G + G - 1, and row t goes to the source whose slice of [0, 1) (widths = mixture
weights) holds frac(t / golden ratio): a low-discrepancy sequence, so over any N consecutive rows every
source gets its share within about two rows. A generator seeded with (seed, s) then picks each row's window
uniformly among all windows of its source (so a shard is chosen in proportion to its windows; windows never
cross shards), and rank r takes rows [r * batch_size, (r + 1) * batch_size). Every world size with the same
global batch sees the same data, and resuming needs only the step counter.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from dist_moe.data.corpus import DataError
from dist_moe.data.manifest import LEGACY_KEY

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio: frac(t / phi) in 64-bit fixed point


class MixtureSampler:
    """Windows of one split's shards as (x, y) int64 tensors of shape (batch_size, seq_len), y = x shifted by
    one token. `manifest` is the prepared folder's (dist_moe.data.read_manifest). `step` counts the batches
    drawn by `next_batch` (micro batches, not optimizer steps); `tokens_seen` counts the global batch's tokens
    per source over those steps, on the host. Shards shorter than seq_len + 1 tokens are skipped."""

    def __init__(self, manifest, split: str, seq_len: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        assert 0 <= rank < world_size and seq_len >= 1 and batch_size >= 1 and split in ("train", "val")
        self.folder, self.dtype, self.split = Path(manifest.folder), np.dtype(manifest.dtype), split
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.names = _unique_tags([source.name for source in manifest.sources])
        self.weights = np.array([source.weight for source in manifest.sources], dtype=np.float64)
        if not (self.weights > 0).any():
            raise DataError("data sources: every weight is 0, at least one source needs a positive weight")
        self.mixture, self.key = _fingerprint(manifest, split), manifest.key
        used = [j for j in range(len(self.names)) if self.weights[j] > 0 or split != "train"]
        self.shards = sorted((s for s in manifest.shards if s.split == split and s.tokens > seq_len
                              and s.source in used), key=lambda s: s.source)  # stable: each source one range
        windows = np.array([s.tokens - seq_len for s in self.shards], dtype=np.int64)
        self._shard_end = np.cumsum(windows)  # global window index -> shard: searchsorted
        self._shard_begin = self._shard_end - windows
        shard_source = np.array([s.source for s in self.shards], dtype=np.int64)
        self.windows = np.bincount(shard_source, weights=windows, minlength=len(self.names)).astype(np.int64)
        self._source_begin = np.concatenate([[0], np.cumsum(self.windows)[:-1]])
        for j in used:
            if self.windows[j] == 0:
                raise DataError(f"data source '{manifest.sources[j].name}': no {split} shard of at least "
                                f"data.seq_len + 1 = {seq_len + 1} tokens (more data, or a larger val_fraction)")
        self.sources = used  # the sources this split draws from (train) or evaluates (val)
        self._mixed = np.flatnonzero(self.weights > 0)
        cumulative = np.cumsum(self.weights[self._mixed] / self.weights[self._mixed].sum())[:-1]
        self._bounds = np.array([min(int(c * 2.0**64), 2**64 - 1) for c in cumulative], dtype=np.uint64)
        self._memmaps: dict[int, np.memmap] = {}
        self.step = 0
        self.tokens_seen = np.zeros(len(self.names), dtype=np.int64)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def row_sources(self, step: int) -> np.ndarray:
        """(G,) source index of each row of the global batch at `step` (the low-discrepancy quota)."""
        rows = np.arange(step * self.global_batch_size, (step + 1) * self.global_batch_size, dtype=np.uint64)
        return self._mixed[np.searchsorted(self._bounds, rows * _GOLDEN, side="right")]

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the global batch for `step`; does not move the sampler."""
        return self._draw(step)[0]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch, sources = self._draw(self.step)
        self.tokens_seen += np.bincount(sources, minlength=len(self.names)) * self.seq_len
        self.step += 1
        return batch

    def _draw(self, step: int) -> tuple[tuple[torch.Tensor, torch.Tensor], np.ndarray]:
        sources = self.row_sources(step)
        rng = np.random.default_rng([self.seed, step])
        starts = self._source_begin[sources] + rng.integers(0, self.windows[sources])  # (G,) global windows
        return self._windows(self._rows(starts)), sources

    def tokens_seen_scalars(self) -> dict[str, float]:
        """data/tokens/<source>: the global batch's tokens per training source since step 0."""
        return {f"data/tokens/{self.names[j]}": float(self.tokens_seen[j]) for j in self._mixed}

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step, "seq_len": self.seq_len,
                "global_batch_size": self.global_batch_size, "mixture": self.mixture,
                "tokens_seen": {self.names[j]: int(self.tokens_seen[j]) for j in self._mixed}}

    def load_state_dict(self, state: dict) -> None:
        """Restore the position; the seed, batch shape and data mixture must match, or the data would
        silently change. The world size may differ (same global batch)."""
        if "mixture" not in state:  # a checkpoint from before data sources: one source, one shard a split
            if self.key != LEGACY_KEY:
                raise DataError("sampler state: no 'mixture' (a checkpoint from before data sources) and the data "
                                "it was prepared from is gone; resume it with the dist_moe version that wrote it")
            state = {**state, "mixture": self.mixture, "tokens_seen": {
                self.names[0]: state.get("step", 0) * self.global_batch_size * self.seq_len}}
        for key in ("seed", "seq_len", "global_batch_size", "mixture"):
            if state.get(key) != getattr(self, key):
                raise DataError(f"sampler state: {key}={state.get(key)!r} does not match this run's "
                                f"{getattr(self, key)!r}" + (" (other data sources, weights or shards)"
                                                             if key == "mixture" else ""))
        step, seen = state.get("step"), state.get("tokens_seen")
        if not isinstance(step, int) or step < 0:
            raise DataError(f"sampler state: step={step!r}, expected a non-negative integer")
        names = [self.names[j] for j in self._mixed]
        if not isinstance(seen, dict) or sorted(seen) != sorted(names) or not all(
                isinstance(v, int) for v in seen.values()):
            raise DataError(f"sampler state: tokens_seen={seen!r}, expected integers for {names}")
        self.step = step
        self.tokens_seen[self._mixed] = [seen[name] for name in names]

    def eval_batches(self, num_batches: int, source: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed set of windows of `source`, evenly spaced over all its windows (in shard order), the same
        for every seed, step and world size with this global batch: eval losses are comparable across
        steps and runs."""
        assert source in self.sources
        total = num_batches * self.global_batch_size
        starts = np.linspace(0, self.windows[source] - 1, total).round().astype(np.int64)
        for batch in (self._source_begin[source] + starts).reshape(num_batches, self.global_batch_size):
            yield self._windows(self._rows(batch))

    def _rows(self, global_rows: np.ndarray) -> np.ndarray:
        return global_rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def _windows(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) global window indices -> (x, y); one contiguous copy per row out of its shard's memmap."""
        shards = np.searchsorted(self._shard_end, starts, side="right")
        offsets = starts - self._shard_begin[shards]
        windows = np.empty((len(starts), self.seq_len + 1), dtype=np.int64)  # (B, T + 1)
        for row, (shard, offset) in enumerate(zip(shards.tolist(), offsets.tolist())):
            windows[row] = self._tokens(shard)[offset:offset + self.seq_len + 1]
        windows = torch.from_numpy(windows)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()  # (B, T) each

    def _tokens(self, shard: int) -> np.memmap:
        """The shard's tokens, memory-mapped read-only on first use."""
        if shard not in self._memmaps:
            entry = self.shards[shard]
            path = self.folder / entry.file
            if not path.is_file():
                raise DataError(f"token shard '{path}': no such file (listed in the manifest; prepare again)")
            tokens = np.memmap(path, dtype=self.dtype, mode="r")
            if len(tokens) != entry.tokens:
                raise DataError(f"token shard '{path}': {len(tokens)} {self.dtype} tokens, the manifest says "
                                f"{entry.tokens} (prepare again)")
            self._memmaps[shard] = tokens
        return self._memmaps[shard]


def _fingerprint(manifest, split: str) -> str:
    """A short hash of the sources' weights and this split's shard list: what a resume must find again."""
    mixture = {"weights": [[s.name, s.weight] for s in manifest.sources],
               "shards": [[s.file, s.source, s.tokens, s.sha256] for s in manifest.shards
                          if s.split == split]}
    return hashlib.sha256(json.dumps(mixture, sort_keys=True).encode()).hexdigest()[:16]


def _unique_tags(names: list[str]) -> list[str]:
    """Source names as metric tags: characters TensorBoard groups badly become _, repeats get their index."""
    tags = [re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "source" for name in names]
    return [f"{tag}_{j}" if tags.count(tag) > 1 else tag for j, tag in enumerate(tags)]
