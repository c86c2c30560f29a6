import hashlib
import json
import math
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from synthetic_corpus import make_documents, small_config, write_corpus

from dist_moe.config import DataConfig, SourceConfig
from dist_moe.data import DataError, Tokenizer, load_prepared, prepare, prepare_data, read_manifest
from dist_moe.data.manifest import file_sha256

prepare_stage = sys.modules["dist_moe.data.prepare"]


def shard_documents(folder: Path, source: int, split: str) -> list[list[int]]:
    """Each document's tokens (EOS included) from the shards, cut at the .idx.npy starts."""
    manifest = read_manifest(folder)
    docs = []
    for shard in manifest.shards_of(source, split):
        tokens = np.fromfile(folder / shard.file, dtype=np.dtype(manifest.dtype).newbyteorder("<"))
        starts = np.load(folder / shard.index, allow_pickle=False).tolist()
        docs += [tokens[a:b].tolist() for a, b in zip(starts, starts[1:] + [len(tokens)])]
    return docs


def expected_split(texts: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """The reference rule, written independently: first copies only, val when blake2b's first 8 bytes (as a
    little-endian fraction of 2**64) fall under val_fraction."""
    train, val, seen = [], [], set()
    for text in texts:
        digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
        if digest in seen:
            continue
        seen.add(digest)
        (val if int.from_bytes(digest[:8], "little") < val_fraction * 2**64 else train).append(text)
    return train, val


def shard_files(folder: Path) -> dict[str, str]:
    return {s.file: s.sha256 for s in read_manifest(folder).shards}


def test_shards_hold_each_kept_document_once_in_file_order_ending_with_eos(tmp_path):
    docs = make_documents(n=60)
    texts = docs + [docs[3], docs[7]]  # two exact copies, later in file order
    folder = prepare(small_config(write_corpus(tmp_path / "c", texts), tmp_path / "cache"), show_progress=False)
    tokenizer = Tokenizer(folder / "tokenizer.model")
    train, val = expected_split([t.replace("\r\n", "\n") for t in texts], 0.1)
    assert len(val) > 0
    for split, expected in (("train", train), ("val", val)):
        got = shard_documents(folder, 0, split)
        assert all(d[-1] == tokenizer.eos_id and tokenizer.eos_id not in d[:-1] for d in got)
        assert [tokenizer.decode(d[:-1]) for d in got] == expected
    source = read_manifest(folder).sources[0]
    assert (source.documents, source.duplicates) == (len(docs), 2)
    assert source.train_tokens == sum(map(len, shard_documents(folder, 0, "train")))


def test_unigram_entropy_is_that_of_all_train_tokens(prepared):
    tokens = np.concatenate([np.array(d) for d in shard_documents(prepared.folder, 0, "train")])
    p = np.bincount(tokens) / tokens.size
    expected = -sum(q * math.log(q) for q in p if q > 0)
    assert prepared.unigram_entropy_nats == pytest.approx(expected, rel=1e-9)


def test_small_shard_mb_cuts_units_and_shards_but_not_the_tokens(tmp_path):
    corpus = write_corpus(tmp_path / "c", make_documents(n=60))
    big = prepare(small_config(corpus, tmp_path / "a"), show_progress=False)
    small = prepare(small_config(corpus, tmp_path / "b", shard_mb=0.002), show_progress=False)
    manifest = read_manifest(small)
    assert len({s.unit for s in manifest.shards}) > 5
    assert all(s.bytes <= 2000 or s.documents == 1 for s in manifest.shards)
    assert (big / "tokenizer.model").read_bytes() == (small / "tokenizer.model").read_bytes()
    for split in ("train", "val"):
        assert shard_documents(big, 0, split) == shard_documents(small, 0, split)


def test_a_prepared_folder_is_found_from_the_file_listing_without_reading_the_files(corpus_dir, tmp_path,
                                                                                     monkeypatch):
    cfg = small_config(corpus_dir, tmp_path / "cache")
    folder = prepare(cfg, show_progress=False)
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    monkeypatch.setattr(prepare_stage, "scan_unit", None)  # would fail if called
    monkeypatch.setattr(prepare_stage, "tokenize_unit", None)
    assert prepare(cfg, show_progress=False) == folder
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before


def test_the_key_changes_with_a_files_mtime_and_with_every_setting(tmp_path):
    corpus = write_corpus(tmp_path / "c", make_documents(n=10))
    cfg = small_config(corpus, tmp_path / "cache")
    folders = {prepare_stage.make_plan(cfg).folder}
    for change in (dict(vocab_size=420), dict(val_fraction=0.2), dict(dedup=False), dict(shard_mb=1.0),
                   dict(tokenizer_sample_mb=1.0), dict(max_corpus_mb=0.001)):
        folders.add(prepare_stage.make_plan(small_config(corpus, tmp_path / "cache", **change)).folder)
    assert len(folders) == 7
    os.utime(corpus / "doc000.txt", ns=(1, 1))
    assert prepare_stage.make_plan(cfg).folder not in folders


def test_a_killed_prepare_redoes_only_the_unfinished_units(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "c", make_documents(n=60))
    cfg = small_config(corpus, tmp_path / "cache", shard_mb=0.002)
    script = (  # SIGKILL itself when the 5th unit starts tokenizing: no cleanup, no finally
        "import os, signal, sys\nfrom dist_moe.data import prepare as p\nfrom dist_moe.config import DataConfig\n"
        "m = sys.modules['dist_moe.data.prepare']\ncalls = []\nreal = m.tokenize_unit\n"
        "def tokenize(*a, **k):\n    calls.append(1)\n    if len(calls) == 5: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(*a, **k)\nm.tokenize_unit = tokenize\n"
        f"p(DataConfig(**{cfg.__dict__!r}), show_progress=False)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == -9, result.stderr
    folder = prepare_stage.make_plan(cfg).folder
    assert not (folder / "manifest.json").exists() and len(list(folder.glob("work/done-*.json"))) == 4
    redone = []
    real = prepare_stage.tokenize_unit
    monkeypatch.setattr(prepare_stage, "tokenize_unit", lambda f, unit, *a: redone.append(unit.index) or
                        real(f, unit, *a))
    prepare(cfg, show_progress=False)
    units = len(prepare_stage.make_plan(cfg).units)
    assert sorted(redone) == list(range(4, units))
    clean = prepare(small_config(corpus, tmp_path / "clean", shard_mb=0.002), show_progress=False)
    assert shard_files(folder) == shard_files(clean)


def test_a_truncated_shard_is_rebuilt_and_a_corrupt_one_with_verify(tmp_path, monkeypatch):
    cfg = small_config(write_corpus(tmp_path / "c", make_documents(n=60)), tmp_path / "cache", shard_mb=0.002)
    folder = prepare(cfg, show_progress=False)
    good = shard_files(folder)
    shards = read_manifest(folder).shards
    redone = []
    real = prepare_stage.tokenize_unit
    monkeypatch.setattr(prepare_stage, "tokenize_unit", lambda f, unit, *a: redone.append(unit.index) or
                        real(f, unit, *a))
    path = folder / shards[2].file
    path.write_bytes(path.read_bytes()[:-2])  # one token short
    with pytest.raises(DataError, match=f"{shards[2].file}: .* bytes, expected"):
        read_manifest(folder)
    prepare(cfg, show_progress=False)
    assert redone == [shards[2].unit] and shard_files(folder) == good
    data = bytearray(path.read_bytes())
    data[0] ^= 1  # same size, other content
    path.write_bytes(bytes(data))
    assert prepare(cfg, show_progress=False) == folder and redone == [shards[2].unit]  # sizes only: not seen
    with pytest.raises(DataError, match="checksum differs"):
        read_manifest(folder, verify=True)
    prepare(cfg, show_progress=False, verify=True)
    assert redone == [shards[2].unit] * 2 and shard_files(folder) == good
    assert file_sha256(path) == good[shards[2].file]


def test_sources_mix_formats_and_a_weight_zero_source_is_all_validation(tmp_path):
    docs = make_documents(n=30)
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs[:20]))
    held = write_corpus(tmp_path / "held", docs[20:] + [docs[0]])  # docs[0] is a copy of a jsonl document
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), vocab_size=400, val_fraction=0.1,
                     sources=[SourceConfig(str(jsonl), 3.0, "body"), SourceConfig(str(held), 0.0)])
    folder = prepare(cfg, show_progress=False)
    manifest = read_manifest(folder)
    assert [(s.weight, s.text_key, s.documents, s.duplicates) for s in manifest.sources] == [
        (3.0, "body", 20, 0), (0.0, "text", len(docs) - 20, 1)]
    assert manifest.shards_of(1, "train") == [] and manifest.sources[1].train_tokens == 0
    assert len(shard_documents(folder, 1, "val")) == len(docs) - 20
    assert manifest.sources[0].val_tokens > 0 and manifest.sources[0].train_tokens > 0


