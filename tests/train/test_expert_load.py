"""ExpertLoadTracker: every logged value against a hand computation or a naive recount of the router's choices,
read back from the event files with tensorboard's EventAccumulator; two gloo ranks log the sum of their
counts; and (test_real_run_*) a short real run through dist_moe.train.loop.run."""

import io
import json
import math
import os
import re
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from matplotlib.image import imread
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.plugins.custom_scalar import layout_pb2
from torch.utils.tensorboard import SummaryWriter

from dist_moe.analysis.expert_load import analyze
from dist_moe.analysis.plots import HEATMAP_DPI, heatmap_figsize
from dist_moe.config import Config
from dist_moe.model.moe.layer import MoEStats
from dist_moe.model.transformer import Transformer
from dist_moe.train.deepspeed_moe import apply_deepspeed_moe
from dist_moe.train.expert_load import STATS, ExpertLoadTracker

E = 4
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tiny_config(num_layers=2, moe_every=1, **moe) -> Config:
    cfg = Config()
    m = cfg.model
    m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.d_ff = 64, 32, num_layers, 4, 2, 32
    m.max_seq_len = 32
    cfg.moe.num_experts, cfg.moe.moe_every, cfg.moe.d_expert, cfg.moe.min_capacity = E, moe_every, 32, 1
    for key, value in moe.items():
        setattr(cfg.moe, key, value)
    return cfg


def read_events(logdir: Path) -> ea.EventAccumulator:
    acc = ea.EventAccumulator(str(logdir), size_guidance={ea.SCALARS: 0, ea.IMAGES: 0, ea.HISTOGRAMS: 0,
                                                          ea.TENSORS: 0})
    acc.Reload()
    return acc


def scalar(acc: ea.EventAccumulator, tag: str, step: int) -> float:
    return {e.step: e.value for e in acc.Scalars(tag)}[step]


def hand_stats(gen: torch.Generator, skew: float = 0.0) -> MoEStats:
    """Counts in MoEStats' real format, with kept <= routed; skew > 0 piles tokens onto expert 0."""
    kept = torch.randint(0, 20, (E,), generator=gen)
    kept[0] += int(skew)
    num_tokens, k = 40 + int(skew), 2
    routed = num_tokens * k
    dropped = routed - int(kept.sum())
    assert dropped >= 0
    return MoEStats(kept, torch.tensor(dropped), routed, capacity=int(torch.randint(10, 30, (), generator=gen)),
                    router_entropy_sum=torch.rand((), generator=gen) * num_tokens,
                    top1_prob_sum=torch.rand((), generator=gen) * num_tokens, num_tokens=num_tokens,
                    rerouted=torch.randint(0, int(kept.sum()) + 1, (), generator=gen))


def expected_scalars(per_forward: list[MoEStats], aux: list[float], z: list[float]) -> dict[str, float]:
    """The dashboard values of one layer over several forwards, computed the long way."""
    kept = [sum(int(s.tokens_per_expert[e]) for s in per_forward) for e in range(E)]
    mean = sum(kept) / E
    routed = sum(s.routed for s in per_forward)
    tokens = sum(s.num_tokens for s in per_forward)
    values = {f"expert_{e}": kept[e] / sum(kept) for e in range(E)}
    values.update(
        dropped_fraction=sum(int(s.dropped) for s in per_forward) / routed,
        rerouted_fraction=sum(int(s.rerouted) for s in per_forward) / routed,
        capacity_utilisation=sum(kept) / sum(s.capacity * E for s in per_forward),
        imbalance_max_over_mean=max(kept) / mean,
        imbalance_cv=statistics.pstdev(kept) / mean,
        router_entropy=sum(float(s.router_entropy_sum) for s in per_forward) / tokens,
        top1_prob=sum(float(s.top1_prob_sum) for s in per_forward) / tokens,
        aux_loss=sum(aux) / len(aux), z_loss=sum(z) / len(z))
    return values


def tag(layer: int, name: str) -> str:
    return f"expert_load/layer_{layer}/{name}" if name.startswith("expert_") else f"routing/layer_{layer}/{name}"


def layer_losses(model: Transformer) -> dict[int, list]:
    """(aux, z) each MoE block's forward returned, recorded by the test's own hooks."""
    seen = {i: [] for i, b in enumerate(model.blocks) if b.is_moe}
    for i in seen:
        model.blocks[i].ffn.register_forward_hook(
            lambda mod, inp, out, i=i: seen[i].append((float(out[1].detach()), float(out[2].detach()))))
    return seen


