"""`prepare` on Ray Data: a real local Ray on 127.0.0.1 (one for the module), tiny data, the Ray path forced
by data.ray_threshold_mb=0."""

import gzip
import json
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from synthetic_corpus import make_documents, small_config, write_corpus

from dist_moe.config import DataConfig, SourceConfig
from dist_moe.data import prepare, read_manifest

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    temp = tempfile.mkdtemp(prefix="dmray", dir="/tmp")  # short: Ray's socket paths live under it
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=temp,
             log_to_driver=False)
    yield
    ray.shutdown()


def sources(tmp_path) -> list[SourceConfig]:
    docs = make_documents(n=80)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps({"text": d}) + "\n"
                                                                for d in docs[:30]).encode()))
    pq.write_table(pa.table({"content": docs[30:60]}), tmp_path / "b.parquet", row_group_size=7)
    write_corpus(tmp_path / "c", docs[60:] + docs[:2])
    return [SourceConfig(str(tmp_path / "a.jsonl.gz"), 1.0), SourceConfig(str(tmp_path / "b.parquet"), 2.0, "content"),
            SourceConfig(str(tmp_path / "c"), 0.5)]


def test_ray_data_and_in_process_write_identical_shards_and_manifests(local_ray, tmp_path):
    common = dict(vocab_size=400, val_fraction=0.1, shard_mb=0.004, sources=sources(tmp_path))
    on_ray = prepare(DataConfig(cache_dir=str(tmp_path / "ray"), ray_threshold_mb=0, **common), show_progress=False)
    local = prepare(DataConfig(cache_dir=str(tmp_path / "local"), **common), show_progress=False)
    a, b = read_manifest(on_ray, verify=True), read_manifest(local, verify=True)
    assert len({s.unit for s in a.shards}) > 3 and a.sources[2].duplicates == 2
    assert (on_ray / "tokenizer.model").read_bytes() == (local / "tokenizer.model").read_bytes()
    assert a == b and on_ray.name == local.name


def test_ray_data_resumes_only_the_missing_units(local_ray, tmp_path):
    cfg = small_config(write_corpus(tmp_path / "c", make_documents(n=60)), tmp_path / "cache", shard_mb=0.002,
                       ray_threshold_mb=0)
    folder = prepare(cfg, show_progress=False)
    before = read_manifest(folder)
    lost = before.shards[3]
    (folder / lost.file).unlink()
    (folder / "work" / f"done-{lost.unit:05d}.json").unlink()
    (folder / "manifest.json").unlink()  # as if killed before the end
    kept = {s.file: (folder / s.file).stat().st_mtime_ns for s in before.shards if s.unit != lost.unit}
    assert prepare(cfg, show_progress=False) == folder
    assert read_manifest(folder, verify=True) == before
    assert {f: (folder / f).stat().st_mtime_ns for f in kept} == kept
