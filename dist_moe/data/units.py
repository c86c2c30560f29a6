"""The work of one unit (a run of a source's files, or a byte range of a big .jsonl), the same in-process and
inside a Ray Data worker. Two passes over the unit's documents:

- `scan_unit` hashes every document (blake2b, 16 bytes: deduplication and the train/val split) and keeps
  the documents whose hash falls under the sample rate for the tokenizer;
- `tokenize_unit` tokenizes the documents the driver kept, into shards of at most `shard_bytes`.

Every file is written atomically and a unit's record (`work/scan-<unit>.json`, `work/done-<unit>.json`)
comes last, so a unit with a record is finished and a killed preparation redoes only the others.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from dist_moe.atomic import atomic_output, write_bytes_atomic
from dist_moe.data.corpus import DataError
from dist_moe.data.manifest import ShardEntry, shard_problem, token_dtype
from dist_moe.data.sources import Part, SourceFile, read_documents
from dist_moe.data.tokenizer import Tokenizer

TRAIN, VAL, DUPLICATE = 0, 1, 2  # a document's code in work/codes-<unit>.npy
_BATCH_CHARS = 1_000_000  # documents are tokenized in batches of about this much text
Progress = Callable[[int, int], None]  # (documents, bytes) done since the last call


@dataclass(frozen=True)
class WorkUnit:
    index: int
    source: int
    text_key: str
    parts: tuple[Part, ...]

    @property
    def bytes(self) -> int:
        return sum(p.end - p.start for p in self.parts)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> "WorkUnit":
        d = json.loads(text)
        parts = tuple(Part(SourceFile(**p["file"]), p["start"], p["end"]) for p in d["parts"])
        return WorkUnit(d["index"], d["source"], d["text_key"], parts)


def doc_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def hash_fractions(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two independent uniform numbers in [0, 1) per (n, 16) uint8 hash: (split, sample)."""
    halves = np.ascontiguousarray(hashes).view("<u8")  # (n, 2)
    return halves[:, 0] / 2.0**64, halves[:, 1] / 2.0**64


def work_file(folder: Path, stage: str, unit: int, suffix: str) -> Path:
    return folder / "work" / f"{stage}-{unit:05d}.{suffix}"


