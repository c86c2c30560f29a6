"""The data pipeline: sources -> sentencepiece BPE -> token shards + manifest -> deterministic sampler.

`prepare` (prepare.py) builds or finds `<cache_dir>/<key>/` and `read_manifest` (manifest.py) reads it;
docs/data.md describes both. `prepare_data` is what a run calls on rank 0: prepare, then copy the tokenizer
into the run dir and record the prepared folder in `run_dir/data.json`, which `load_prepared` reads on the
other ranks (after a barrier), on resume, and for `dist-moe generate`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_moe.atomic import write_bytes_atomic
from dist_moe.config import DataConfig
from dist_moe.data.corpus import DataError
from dist_moe.data.manifest import LEGACY_KEY, Manifest, ShardEntry, SourceEntry, read_manifest
from dist_moe.data.prepare import prepare
from dist_moe.data.tokenizer import Tokenizer

__all__ = ["DataError", "Manifest", "PreparedData", "Tokenizer", "load_prepared", "prepare",
           "prepare_data", "read_manifest"]


@dataclass
class PreparedData:
    """What a run recorded in run_dir/data.json: the prepared folder and the tokenizer's copy in the run dir
    (the record also names the token counts, for readers of the run dir)."""

    folder: Path  # the prepared folder (manifest.json, shards/)
    tokenizer_path: Path  # the copy in the run dir
    manifest: Manifest

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    @property
    def eos_id(self) -> int:
        return self.manifest.eos_id

    @property
    def unigram_entropy_nats(self) -> float:
        return self.manifest.unigram_entropy_nats

    @property
    def train_tokens(self) -> int:
        return self.manifest.tokens("train")

    @property
    def val_tokens(self) -> int:
        return self.manifest.tokens("val")


def prepare_data(cfg: DataConfig, run_dir: Path, show_progress: bool = True, tokenizer: Path | None = None,
                 cluster_cfg=None) -> PreparedData:
    """`prepare`, then the tokenizer copied into the run dir and the folder recorded in run_dir/data.json. A run
    dir prepared before data sources keeps the data it recorded, while that is still there (`legacy_manifest`)."""
    run_dir = Path(run_dir)
    legacy = _legacy_prepared(run_dir)
    if legacy is not None:
        return legacy
    folder = prepare(cfg, cluster_cfg, show_progress=show_progress, tokenizer=tokenizer)
    write_bytes_atomic(run_dir / "tokenizer.model", (folder / "tokenizer.model").read_bytes())
    manifest = read_manifest(folder)
    record = {"folder": str(folder), "tokenizer_path": "tokenizer.model",  # relative: the run dir may move
              "vocab_size": manifest.vocab_size, "train_tokens": manifest.tokens("train"),
              "val_tokens": manifest.tokens("val"), "unigram_entropy_nats": manifest.unigram_entropy_nats}
    write_bytes_atomic(run_dir / "data.json", (json.dumps(record, indent=2) + "\n").encode())
    return load_prepared(run_dir)


def load_prepared(run_dir: Path) -> PreparedData:
    """The PreparedData that `prepare_data` recorded in run_dir, its manifest and shards checked."""
    path = Path(run_dir) / "data.json"
    try:
        record = json.loads(path.read_text())
        tokenizer = Path(run_dir) / record["tokenizer_path"]
        folder = Path(record["folder"]) if "folder" in record else Path(record["train_path"]).parent
    except (OSError, ValueError, TypeError, KeyError):
        raise DataError(f"{path}: cannot read the prepared data record; run prepare_data for this run dir "
                        "first") from None
    if not tokenizer.is_file():
        raise DataError(f"{tokenizer}: missing (recorded in {path})")
    manifest = read_manifest(folder) if "folder" in record else legacy_manifest(record, path)
    return PreparedData(folder=manifest.folder, tokenizer_path=tokenizer, manifest=manifest)


def legacy_manifest(record: dict, path: Path) -> Manifest:
    """The data of a run prepared before data sources (data.json naming one train.bin and one val.bin, with
    their meta.json) as a manifest of one source with one shard per split: the sampler then draws exactly
    what the run's old sampler drew, so its checkpoints resume bit for bit."""
    train, val = Path(record["train_path"]), Path(record["val_path"])
    try:
        meta = json.loads((train.parent / "meta.json").read_text())
    except (OSError, ValueError):
        raise DataError(f"{train.parent / 'meta.json'}: missing or unreadable (recorded in {path}; was the data "
                        "cache cleaned?)") from None
    itemsize = np.dtype(meta["dtype"]).itemsize
    shards = []
    for split, file in (("train", train), ("val", val)):
        tokens = meta[f"{split}_tokens"]
        if not file.is_file() or file.stat().st_size != tokens * itemsize:
            raise DataError(f"{file}: missing or not {tokens} tokens (recorded in {path}; was the data cache cleaned?)")
        shards.append(ShardEntry(file=file.name, index="", source=0, split=split, tokens=tokens,
                                 documents=meta[f"{split}_documents"], bytes=tokens * itemsize, sha256="", unit=0))
    source = SourceEntry(name="corpus", path=record.get("corpus", ""), weight=1.0, text_key="text",
                         documents=meta["train_documents"] + meta["val_documents"], duplicates=0,
                         train_tokens=meta["train_tokens"], val_tokens=meta["val_tokens"])
    return Manifest(key=LEGACY_KEY, tokenizer_sha256=meta["tokenizer_sha256"], vocab_size=meta["vocab_size"],
                    eos_id=meta["eos_id"], dtype=meta["dtype"], sources=[source], shards=shards,
                    unigram_entropy_nats=meta["unigram_entropy_nats"], settings={}, format=1, folder=train.parent)


def _legacy_prepared(run_dir: Path) -> PreparedData | None:
    """The run dir's recorded data if it was prepared before data sources and is still complete, else None."""
    try:
        legacy = "train_path" in json.loads((run_dir / "data.json").read_text())
    except (OSError, ValueError, TypeError):
        return None
    try:
        return load_prepared(run_dir) if legacy else None
    except DataError:
        return None
