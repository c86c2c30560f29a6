"""`dist-moe data prepare` on a two-node Ray cluster (network namespaces, see netns_cluster.py): the command runs
inside the head's namespace with cluster.address, the Ray Data stages run on the worker node, and the
prepared folder equals the one built in-process from the same data, shard for shard."""

from __future__ import annotations

import filecmp
import gzip
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "data"))
from netns_cluster import GCS_PORT, NetnsCluster, netns_unavailable  # noqa: E402
from synthetic_corpus import make_documents, small_config, write_corpus  # noqa: E402

from dist_moe.data import prepare, read_manifest  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    reason = netns_unavailable()
    if reason:
        pytest.skip(f"netns cluster: {reason}")
    nodes = NetnsCluster(num_nodes=2, cpus_per_node=1)  # head (no CPUs) + one worker node: the stages run there
    try:
        yield nodes.start()
    finally:
        nodes.close()


def test_prepare_on_a_two_node_cluster_writes_the_in_process_shards(cluster, tmp_path):
    docs = make_documents(n=60)
    corpus = write_corpus(tmp_path / "corpus", docs[:40])
    (corpus / "more.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps({"text": d}) + "\n"
                                                                 for d in docs[40:] + docs[:3]).encode()))
    overrides = ["data.vocab_size=400", "data.val_fraction=0.1", "data.shard_mb=0.003", "data.max_corpus_mb=0",
                 f"data.corpus={corpus}"]
    done = cluster.exec([sys.executable, "-m", "dist_moe.cli", "data", "prepare", *overrides,
                         f"data.cache_dir={tmp_path / 'ray'}", "data.ray_threshold_mb=0",
                         f"cluster.address={cluster.ips[0]}:{GCS_PORT}"],
                        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    on_cluster = Path(done.stdout.strip().splitlines()[-1])
    # 0.0, not 0: the folder key hashes the settings' JSON, where the CLI's float 0.0 is not the int 0
    local = prepare(small_config(corpus, tmp_path / "local", vocab_size=400, val_fraction=0.1, shard_mb=0.003,
                                 max_corpus_mb=0.0), show_progress=False)
    a, b = read_manifest(on_cluster, verify=True), read_manifest(local, verify=True)
    assert len({s.unit for s in a.shards}) >= 3 and a.sources[0].duplicates == 3  # several units, dedup ran
    assert a == b and on_cluster.name == local.name
    names = ["tokenizer.model"] + [f for s in a.shards for f in (s.file, s.index)]
    assert filecmp.cmpfiles(on_cluster, local, names, shallow=False) == (names, [], [])