def test_logged_scalars_equal_hand_computation_over_several_forwards(tmp_path):
    torch.manual_seed(0)
    model = Transformer(tiny_config(num_layers=4, moe_every=2))  # MoE FFNs in blocks 1 and 3
    losses = layer_losses(model)
    tracker = ExpertLoadTracker(model, E)
    assert tracker.layer_ids == [1, 3]
    gen = torch.Generator().manual_seed(1)
    fed = {1: [], 3: []}
    writer = SummaryWriter(str(tmp_path))
    for _ in range(3):
        model(torch.randint(0, 64, (2, 8)))  # real forward: real aux/z losses reach the tracker
        for i in fed:
            fed[i].append(hand_stats(gen))
            model.blocks[i].ffn.last_stats = fed[i][-1]
        tracker.accumulate()
    returned = tracker.log(writer, step=7)
    writer.close()
    acc = read_events(tmp_path)
    for i in fed:
        aux, z = zip(*losses[i])
        for name, value in expected_scalars(fed[i], list(aux), list(z)).items():
            assert scalar(acc, tag(i, name), 7) == pytest.approx(value, rel=1e-6), (i, name)
            assert returned[tag(i, name)] == pytest.approx(value, rel=1e-9), (i, name)
        assert sum(scalar(acc, tag(i, f"expert_{e}"), 7) for e in range(E)) == pytest.approx(1.0, abs=1e-6)
    assert len(returned) == 2 * (E + len(STATS))


def test_accumulate_counts_each_forward_once_and_log_resets():
    torch.manual_seed(0)
    model = Transformer(tiny_config(capacity_factor=1.0))
    tracker = ExpertLoadTracker(model, E)
    seen = []
    for batch in (2, 5):  # different token counts: a forward counted twice would shift the pooled ratios
        model(torch.randint(0, 64, (batch, 8)))
        seen.append(model.blocks[0].ffn.last_stats)
        tracker.accumulate()
        if batch == 2:
            tracker.accumulate()  # no forward in between: nothing new
    logged = tracker.log(None, step=1)
    kept = sum(s.tokens_per_expert.double() for s in seen)
    assert logged[tag(0, "expert_0")] == pytest.approx(float(kept[0] / kept.sum()), rel=1e-12)
    dropped = sum(int(s.dropped) for s in seen) / sum(s.routed for s in seen)
    assert logged[tag(0, "dropped_fraction")] == pytest.approx(dropped, rel=1e-12)
    assert tracker.log(None, step=2) == {}  # reset, and no forward since


@pytest.mark.parametrize("impl", ["dist_moe", "deepspeed"])
def test_load_drops_and_router_stats_equal_a_naive_recount_of_real_routing(tmp_path, impl):
    """Real forwards that overflow capacity: kept per expert = min(choices per expert, capacity) whatever the
    drop order, recounted from the router's own logits; entropy and top-1 from the same probabilities."""
    torch.manual_seed(3)
    cfg = tiny_config(capacity_factor=0.5, impl=impl)
    model = apply_deepspeed_moe(Transformer(cfg), cfg).train()  # DeepSpeed's own layer for impl=deepspeed
    tracker = ExpertLoadTracker(model, E)
    inputs = {i: [] for i in range(2)}
    for i, block in enumerate(model.blocks):
        block.ffn.register_forward_pre_hook(lambda mod, args, i=i: inputs[i].append(args[0].detach()))
    totals = []
    for _ in range(3):
        totals.append(model(torch.randint(0, 64, (2, 16))))
        tracker.accumulate()
    returned = tracker.log(None, step=3)
    tokens = 32
    capacity = max(math.ceil(tokens / E * cfg.moe.capacity_factor * cfg.moe.top_k), cfg.moe.min_capacity)
    for i, block in enumerate(model.blocks):
        weight = (block.ffn.router.weight if impl == "dist_moe" else block.ffn.deepspeed_moe.gate.wg.weight).detach()
        kept, routed, entropy, top1 = torch.zeros(E), 0, 0.0, 0.0
        for x in inputs[i]:
            probs = torch.softmax(x.reshape(-1, 32).float() @ weight.float().t(), -1)  # (T, E)
            choices = torch.topk(probs, cfg.moe.top_k, -1).indices
            kept += torch.bincount(choices.flatten(), minlength=E).clamp(max=capacity)
            routed += choices.numel()
            entropy += float(-(probs * probs.log()).sum())
            top1 += float(probs.max(-1).values.sum())
        for e in range(E):
            assert returned[tag(i, f"expert_{e}")] == pytest.approx(float(kept[e] / kept.sum()), rel=1e-9)
        assert returned[tag(i, "dropped_fraction")] == pytest.approx(1 - float(kept.sum()) / routed, rel=1e-9)
        assert returned[tag(i, "dropped_fraction")] > 0.3  # the case is one that drops
        assert returned[tag(i, "capacity_utilisation")] == pytest.approx(float(kept.sum()) / (3 * capacity * E))
        assert returned[tag(i, "router_entropy")] == pytest.approx(entropy / (3 * tokens), rel=1e-5)
        assert returned[tag(i, "top1_prob")] == pytest.approx(top1 / (3 * tokens), rel=1e-5)
    for name, key in (("aux_loss", "aux_loss"), ("z_loss", "z_loss")):  # the model sums its layers' losses
        model_mean = sum(float(getattr(out, key).detach()) for out in totals) / 3
        assert sum(returned[tag(i, name)] for i in range(2)) == pytest.approx(model_mean, rel=1e-5)


