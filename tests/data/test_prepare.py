import dataclasses
import json
import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from synthetic_corpus import make_documents, small_config, write_corpus

from dist_moe.config import DataConfig
from dist_moe.data import DataError, Tokenizer, load_prepared, prepare_data


def cache_files(cache: Path) -> dict[str, int]:
    return {str(p.relative_to(cache)): p.stat().st_mtime_ns for p in sorted(cache.rglob("*")) if p.is_file()}


def test_second_prepare_reuses_tokenizer_and_shards_from_the_cache(corpus_dir, tmp_path, capsys):
    cfg = small_config(corpus_dir, tmp_path / "cache")
    first = prepare_data(cfg, tmp_path / "run1")
    before = cache_files(tmp_path / "cache")
    assert sorted(Path(p).name for p in before) == ["meta.json", "tokenizer.model", "train.bin", "val.bin"]
    capsys.readouterr()
    second = prepare_data(cfg, tmp_path / "run2")
    assert cache_files(tmp_path / "cache") == before  # nothing retrained or rewritten
    out = capsys.readouterr()
    assert "tokenizer: cached" in out.out and "token shards: cached" in out.out
    assert "training tokenizer" not in out.err and "tokenizing" not in out.err
    assert dataclasses.replace(second, tokenizer_path=first.tokenizer_path) == first
    assert (tmp_path / "run2" / "tokenizer.model").read_bytes() == first.tokenizer_path.read_bytes()


def test_new_val_fraction_reuses_the_tokenizer_and_new_vocab_retrains(corpus_dir, tmp_path):
    cache = tmp_path / "cache"
    prepare_data(small_config(corpus_dir, cache), tmp_path / "run", show_progress=False)
    tokenizer_files = [p for p in cache_files(cache) if p.endswith("tokenizer.model")]
    prepare_data(small_config(corpus_dir, cache, val_fraction=0.2), tmp_path / "run", show_progress=False)
    files = cache_files(cache)
    assert [p for p in files if p.endswith("tokenizer.model")] == tokenizer_files
    assert len([p for p in files if p.endswith("train.bin")]) == 2
    prepared = prepare_data(small_config(corpus_dir, cache, vocab_size=420), tmp_path / "run", show_progress=False)
    assert prepared.vocab_size == 420 and len([p for p in cache_files(cache) if p.endswith(".model")]) == 2


def test_changed_corpus_content_gets_its_own_cache_entry(tmp_path):
    docs = make_documents()
    cache = tmp_path / "cache"
    a = prepare_data(small_config(write_corpus(tmp_path / "a", docs), cache), tmp_path / "ra", show_progress=False)
    docs[0] += "one more line\n"
    b = prepare_data(small_config(write_corpus(tmp_path / "b", docs), cache), tmp_path / "rb", show_progress=False)
    assert a.train_path.parent.parent != b.train_path.parent.parent


def test_load_prepared_returns_what_prepare_recorded(prepared):
    run_dir = prepared.tokenizer_path.parent
    assert load_prepared(run_dir) == prepared
    assert json.loads((run_dir / "data.json").read_text())["tokenizer_path"] == "tokenizer.model"


def test_load_prepared_follows_a_moved_run_dir_and_names_missing_files(prepared, tmp_path):
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("data.json", "tokenizer.model"):
        (moved / name).write_bytes((prepared.tokenizer_path.parent / name).read_bytes())
    assert load_prepared(moved).tokenizer_path == moved / "tokenizer.model"
    record = json.loads((moved / "data.json").read_text())
    record["train_path"] = str(tmp_path / "cleaned" / "train.bin")
    (moved / "data.json").write_text(json.dumps(record))
    with pytest.raises(DataError, match=r"cleaned/train.bin: missing"):
        load_prepared(moved)
    with pytest.raises(DataError, match="data.json: cannot read the prepared data record"):
        load_prepared(tmp_path / "never_prepared")


def test_stdlib_corpus_end_to_end_with_a_small_cap(tmp_path):
    cfg = DataConfig(corpus="stdlib", max_corpus_mb=2, vocab_size=512, cache_dir=str(tmp_path / "cache"))
    prepared = prepare_data(cfg, tmp_path / "run", show_progress=False)
    assert prepared.vocab_size == 512 and prepared.corpus.startswith("corpus stdlib")
    assert 1.5 < 2e6 / (prepared.train_tokens + prepared.val_tokens) < 4.0  # ~2 bytes per token at vocab 512
    assert 3.0 < prepared.unigram_entropy_nats < math.log(512)
    tokenizer = Tokenizer(prepared.tokenizer_path)
    source = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text(encoding="utf-8")
    assert tokenizer.decode(tokenizer.encode(source)) == source
    val = np.fromfile(prepared.val_path, dtype=json.loads((prepared.val_path.parent / "meta.json").read_text())["dtype"])
    assert len(val) == prepared.val_tokens and int(val.max()) < 512