def test_a_given_tokenizer_is_used_instead_of_training_one(prepared, corpus_dir, tmp_path):
    folder = prepare(small_config(corpus_dir, tmp_path / "cache", vocab_size=999), show_progress=False,
                     tokenizer=prepared.tokenizer_path)
    manifest = read_manifest(folder)
    assert manifest.tokenizer_sha256 == file_sha256(prepared.tokenizer_path) and manifest.vocab_size == 400


@pytest.mark.parametrize("texts, message", [
    (["just one"], "1 document(s) after deduplication, a train/val split needs at least 2"),
    (["same", "same"], "1 document(s) after deduplication"),
    (["", "  \n"], "0 document(s)"),
])
def test_too_few_documents_is_a_data_error_naming_the_source(tmp_path, texts, message):
    corpus = write_corpus(tmp_path / "c", texts)
    with pytest.raises(DataError, match=re.escape(message)) as info:
        prepare(small_config(corpus, tmp_path / "cache"), show_progress=False)
    assert str(corpus) in str(info.value)


def test_load_prepared_returns_what_prepare_data_recorded_and_follows_a_moved_run_dir(prepared, tmp_path):
    run_dir = prepared.tokenizer_path.parent
    assert load_prepared(run_dir) == prepared
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("data.json", "tokenizer.model"):
        (moved / name).write_bytes((run_dir / name).read_bytes())
    assert load_prepared(moved).tokenizer_path == moved / "tokenizer.model"
    record = json.loads((moved / "data.json").read_text())
    (moved / "data.json").write_text(json.dumps({**record, "folder": str(tmp_path / "cleaned")}))
    with pytest.raises(DataError, match=r"cleaned/manifest.json: missing"):
        load_prepared(moved)
    with pytest.raises(DataError, match="data.json: cannot read the prepared data record"):
        load_prepared(tmp_path / "never_prepared")


