"""Multi-node Ray on one machine (network namespaces, see netns_cluster.py): a `dist-moe submit` job whose
expert-parallel group spans two nodes, and a node killed mid-run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netns_cluster import NetnsCluster, netns_unavailable

# Off until understood (issue 21): since the merges of 2026-12-05, the first job a fresh namespace cluster runs
# (the uninterrupted reference) dies as it starts, "Intel oneMKL FATAL ERROR: Cannot load .../libtorch_cpu.so",
# exit 2 or 139, before any line of ours; the next job on the same cluster trains. Both tests passed 3 times
# out of 3 before those merges. The harness itself works (`python tests/cluster/netns_cluster.py`).
pytestmark = [pytest.mark.slow, pytest.mark.skip(reason="the first job on a fresh netns cluster dies at start "
                                                         "(oneMKL cannot load libtorch_cpu.so); issue 21")]

SMALL = ["data.max_corpus_mb=2", "data.tokenizer_sample_mb=1", "data.vocab_size=512", "data.seq_len=64",
         "model.d_model=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.d_ff=128",
         "moe.num_experts=4", "moe.d_expert=128", "train.micro_batch_size=8", "log.every=1",
         "cluster.num_workers=2", "moe.ep_size=2", "train.zero_stage=2", "train.max_steps=12", "ckpt.every=3"]
STEPS = 12
TOLERANCE = 1e-3  # |loss - uninterrupted loss| per step after re-sharding 2 -> 1 worker (measured: at most 2.8e-4 in 3 runs)


@pytest.fixture(scope="module")
def cluster():
    reason = netns_unavailable()
    if reason:
        pytest.skip(f"netns cluster: {reason}")
    nodes = NetnsCluster(num_nodes=3, cpus_per_node=1)  # head (no CPUs) + two 1-CPU nodes: one worker each
    try:
        yield nodes.start()
    finally:
        nodes.close()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def dist_moe(cluster: NetnsCluster, *args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """The CLI run inside the head's namespace, where the cluster's addresses are reachable."""
    return cluster.exec([sys.executable, "-m", "dist_moe.cli", *args], capture_output=True, text=True,
                        timeout=timeout, cwd=cwd)


def metrics_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "train/loss" in row]


def rank_nodes(logs: str) -> dict[int, str]:
    return {int(rank): ip for rank, ip in re.findall(r"rank (\d+) of \d+ on node (\d+\.\d+\.\d+\.\d+)", logs)}


@pytest.fixture(scope="module")
def uninterrupted(cluster, cache, tmp_path_factory):
    """The reference run: two workers, one per node, EP=2 across the nodes."""
    work = tmp_path_factory.mktemp("uninterrupted")
    run_dir = work / "run"
    result = dist_moe(cluster, "submit", "--address", cluster.address, *SMALL, f"run_dir={run_dir}",
                      f"data.cache_dir={cache}", cwd=work)
    return run_dir, result


def test_submit_spreads_workers_over_nodes_with_ep_across_them(cluster, uninterrupted):
    run_dir, result = uninterrupted
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 rank(s)" in result.stdout and "EP=2" in result.stdout
    assert sorted(rank_nodes(result.stdout).values()) == sorted(cluster.ips[1:])  # one rank on each worker node
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
    assert [row["step"] for row in metrics_rows(run_dir)] == list(range(1, STEPS + 1))


def test_lost_node_restarts_from_checkpoint_on_fewer_workers(cluster, cache, uninterrupted, tmp_path):
    """Node 2 dies after step 4: the group restarts from the step-3 checkpoint on one worker (micro batch
    doubled, EP=1) and finishes. Every step is logged once, and the losses match the uninterrupted run's
    within what training on another layout changes (see docs/resuming.md)."""
    run_dir = tmp_path / "run"
    result = dist_moe(cluster, "submit", "--address", cluster.address, "--no-wait", *SMALL, "cluster.min_workers=1",
                      "cluster.max_failures=3", f"run_dir={run_dir}", f"data.cache_dir={cache}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    job_id = re.search(r"submitted job (\S+)", result.stdout).group(1)
    cluster.wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(metrics_rows(run_dir)) >= 4, 400,
                     "step 4")
    cluster.kill_node(2)
    cluster.wait_for(lambda: "SUCCEEDED" in dist_moe(cluster, "status", "--address", cluster.address, job_id,
                                                      cwd=tmp_path).stdout, 400, "the job to succeed")
    logs = dist_moe(cluster, "logs", "--address", cluster.address, job_id, cwd=tmp_path).stdout
    assert "elastic: 1 of 2 workers; micro batch 8 -> 16, EP 2 -> 1" in logs, logs[-4000:]
    resumed = int(re.search(r"resumed from \S+ at step (\d+)", logs).group(1))
    assert resumed in (3, 6)  # a checkpoint from before the kill
    rows, reference = metrics_rows(run_dir), metrics_rows(uninterrupted[0])
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))  # no step missing or repeated
    gaps = [abs(a["train/loss"] - b["train/loss"]) for a, b in zip(rows, reference)]
    print("loss gaps", [f"{g:.1e}" for g in gaps])
    assert max(gaps[:resumed]) == 0.0  # the same layout as the reference until the checkpoint: bit for bit
    assert max(gaps) < TOLERANCE
