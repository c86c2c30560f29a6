"""A prepared data folder in the seam's format (docs/data.md: shards, index, manifest.json written last),
written straight from token lists, for tests of what reads it (the sampler, the objective).

`write_prepared` returns what dist_moe.data.read_manifest reads back from the folder it wrote.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
import numpy as np

from dist_moe.data import Manifest, read_manifest


def write_prepared(folder: Path, sources: dict[str, dict], dtype: str = "uint16", vocab_size: int = 1000,
                   eos_id: int = 1) -> Manifest:
    """sources: name -> {"weight": w, "train": [shard token arrays], "val": [shard token arrays]}. Each shard
    is one document (index [0])."""
    shard_dir = Path(folder) / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    entries, described = [], []
    for index, (name, spec) in enumerate(sources.items()):
        totals = {}
        for split in ("train", "val"):
            totals[split] = 0
            for n, tokens in enumerate(spec.get(split, [])):
                stem = f"shards/{index}-{split}-{n:05d}"
                data = np.asarray(tokens, dtype=np.int64).astype(dtype).tobytes()
                (Path(folder) / f"{stem}.bin").write_bytes(data)
                np.save(Path(folder) / f"{stem}.idx.npy", np.zeros(1, dtype=np.int64))
                entries.append({"file": f"{stem}.bin", "index": f"{stem}.idx.npy", "source": index, "split": split,
                                "tokens": len(tokens), "documents": 1, "bytes": len(data),
                                "sha256": hashlib.sha256(data).hexdigest(),
                                "unit": 0})
                totals[split] += len(tokens)
        described.append({"name": name, "path": f"/data/{name}", "weight": float(spec.get("weight", 1.0)),
                          "text_key": "text", "documents": len(spec.get("train", [])) + len(spec.get("val", [])),
                          "duplicates": 0, "train_tokens": totals["train"], "val_tokens": totals["val"]})
    manifest = {"format": 2, "key": "fixture", "tokenizer_sha256": "", "vocab_size": vocab_size, "eos_id": eos_id,
                "dtype": dtype, "sources": described, "shards": entries, "unigram_entropy_nats": 5.0,
                "settings": {}}
    (Path(folder) / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return read_manifest(folder)


def counting(start: int, num_tokens: int) -> np.ndarray:
    """Tokens start, start + 1, ...: a window's first token names its shard and offset."""
    return np.arange(start, start + num_tokens, dtype=np.int64)
