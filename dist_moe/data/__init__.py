"""The data pipeline: corpus -> sentencepiece BPE -> token shards -> deterministic sampler.

`prepare_data` runs once, on rank 0. Everything it derives is cached by corpus content hash:
`cache_dir/<key>/tokenizer.model` and `cache_dir/<key>/split-<val_fraction>/{train,val}.bin, meta.json`,
where <key> hashes the corpus and the tokenizer settings. It copies the tokenizer into the run dir and
writes `run_dir/data.json`, which `load_prepared` reads on the other ranks (after a barrier) and on resume.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from dist_moe.config import DataConfig
from dist_moe.atomic import write_bytes_atomic
from dist_moe.data.corpus import Corpus, DataError, Document, load_corpus
from dist_moe.data.sampler import MixtureSampler
from dist_moe.data.shards import build_shards, file_sha256, read_meta
from dist_moe.data.tokenizer import Tokenizer, tokenizer_key, train_tokenizer

__all__ = ["Corpus", "DataError", "Document", "MixtureSampler", "PreparedData", "Tokenizer", "load_corpus",
           "load_prepared", "prepare_data"]


@dataclass
class PreparedData:
    """What the trainer needs from the pipeline; stored as run_dir/data.json."""

    tokenizer_path: Path  # the copy in the run dir
    train_path: Path
    val_path: Path
    vocab_size: int
    eos_id: int
    train_tokens: int
    val_tokens: int
    unigram_entropy_nats: float  # of train.bin's token frequencies: the loss to beat, comparable to CE
    corpus: str  # one line: source, documents, size, skipped files


def prepare_data(cfg: DataConfig, run_dir: Path, show_progress: bool = True,
                 tokenizer: Path | None = None) -> PreparedData:
    """Corpus -> tokenizer -> shards, each reused from the cache when it is there; fills the run dir.
    `tokenizer`: a sentencepiece model to use instead of training one (a transformers folder's, init.from_hf)."""
    corpus = load_corpus(cfg.corpus, cfg.max_corpus_mb)
    _say(corpus.describe(), show_progress)
    cache = Path(cfg.cache_dir).expanduser().resolve()
    if tokenizer is not None:
        cache /= tokenizer_key(corpus.content_hash() + "|" + file_sha256(tokenizer), 0, 0)
        write_bytes_atomic(cache / "tokenizer.model", Path(tokenizer).read_bytes())
    else:
        cache /= tokenizer_key(corpus.content_hash(), cfg.vocab_size, cfg.tokenizer_sample_mb)
    model_path = cache / "tokenizer.model"
    if tokenizer is not None:
        _say(f"tokenizer: {tokenizer}", show_progress)
    elif model_path.is_file():
        _say(f"tokenizer: cached at {model_path}", show_progress)
    else:
        texts = [doc.text for doc in corpus.documents]
        train_tokenizer(texts, cfg.vocab_size, cfg.tokenizer_sample_mb, model_path, show_progress)
    shard_dir = cache / f"split-{cfg.val_fraction:g}"
    meta = read_meta(shard_dir, file_sha256(model_path))
    if meta is None:
        meta = build_shards(corpus, Tokenizer(model_path), cfg.val_fraction, shard_dir, show_progress)
    else:
        _say(f"token shards: cached at {shard_dir}", show_progress)
    _say(f"tokens: {meta['train_tokens']:,} train, {meta['val_tokens']:,} val; unigram entropy "
         f"{meta['unigram_entropy_nats']:.3f} nats/token", show_progress)

    run_dir = Path(run_dir)
    write_bytes_atomic(run_dir / "tokenizer.model", model_path.read_bytes())
    prepared = PreparedData(
        tokenizer_path=run_dir / "tokenizer.model", train_path=shard_dir / "train.bin",
        val_path=shard_dir / "val.bin", vocab_size=meta["vocab_size"], eos_id=meta["eos_id"],
        train_tokens=meta["train_tokens"], val_tokens=meta["val_tokens"],
        unigram_entropy_nats=meta["unigram_entropy_nats"], corpus=corpus.describe())
    record = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(prepared).items()}
    record["tokenizer_path"] = "tokenizer.model"  # relative: the run dir may move
    write_bytes_atomic(run_dir / "data.json", (json.dumps(record, indent=2) + "\n").encode())
    return prepared


def load_prepared(run_dir: Path) -> PreparedData:
    """The PreparedData that `prepare_data` recorded in run_dir, with every file checked to exist."""
    path = Path(run_dir) / "data.json"
    try:
        record = json.loads(path.read_text())
        prepared = PreparedData(**record)
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: cannot read the prepared data record ({exc.__class__.__name__}); "
                        "run prepare_data for this run dir first") from None
    prepared.tokenizer_path = Path(run_dir) / prepared.tokenizer_path
    prepared.train_path, prepared.val_path = Path(prepared.train_path), Path(prepared.val_path)
    for file in (prepared.tokenizer_path, prepared.train_path, prepared.val_path):
        if not file.is_file():
            raise DataError(f"{file}: missing (recorded in {path}; was the data cache cleaned? "
                            "prepare the data again)")
    return prepared


def _say(message: str, enabled: bool) -> None:
    if enabled:
        print(message, flush=True)
