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

from dist_moe.atomic import write_bytes_atomic
from dist_moe.config import DataConfig
from dist_moe.data.corpus import DataError
from dist_moe.data.manifest import Manifest, read_manifest
from dist_moe.data.prepare import prepare
from dist_moe.data.sampler import MixtureSampler
from dist_moe.data.tokenizer import Tokenizer

__all__ = ["DataError", "Manifest", "MixtureSampler", "PreparedData", "Tokenizer", "load_prepared", "prepare",
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
    """`prepare`, then the tokenizer copied into the run dir and the folder recorded in run_dir/data.json."""
    folder = prepare(cfg, cluster_cfg, show_progress=show_progress, tokenizer=tokenizer)
    run_dir = Path(run_dir)
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
        folder, tokenizer = Path(record["folder"]), Path(run_dir) / record["tokenizer_path"]
    except (OSError, ValueError, TypeError, KeyError):
        raise DataError(f"{path}: cannot read the prepared data record; run prepare_data for this run dir "
                        "first") from None
    if not tokenizer.is_file():
        raise DataError(f"{tokenizer}: missing (recorded in {path})")
    return PreparedData(folder=folder, tokenizer_path=tokenizer, manifest=read_manifest(folder))