def bias_router(model: Transformer, layers: tuple[int, ...], favoured: tuple[int, ...]) -> None:
    """Make the given MoE blocks route every token to the favoured experts: the embedding puts a large
    constant on residual dimension 0, which those routers read as +8 for favoured experts, -8 for the rest,
    and the other MoE blocks' routers ignore."""
    with torch.no_grad():
        model.embed.weight[:, 0] = 1.0
        for i, block in enumerate(model.blocks):
            if block.is_moe:
                router = block.ffn.router.weight  # (E, D)
                bias = [(8.0 if e in favoured else -8.0) if i in layers else 0.0 for e in range(router.shape[0])]
                router[:, 0] = torch.tensor(bias)


def test_router_biased_to_one_expert_shows_high_imbalance_and_the_analyzer_names_dead_experts(tmp_path):
    torch.manual_seed(4)
    model = Transformer(tiny_config(top_k=1, capacity_factor=1.0))
    bias_router(model, layers=(0,), favoured=(2,))
    tracker = ExpertLoadTracker(model, E)
    writer = SummaryWriter(str(tmp_path / "tb"))
    for step in range(1, 4):
        model(torch.randint(0, 64, (2, 16)))
        tracker.accumulate()
        tracker.log(writer, step)
    writer.close()
    acc = read_events(tmp_path / "tb")
    # all 32 tokens choose expert 2, capacity 32 / 4 = 8 keeps 8: max/mean = E, CV = sqrt(E - 1), 75% dropped
    assert scalar(acc, tag(0, "expert_2"), 3) == 1.0
    assert scalar(acc, tag(0, "imbalance_max_over_mean"), 3) == pytest.approx(E)
    assert scalar(acc, tag(0, "imbalance_cv"), 3) == pytest.approx(math.sqrt(E - 1))
    assert scalar(acc, tag(0, "dropped_fraction"), 3) == pytest.approx(0.75)
    assert scalar(acc, tag(1, "imbalance_max_over_mean"), 3) < 2.0  # the unbiased layer
    report = analyze(tmp_path, last_n=3)
    layer0 = report.split("layer 0:")[1].split("layer 1:")[0]
    assert "dead experts (< 2.50% in each of the last 3 log(s)): 0, 1, 3" in layer0, report
    assert "most loaded 2 (100.0%)" in layer0, report
    assert "dead experts (< 2.50% in each of the last 3 log(s)): none" in report.split("layer 1:")[1], report