def test_stdlib_corpus_end_to_end_with_a_small_cap(tmp_path):
    cfg = DataConfig(corpus="stdlib", max_corpus_mb=2, vocab_size=512, cache_dir=str(tmp_path / "cache"))
    prepared = prepare_data(cfg, tmp_path / "run", show_progress=False)
    manifest = prepared.manifest
    assert prepared.vocab_size == 512 and manifest.sources[0].path == "stdlib"
    assert 1.5 < 2e6 / (manifest.tokens("train") + manifest.tokens("val")) < 4.0  # ~2 bytes a token at vocab 512
    assert 3.0 < prepared.unigram_entropy_nats < math.log(512)
    tokenizer = Tokenizer(prepared.tokenizer_path)
    source = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text(encoding="utf-8")
    assert tokenizer.decode(tokenizer.encode(source)) == source


def test_dist_moe_data_prepare_prints_the_folder_and_names_a_missing_path_in_one_line(corpus_dir, tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dist_moe.cli", "data", "prepare", *args,
                               f"data.cache_dir={tmp_path}", "data.vocab_size=400"],
                              capture_output=True, text=True, timeout=600)

    ok = run(f"data.corpus={corpus_dir}", "--verify")
    assert ok.returncode == 0, ok.stderr[-2000:]
    folder = Path(ok.stdout.strip().splitlines()[-1])
    assert folder.parent == tmp_path and read_manifest(folder, verify=True).sources[0].documents == 42
    bad = run(f"data.corpus={tmp_path}/nope")
    assert bad.returncode == 2 and "nope" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
