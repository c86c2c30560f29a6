"""The language-modeling objective on a prepared folder of several sources (tests/data/prepared_fixture.py):
per-source validation against losses computed here from the shard files, the mixture-weighted val/loss, and
the tokens drawn per source."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parents[1] / "data"))
from prepared_fixture import write_prepared  # noqa: E402

from dist_moe.config import Config  # noqa: E402
from dist_moe.model.loss import cross_entropy  # noqa: E402
from dist_moe.model.transformer import Transformer  # noqa: E402
from dist_moe.train.engine import DistContext  # noqa: E402
from dist_moe.train.objective import LanguageModeling  # noqa: E402

SEQ, BATCH, EVAL_BATCHES = 16, 2, 2


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path_factory.mktemp('pg')}/store")
    yield DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), owns_process_group=True)
    dist.destroy_process_group()


def tiny_config() -> Config:
    cfg = Config()
    m = cfg.model
    m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.d_ff, m.max_seq_len = 64, 32, 1, 4, 2, 32, 32
    cfg.moe.num_experts, cfg.moe.d_expert, cfg.moe.noise = 2, 32, "none"
    cfg.data.seq_len, cfg.train.micro_batch_size, cfg.train.eval_batches = SEQ, BATCH, EVAL_BATCHES
    cfg.train.precision = "fp32"
    return cfg


def tokens(seed, n):
    return np.random.default_rng(seed).integers(0, 64, size=n)


def reference_val_loss(model, val_tokens):
    """The mean over EVAL_BATCHES batches of the cross-entropy of windows evenly spaced over one val shard."""
    starts = np.linspace(0, len(val_tokens) - SEQ - 1, EVAL_BATCHES * BATCH).round().astype(int)
    windows = torch.from_numpy(np.stack([val_tokens[s:s + SEQ + 1] for s in starts])).long()
    losses = [cross_entropy(model(w[:, :-1]).logits, w[:, 1:]) for w in windows.split(BATCH)]
    return float(sum(losses)) / EVAL_BATCHES


@torch.no_grad()
def test_val_loss_per_source_and_their_mixture_weighted_mean(tmp_path, process_group):
    val = {name: tokens(i, 300) for i, name in enumerate(["web", "code", "held"])}
    manifest = write_prepared(tmp_path, {name: {"weight": w, "train": [tokens(10 + i, 500)], "val": [val[name]]}
                                         for i, (name, w) in enumerate([("web", 3.0), ("code", 1.0), ("held", 0.0)])},
                              vocab_size=64)
    cfg = tiny_config()
    objective = LanguageModeling(cfg, process_group, manifest)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    scores = objective.evaluate(model)
    want = {name: reference_val_loss(model, val[name]) for name in val}
    assert scores.keys() == {"val/loss", "val/loss/web", "val/loss/code", "val/loss/held"}
    for name in val:
        assert scores[f"val/loss/{name}"] == pytest.approx(want[name], rel=1e-6)
    assert scores["val/loss"] == pytest.approx((3 * want["web"] + want["code"]) / 4, rel=1e-6)  # held: not in it
    assert objective.describe(scores).startswith(f"val loss {scores['val/loss']:.4f} (web ")
    assert objective.summary(scores)["val_loss_by_source"]["held"] == scores["val/loss/held"]

    for _ in range(10):
        objective.micro_step(model)
    seen = objective.window_scalars()
    assert seen.keys() == {"data/tokens/web", "data/tokens/code"} and sum(seen.values()) == 10 * BATCH * SEQ
    assert abs(seen["data/tokens/web"] / SEQ - 15) <= 1  # 20 rows at 3:1: 15 within a row


@torch.no_grad()
def test_one_source_val_loss_is_that_source_loss_exactly(tmp_path, process_group):
    val = tokens(1, 300)
    manifest = write_prepared(tmp_path, {"corpus": {"train": [tokens(2, 400)], "val": [val]}}, vocab_size=64)
    cfg = tiny_config()
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    scores = LanguageModeling(cfg, process_group, manifest).evaluate(model)
    assert scores["val/loss"] == scores["val/loss/corpus"] == pytest.approx(reference_val_loss(model, val), rel=1e-6)