def test_heatmaps_are_pngs_of_the_figure_size_and_the_change_image_starts_at_the_second_log(tmp_path):
    torch.manual_seed(0)
    model = Transformer(tiny_config(num_layers=3))
    tracker = ExpertLoadTracker(model, E)
    writer = SummaryWriter(str(tmp_path))
    for step in (10, 20):
        model(torch.randint(0, 64, (2, 8)))
        tracker.accumulate()
        tracker.log(writer, step)
    writer.close()
    acc = read_events(tmp_path)
    width, height = (round(inches * HEATMAP_DPI) for inches in heatmap_figsize(3, E))
    assert [e.step for e in acc.Images("expert_load/heatmap")] == [10, 20]
    assert [e.step for e in acc.Images("expert_load/heatmap_change")] == [20]
    for image in acc.Images("expert_load/heatmap") + acc.Images("expert_load/heatmap_change"):
        assert image.encoded_image_string.startswith(PNG_SIGNATURE)
        assert (image.width, image.height) == (width, height)
        pixels = imread(io.BytesIO(image.encoded_image_string), format="png")
        assert pixels.shape[:2] == (height, width) and pixels.std() > 0.05  # decodes, and is not blank


def test_histograms_and_custom_scalars_layout_cover_every_layer(tmp_path):
    torch.manual_seed(0)
    model = Transformer(tiny_config(num_layers=4, moe_every=2))
    tracker = ExpertLoadTracker(model, E)
    writer = SummaryWriter(str(tmp_path))
    model(torch.randint(0, 64, (2, 8)))
    tracker.accumulate()
    returned = tracker.log(writer, 5)
    writer.close()
    acc = read_events(tmp_path)
    for i in (1, 3):
        histogram = acc.Histograms(f"expert_load_histogram/layer_{i}")[0].histogram_value
        loads = [returned[tag(i, f"expert_{e}")] for e in range(E)]
        assert histogram.num == E and histogram.sum == pytest.approx(1.0)
        assert (histogram.min, histogram.max) == pytest.approx((min(loads), max(loads)))
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {chart.title: chart for c in layout.category for chart in c.chart}
    scalars = acc.Tags()["scalars"]
    for title, want in [("layer 1", [tag(1, f"expert_{e}") for e in range(E)]),
                        ("layer 3", [tag(3, f"expert_{e}") for e in range(E)]),
                        ("dropped_fraction", [tag(1, "dropped_fraction"), tag(3, "dropped_fraction")])]:
        (regex,) = charts[title].multiline.tag
        assert sorted(t for t in scalars if re.search(regex, t)) == sorted(want), title
    assert {c.title for c in layout.category} == {"expert load", "routing"}


def test_selection_bias_is_drawn_per_expert_in_its_own_section(tmp_path):
    torch.manual_seed(0)
    model = Transformer(tiny_config(num_layers=4, moe_every=2, balance="aux_free"))
    for i, bias in ((1, torch.linspace(-0.1, 0.1, E)), (3, torch.arange(E) * 1e-3)):
        model.blocks[i].ffn.router.selection_bias.copy_(bias)
    tracker = ExpertLoadTracker(model, E)
    writer = SummaryWriter(str(tmp_path))
    model(torch.randint(0, 64, (2, 8)))
    tracker.accumulate()
    returned = tracker.log(writer, 5)
    writer.close()
    acc = read_events(tmp_path)
    for i in (1, 3):
        bias = model.blocks[i].ffn.router.selection_bias.tolist()
        for e in range(E):
            assert returned[f"expert_bias/layer_{i}/expert_{e}"] == bias[e]
            assert scalar(acc, f"expert_bias/layer_{i}/expert_{e}", 5) == pytest.approx(bias[e], abs=1e-7)
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {chart.title: chart for c in layout.category for chart in c.chart}
    (regex,) = charts["layer 3 bias"].multiline.tag
    assert sorted(t for t in acc.Tags()["scalars"] if re.search(regex, t)) == \
        sorted(f"expert_bias/layer_3/expert_{e}" for e in range(E))


def test_model_without_moe_layers_logs_nothing(tmp_path):
    model = Transformer(tiny_config(moe_every=0))
    tracker = ExpertLoadTracker(model, E)
    model(torch.randint(0, 64, (1, 4)))
    tracker.accumulate()
    assert tracker.layer_ids == [] and tracker.log(None, 1) == {}


