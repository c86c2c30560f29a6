"""GrowBack, the elastic run's "a node came back: save before Ray Train resizes" signal, in one process
(without importing ray: Ray reads its auth mode at import, and tests/cluster/test_jobs.py sets it later)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_moe.cluster import trainer
from dist_moe.config import load_config
from dist_moe.train import events
from dist_moe.train.engine import DistContext, free_port


@pytest.fixture
def ctx():
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield DistContext(0, 1, 0, torch.device("cpu"), owns_process_group=True)
    dist.destroy_process_group()


def test_grow_back_pending_only_below_num_workers_with_a_free_cpu_and_backs_off(ctx, monkeypatch, tmp_path):
    cluster = load_config("tiny", ["cluster.num_workers=2", "cluster.min_workers=1",
                                   "cluster.resize_check_s=0.05"]).cluster
    free = {"CPU": 0.0}
    assert not trainer.GrowBack(cluster, 2, lambda: dict(free), str(tmp_path)).pending(ctx)  # already at num_workers
    grow = trainer.GrowBack(cluster, 1, lambda: dict(free), str(tmp_path))
    assert not grow.pending(ctx)  # no room yet
    free["CPU"] = 1.0
    assert grow.pending(ctx)  # the node is back
    slept = []
    monkeypatch.setattr(trainer.time, "sleep", slept.append)
    grow.wait()  # no resize came: train on, and do not ask again for two checks
    assert slept[0] >= trainer.RAY_TRAIN_NODE_VIEW_LAG_S + 2 * 0.05  # long enough for Ray Train to see the node
    assert [e["event"] for e in events.read(tmp_path)] == ["resize"]  # `dist-moe status` tells why the group restarts
    assert not grow.pending(ctx)
    monkeypatch.setattr(trainer.time, "monotonic", lambda: float("inf"))
    assert grow.pending(ctx)


def test_grow_back_with_gpus_waits_for_a_free_gpu_not_a_cpu(ctx, tmp_path):
    cluster = load_config("tiny", ["cluster.num_workers=2", "cluster.min_workers=1", "cluster.use_gpu=true"]).cluster
    free = {"CPU": 8.0}
    grow = trainer.GrowBack(cluster, 1, lambda: dict(free), str(tmp_path))
    assert not grow.pending(ctx)
    free["GPU"] = 1.0
    assert grow.pending(ctx)