def scan_unit(folder: Path, unit: WorkUnit, sample_rate: float, progress: Optional[Progress] = None) -> dict:
    """Hash the unit's documents into work/scan-<unit>.npy, its tokenizer sample into .sample.jsonl; the
    record {unit, documents, bytes, skipped} is written last and returned (read back when it exists)."""
    record_path = work_file(folder, "scan", unit.index, "json")
    if record_path.is_file():
        return json.loads(record_path.read_text())
    hashes, skipped = bytearray(), []
    with atomic_output(work_file(folder, "scan", unit.index, "sample.jsonl")) as tmp, open(tmp, "w") as sample:
        for part in unit.parts:
            before = len(hashes) // 16
            for text in read_documents(part, unit.text_key, skipped):
                h = doc_hash(text)
                hashes += h
                if int.from_bytes(h[8:], "little") / 2.0**64 < sample_rate:
                    sample.write(json.dumps(text) + "\n")
            if progress:
                progress(len(hashes) // 16 - before, part.end - part.start)
    array = np.frombuffer(bytes(hashes), dtype=np.uint8).reshape(-1, 16)
    with atomic_output(work_file(folder, "scan", unit.index, "npy")) as tmp, open(tmp, "wb") as f:
        np.save(f, array)
    record = {"unit": unit.index, "documents": len(array), "bytes": unit.bytes, "skipped": skipped}
    write_bytes_atomic(record_path, json.dumps(record).encode())
    return record


def sample_texts(folder: Path, units: list[WorkUnit]) -> Iterator[str]:
    """The tokenizer sample the scans kept, in unit order."""
    for unit in units:
        with open(work_file(folder, "scan", unit.index, "sample.jsonl")) as f:
            for line in f:
                yield json.loads(line)


def finished_unit(folder: Path, unit: int, verify: bool) -> Optional[dict]:
    """The done record of a unit whose shards are all there with their recorded size (and checksum with
    `verify`), else None: the unit is (re)built."""
    try:
        record = json.loads(work_file(folder, "done", unit, "json").read_text())
        shards = [ShardEntry(**s) for s in record["shards"]]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if any(shard_problem(folder, s, verify) for s in shards) or not (folder / record["counts"]).is_file():
        return None
    return record


def tokenize_unit(folder: Path, unit: WorkUnit, tokenizer: Tokenizer, shard_bytes: int,
                  progress: Optional[Progress] = None) -> dict:
    """Tokenize the unit's kept documents (work/codes-<unit>.npy) into its shards; write and return its done
    record {unit, shards, counts}, counts being the .npy of its train token frequencies."""
    codes = np.load(work_file(folder, "codes", unit.index, "npy"))
    for pattern in (f"{unit.source}-*-{unit.index:05d}-*", f".{unit.source}-*-{unit.index:05d}-*"):
        for old in (folder / "shards").glob(pattern):
            old.unlink()  # a previous attempt's shards (the new ones may be fewer) and temp files
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {TRAIN: _ShardWriter(folder, unit, "train", dtype, shard_bytes),
               VAL: _ShardWriter(folder, unit, "val", dtype, shard_bytes)}
    counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    seen = 0
    for part in unit.parts:
        before = seen
        for texts in _batches(read_documents(part, unit.text_key)):
            batch_codes = codes[seen:seen + len(texts)]
            seen += len(texts)
            kept = [(t, c) for t, c in zip(texts, batch_codes) if c != DUPLICATE]
            for ids, (_, code) in zip(tokenizer.encode_batch([t for t, _ in kept]), kept):
                tokens = np.array(ids + [tokenizer.eos_id], dtype=dtype)
                writers[code].add(tokens)
                if code == TRAIN:
                    counts += np.bincount(tokens, minlength=tokenizer.vocab_size)
        if progress:
            progress(seen - before, part.end - part.start)
    if seen != len(codes):
        names = ", ".join(p.file.path for p in unit.parts[:2])
        raise DataError(f"source files changed during preparation ({names}, ...): {seen} documents now, "
                        f"{len(codes)} when scanned; run the preparation again")
    counts_path = work_file(folder, "counts", unit.index, "npy")
    with atomic_output(counts_path) as tmp, open(tmp, "wb") as f:
        np.save(f, counts)
    shards = [asdict(s) for w in writers.values() for s in w.close()]
    record = {"unit": unit.index, "documents": seen, "shards": shards,
              "counts": str(counts_path.relative_to(folder))}
    write_bytes_atomic(work_file(folder, "done", unit.index, "json"), json.dumps(record).encode())
    return record


class _ShardWriter:
    """Streams documents into shards/<source>-<split>-<unit>-<n>.bin, starting a new file before one would
    pass `shard_bytes` (a document longer than that gets a file of its own). A file is written under a hidden
    temp name, flushed and renamed when full; only the documents' lengths stay in memory."""

    def __init__(self, folder: Path, unit: WorkUnit, split: str, dtype: np.dtype, shard_bytes: int):
        self.folder, self.unit, self.split, self.shard_bytes = folder, unit, split, shard_bytes
        self.dtype = dtype.newbyteorder("<")
        self.done: list[ShardEntry] = []
        self._file = None

    def add(self, tokens: np.ndarray) -> None:
        data = tokens.astype(self.dtype, copy=False).tobytes()
        if self._file is not None and self._size + len(data) > self.shard_bytes:
            self._finish()
        if self._file is None:
            self._name = f"shards/{self.unit.source}-{self.split}-{self.unit.index:05d}-{len(self.done):03d}"
            self._tmp = self.folder / f"{self._name}.bin.{os.getpid()}.tmp"
            self._tmp = self._tmp.with_name("." + self._tmp.name)
            self._tmp.parent.mkdir(parents=True, exist_ok=True)
            self._file, self._size, self._lengths, self._sha = open(self._tmp, "wb"), 0, [], hashlib.sha256()
        self._file.write(data)
        self._sha.update(data)
        self._size += len(data)
        self._lengths.append(len(tokens))

    def close(self) -> list[ShardEntry]:
        if self._file is not None:
            self._finish()
        return self.done

    def _finish(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        starts = np.concatenate([[0], np.cumsum(self._lengths)[:-1]]).astype(np.int64)
        write_bytes_atomic(self.folder / f"{self._name}.idx.npy", _npy_bytes(starts))
        os.replace(self._tmp, self.folder / f"{self._name}.bin")
        self.done.append(ShardEntry(file=f"{self._name}.bin", index=f"{self._name}.idx.npy",
                                    source=self.unit.source, split=self.split, tokens=self._size // self.dtype.itemsize,
                                    documents=len(self._lengths), bytes=self._size, sha256=self._sha.hexdigest(),
                                    unit=self.unit.index))


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _batches(texts: Iterator[str]) -> Iterator[list[str]]:
    batch, size = [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= _BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
