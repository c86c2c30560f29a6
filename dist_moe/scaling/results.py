"""Results tables: one row per finished training run, the input of every scaling-law fit.

Ours is CSV or JSONL with the columns in `COLUMNS` (a sweep appends one row per run with `append_run`;
readers ignore extra columns, so a sweep may record more). Epoch AI's extraction of the Chinchilla runs
(`Model Size`, `Training FLOP`, `loss`) is read too, with D = C / (6 N). Every user mistake becomes a
one-line `ScalingDataError` naming the file and the row or column.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_moe.errors import UserError

COLUMNS = ("name", "num_experts", "n_total", "n_active", "tokens", "flops", "val_loss")
REQUIRED = ("n_active", "tokens", "val_loss")
EPOCH_COLUMNS = ("Model Size", "Training FLOP", "loss")


class ScalingDataError(UserError, ValueError):
    """A user-facing problem with a results table or with fitting it; the message is one line."""


@dataclass(frozen=True)
class Run:
    """One finished run. N counts parameters (active ones drive the fit), D tokens, C training FLOPs."""

    name: str
    num_experts: int  # routed experts per MoE layer; 1 for a dense model
    n_total: float
    n_active: float
    tokens: float
    flops: float
    val_loss: float


@dataclass(frozen=True)
class ResultsTable:
    """Columns of a results table as arrays of equal length (float64, num_experts int64)."""

    name: tuple[str, ...]
    num_experts: np.ndarray
    n_total: np.ndarray
    n_active: np.ndarray
    tokens: np.ndarray
    flops: np.ndarray
    val_loss: np.ndarray
    source: str = ""

    def __len__(self) -> int:
        return len(self.name)

    def select(self, mask: np.ndarray) -> ResultsTable:
        """Rows where `mask` (bool or integer index array) selects them."""
        index = np.arange(len(self))[mask]
        arrays = {f: getattr(self, f)[index] for f in COLUMNS if f != "name"}
        return ResultsTable(name=tuple(self.name[i] for i in index), source=self.source, **arrays)

    def by_experts(self) -> dict[int, ResultsTable]:
        """One table per expert count, in increasing order."""
        return {int(x): self.select(self.num_experts == x) for x in np.unique(self.num_experts)}

    def with_tokens_per_param(self, minimum: float) -> tuple[ResultsTable, list[str]]:
        """The rows with D / N >= `minimum`, and the names of the others (runs far on the large-model side
        of their budget, still near the loss plateau of their first steps, where L(N, D) does not hold)."""
        ratio = self.tokens / self.n_active
        keep = ratio >= minimum
        if len(self) and not keep.any():
            raise ScalingDataError(f"min-tokens-per-param {minimum:g} leaves no run to fit (the most any run has "
                                   f"is {ratio.max():.3g} tokens per parameter)")
        return self.select(keep), [name for name, kept in zip(self.name, keep) if not kept]


def read_results(path: str | Path) -> ResultsTable:
    """Read a CSV/JSONL results table (ours or Epoch's format) and check every value is positive."""
    path = Path(path)
    if not path.is_file():
        raise ScalingDataError(f"{path}: no such results file")
    if path.suffix in (".jsonl", ".json"):
        rows = _read_jsonl(path)
    elif path.suffix == ".csv":
        with path.open(newline="") as f:
            rows = [(i + 2, row) for i, row in enumerate(csv.DictReader(f))]
    else:
        raise ScalingDataError(f"{path}: expected a .csv or .jsonl results table")
    if not rows:
        raise ScalingDataError(f"{path}: no runs in the results table")
    columns = set(rows[0][1])
    if set(EPOCH_COLUMNS) <= columns:
        return _from_epoch(path, rows)
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise ScalingDataError(
            f"{path}: missing column(s) {', '.join(missing)} (a results table needs {', '.join(REQUIRED)}; "
            f"or Epoch's {', '.join(EPOCH_COLUMNS)})")
    runs = []
    for line, row in rows:
        n_active = _positive(path, line, row, "n_active")
        tokens = _positive(path, line, row, "tokens")
        runs.append(Run(
            name=str(row.get("name") or f"line{line}"),
            num_experts=_experts(path, line, row),
            n_total=_positive(path, line, row, "n_total") if _given(row, "n_total") else n_active,
            n_active=n_active,
            tokens=tokens,
            flops=_positive(path, line, row, "flops") if _given(row, "flops") else 6.0 * n_active * tokens,
            val_loss=_positive(path, line, row, "val_loss"),
        ))
    return _table(runs, str(path))


def append_run(path: str | Path, run: Run) -> None:
    """Append one run to a .jsonl or .csv table (created with a header if absent), for sweeps."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    row = dataclasses.asdict(run)
    if path.suffix == ".jsonl":
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
    elif path.suffix == ".csv":
        new = not path.exists() or path.stat().st_size == 0
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow(row)
    else:
        raise ScalingDataError(f"{path}: expected a .csv or .jsonl results table")


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    for line, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ScalingDataError(f"{path} line {line}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ScalingDataError(f"{path} line {line}: expected a JSON object per line")
        rows.append((line, row))
    return rows


def _from_epoch(path: Path, rows: list[tuple[int, dict]]) -> ResultsTable:
    runs = []
    for line, row in rows:
        n = _positive(path, line, row, "Model Size")
        flops = _positive(path, line, row, "Training FLOP")
        runs.append(Run(name=f"line{line}", num_experts=1, n_total=n, n_active=n,
                        tokens=flops / (6.0 * n), flops=flops, val_loss=_positive(path, line, row, "loss")))
    return _table(runs, str(path))


def _table(runs: list[Run], source: str) -> ResultsTable:
    arrays = {f: np.array([getattr(r, f) for r in runs], dtype=np.float64)
              for f in ("n_total", "n_active", "tokens", "flops", "val_loss")}
    return ResultsTable(name=tuple(r.name for r in runs),
                        num_experts=np.array([r.num_experts for r in runs], dtype=np.int64),
                        source=source, **arrays)


def _given(row: dict, key: str) -> bool:
    return row.get(key) not in (None, "")


def _where(path: Path, line: int, row: dict) -> str:
    name = row.get("name")
    return f"{path} line {line}" + (f" (run '{name}')" if name else "")


def _positive(path: Path, line: int, row: dict, key: str) -> float:
    raw = row.get(key)
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ScalingDataError(f"{_where(path, line, row)}: {key} = {raw!r}, expected a number") from None
    if not (math.isfinite(value) and value > 0):
        raise ScalingDataError(f"{_where(path, line, row)}: {key} = {raw!r}, expected a positive number")
    return value


def _experts(path: Path, line: int, row: dict) -> int:
    if not _given(row, "num_experts"):
        return 1
    value = _positive(path, line, row, "num_experts")
    if value != int(value):
        raise ScalingDataError(f"{_where(path, line, row)}: num_experts = {row['num_experts']!r}, "
                               "expected a whole number (1 for a dense model)")
    return int(value)