# ---- two ranks (gloo): each counts its own tokens, the log is the sum over ranks ----------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_rank_worker(rank: int, port: int, logdir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    tracker = ExpertLoadTracker(model, E)
    writer = SummaryWriter(logdir) if rank == 0 else None
    gen = torch.Generator().manual_seed(100)
    fed = {i: [] for i in range(2)}
    losses = layer_losses(model)
    for r in range(2):  # every rank draws both ranks' stats, keeps its own, and knows the pooled answer
        for forward in range(2):
            model(torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(10 * r + forward)))
            stats = {i: hand_stats(gen, skew=10 * r) for i in range(2)}
            for i in fed:
                fed[i].append(stats[i])
            if r == rank:
                for i, block in enumerate(model.blocks):
                    block.ffn.last_stats = stats[i]
                tracker.accumulate()
    returned = tracker.log(writer, step=2)
    if writer is not None:
        writer.close()
    for i in fed:
        aux, z = zip(*losses[i])
        for name, value in expected_scalars(fed[i], list(aux), list(z)).items():
            assert returned[tag(i, name)] == pytest.approx(value, rel=1e-9), (rank, i, name)
    dist.destroy_process_group()


def test_two_ranks_log_the_sum_of_their_counts(tmp_path):
    mp.spawn(two_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    acc = read_events(tmp_path)
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1  # rank 0 writes, rank 1 does not
    assert len(acc.Scalars(tag(0, "expert_0"))) == 1


# ---- a short real run through the trainer ------------------------------------------------------------------

def real_run_driver(overrides: list[str], record_path: str) -> None:
    """Child process: dist_moe.train.loop.run with block 0's router biased to experts 0 and 1, recording each
    MoE layer's own per-forward counts (training forwards only) for the test to compare against."""
    from dist_moe.config import load_config
    from dist_moe.train.loop import run

    records: dict[int, list] = {}
    original = Transformer.reset_parameters

    def reset_biased(self):
        original(self)
        bias_router(self, layers=(0,), favoured=(0, 1))
        for i, block in enumerate(self.blocks):
            records[i] = []
            block.ffn.register_forward_hook(lambda mod, inp, out, i=i: records[i].append(
                (int(mod.last_stats.dropped), mod.last_stats.routed, mod.last_stats.tokens_per_expert.tolist()))
                if mod.training else None)

    Transformer.reset_parameters = reset_biased
    run(load_config("tiny", overrides))
    Path(record_path).write_text(json.dumps(records))


def test_real_run_logs_expert_load_that_matches_the_layers_counts(tmp_path, cache_dir):
    from cli_runs import SMALL

    run_dir = tmp_path / "run"
    overrides = [*SMALL, "train.max_steps=4", "log.expert_every=2", "train.eval_every=4", f"run_dir={run_dir}",
                 f"data.cache_dir={cache_dir}"]
    result = subprocess.run([sys.executable, __file__, json.dumps(overrides), str(tmp_path / "records.json")],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    records = {int(k): v for k, v in json.loads((tmp_path / "records.json").read_text()).items()}
    acc = read_events(run_dir / "tb")
    assert tag(0, "expert_0") in acc.Tags()["scalars"], "no expert-load scalars: does train/loop.py call the tracker?"
    for i, forwards in records.items():
        assert len(forwards) == 4  # one training forward per step (grad_accum_steps=1)
        for step, window in ((2, forwards[:2]), (4, forwards[2:])):
            kept = np.sum([f[2] for f in window], axis=0)
            loads = [scalar(acc, tag(i, f"expert_{e}"), step) for e in range(E)]
            assert sum(loads) == pytest.approx(1.0, abs=1e-6)
            assert loads == pytest.approx(list(kept / kept.sum()), rel=1e-6)
            dropped = sum(f[0] for f in window) / sum(f[1] for f in window)
            assert scalar(acc, tag(i, "dropped_fraction"), step) == pytest.approx(dropped, rel=1e-6)
    # block 0: every token picks experts 0 and 1; 512 tokens, capacity ceil(512 / 4 * 1.25 * 2) = 320 each
    assert scalar(acc, tag(0, "dropped_fraction"), 4) == pytest.approx(1 - 640 / 1024)
    assert scalar(acc, tag(0, "imbalance_max_over_mean"), 4) == pytest.approx(2.0)
    assert [e.step for e in acc.Images("expert_load/heatmap")] == [2, 4]
    report = analyze(run_dir, last_n=2)
    assert "dead experts (< 2.50% in each of the last 2 log(s)): 2, 3" in report.split("layer 1:")[0], report
    assert (run_dir / "expert_load" / "heatmap.png").read_bytes().startswith(PNG_SIGNATURE)


if __name__ == "__main__":
    real_run_driver(json.loads(sys.argv[1]), sys.argv[2])
