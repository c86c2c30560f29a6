"""The manifest of a prepared folder: what its shards hold, written last, so that its presence (with every
shard's size checked) is what makes a preparation complete. docs/data.md describes the layout.

A shard is `shards/<source>-<split>-<unit>-<n>.bin`: raw token ids (uint16 below 65536 pieces, else uint32,
little-endian), an EOS after every document, one source and one split per file; beside it `.idx.npy`, the
int64 start offset (in tokens) of each of its documents.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from dist_moe.atomic import write_bytes_atomic
from dist_moe.data.corpus import DataError

MANIFEST_FORMAT = 2  # bump when the layout changes: it changes the cache key too
LEGACY_KEY = "legacy"  # the manifest data/__init__.py reads from a run prepared before data sources


@dataclass
class SourceEntry:
    name: str
    path: str
    weight: float
    text_key: str
    documents: int  # kept after deduplication
    duplicates: int  # dropped as exact copies of an earlier document
    train_tokens: int
    val_tokens: int


@dataclass
class ShardEntry:
    file: str  # relative to the prepared folder
    index: str  # the .idx.npy beside it
    source: int
    split: str  # train | val
    tokens: int
    documents: int
    bytes: int
    sha256: str
    unit: int  # the work unit that wrote it: what is rebuilt when it is bad


@dataclass
class Manifest:
    key: str
    tokenizer_sha256: str
    vocab_size: int
    eos_id: int
    dtype: str
    sources: list[SourceEntry]
    shards: list[ShardEntry]
    unigram_entropy_nats: float  # of all train tokens: the loss of the best model that ignores context
    settings: dict
    format: int = MANIFEST_FORMAT
    folder: Optional[Path] = field(default=None, compare=False)  # where it was read from; not stored

    def shards_of(self, source: int, split: str) -> list[ShardEntry]:
        return [s for s in self.shards if s.source == source and s.split == split]

    def tokens(self, split: str) -> int:
        return sum(s.tokens for s in self.shards if s.split == split)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shard_problem(folder: Path, shard: ShardEntry, verify: bool = False) -> Optional[str]:
    """Why the shard cannot be used (missing, wrong size, wrong checksum with `verify`), or None."""
    path = folder / shard.file
    if not path.is_file() or not (folder / shard.index).is_file():
        return f"{shard.file}: missing"
    if path.stat().st_size != shard.bytes:
        return f"{shard.file}: {path.stat().st_size} bytes, expected {shard.bytes}"
    if verify and file_sha256(path) != shard.sha256:
        return f"{shard.file}: checksum differs from the manifest's"
    return None


def write_manifest(folder: Path, manifest: Manifest) -> None:
    record = {k: v for k, v in asdict(manifest).items() if k != "folder"}
    write_bytes_atomic(folder / "manifest.json", (json.dumps(record, indent=1) + "\n").encode())


def read_manifest(folder: Path | str, verify: bool = False) -> Manifest:
    """The manifest of a complete prepared folder; a DataError when it is missing or a shard is bad
    (sizes always checked, contents hashed with `verify`)."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    if manifest is None:
        raise DataError(f"{folder / 'manifest.json'}: missing or unreadable (run `dist-moe data prepare`)")
    for shard in manifest.shards:
        problem = shard_problem(folder, shard, verify)
        if problem:
            raise DataError(f"{folder}: {problem} (run `dist-moe data prepare` to rebuild it)")
    return manifest


def load_manifest(folder: Path) -> Optional[Manifest]:
    """The parsed manifest.json, unchecked; None when missing or of another format."""
    try:
        record = json.loads((folder / "manifest.json").read_text())
        if record.get("format") != MANIFEST_FORMAT:
            return None
        record["sources"] = [SourceEntry(**s) for s in record["sources"]]
        record["shards"] = [ShardEntry(**s) for s in record["shards"]]
        return Manifest(**record, folder=folder)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
