"""Expert parallelism on gloo: EP=2/4 equal the one-process model; DeepSpeed ZeRO-2 with EP=2 trains it.

Each test is one `torch.multiprocessing.spawn` running several checks (process start-up and the DeepSpeed
import dominate the cost). Every rank also builds the one-process reference itself: the full model with
all experts, from the same seed, run on every rank's chunk of the global batch separately (capacity is per
expert over one rank's tokens), with the loss averaged over ranks as data parallelism does.
"""

import copy
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dist_moe.config import Config
from dist_moe.model.moe.layer import MoELayer
from dist_moe.model.moe.router import end_router_step
from dist_moe.parallel import groups
from dist_moe.parallel.groups import NodeLayoutError, expert_data_parallel_group, expert_parallel_group, node_layout
from dist_moe.train.bounded_exchange import apply_bounded_exchange, forward_without_overflow
from dist_moe.train.deepspeed_moe import apply_deepspeed_moe

D = 16


def config(**moe) -> Config:
    cfg = Config()
    cfg.model.d_model, cfg.model.d_ff, cfg.model.init_std = D, 24, 0.3
    cfg.moe.num_experts, cfg.moe.min_capacity, cfg.moe.capacity_factor = 8, 1, 0.75
    for key, value in moe.items():
        setattr(cfg.moe, key, value)
    return cfg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, world_size: int, *args) -> None:
    mp.spawn(worker, args=(world_size, free_port(), *args), nprocs=world_size, join=True)


def init(rank: int, world_size: int, port: int, ranks_per_node: int = 0) -> None:
    """ranks_per_node simulates nodes of that many ranks (as a launcher's LOCAL_RANK / LOCAL_WORLD_SIZE say)."""
    local = ranks_per_node or world_size
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank % local), LOCAL_WORLD_SIZE=str(local))
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)


def global_batch(world_size: int, skew: torch.Tensor | None):
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(world_size, 2, 9, D, generator=gen)
    if skew is not None:  # every token points along `skew`: see skew_router
        x = 0.1 * x + 3.0 * skew
    return x, torch.randn(world_size, 2, 9, D, generator=gen)


def skew_router(layer: MoELayer, direction: torch.Tensor, favoured: range) -> None:
    """Router rows of the favoured experts point along `direction`, the others against it."""
    with torch.no_grad():
        for e in range(layer.num_experts):
            layer.router.weight[e] = direction * (1.0 + 0.1 * e) * (1 if e in favoured else -1)


def check_ep_equals_single_process(rank, world_size, ep_size, top_k, dropless, skewed=False, ep_keys=None,
                                   redone=None, **moe):
    """moe: keys of both layers, e.g. routing-policy keys (docs/routing.md); a selection bias is set the same on
    both sides, and the bias update after the step (counts all-reduced over the ranks) must equal the
    reference's over all chunks. ep_keys: the EP layer's exchange keys. redone: whether the EP layer's forward
    must have run twice (a bounded exchange that overflowed). Returns the EP layer's output and gradients (for
    bitwise comparisons between exchanges)."""
    ep_keys = ep_keys or {}
    cfg = config(top_k=top_k, dropless=dropless, **moe)
    torch.manual_seed(0)
    ref = MoELayer(cfg, None)
    cfg_ep = copy.deepcopy(cfg)
    cfg_ep.moe.ep_size = ep_size
    for key, value in ep_keys.items():
        setattr(cfg_ep.moe, key, value)
    torch.manual_seed(0)
    layer = MoELayer(cfg_ep, expert_parallel_group(ep_size))
    if layer.router.selection_bias is not None:
        bias = torch.linspace(-0.2, 0.2, cfg.moe.num_experts)
        layer.router.selection_bias.copy_(bias), ref.router.selection_bias.copy_(bias)
    e_local = cfg.moe.num_experts // ep_size
    ep_rank = rank % ep_size
    first = ep_rank * e_local
    skew = None
    if skewed:  # all tokens of all ranks choose experts owned by EP rank 1: EP rank 0 sends all, receives none
        skew = torch.nn.functional.normalize(torch.randn(D, generator=torch.Generator().manual_seed(7)), dim=0)
        for m in (ref, layer):
            skew_router(m, skew, range(e_local, 2 * e_local))
    xs, targets = global_batch(world_size, skew)

    forwards = []
    y, aux, z = forward_without_overflow(layer, lambda: forwards.append(1) or layer(xs[rank]))
    if redone is not None:
        assert (len(forwards) > 1) == redone, (forwards, ep_keys)
    ((y * targets[rank]).sum() + aux + z).backward()
    for name, p in layer.named_parameters():  # what DeepSpeed's reduction does (divide by the DP size)
        group = expert_data_parallel_group(ep_size) if name.startswith("experts.") else None
        dist.all_reduce(p.grad, group=group)
        p.grad /= world_size

    total = 0.0
    for j in range(world_size):
        y_ref, aux_ref, z_ref = ref(xs[j])
        if j == rank:
            torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close((aux, z), (aux_ref, z_ref))
            stats, ref_stats = layer.last_stats, ref.last_stats
            assert torch.equal(stats.tokens_per_expert, ref_stats.tokens_per_expert)  # same drop decisions
            assert int(stats.dropped) == int(ref_stats.dropped) and stats.capacity == ref_stats.capacity
            assert int(stats.rerouted) == int(ref_stats.rerouted)
        total = total + ((y_ref * targets[j]).sum() + aux_ref + z_ref) / world_size
    total.backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in layer.named_parameters():
        expected = ref_grads[name].grad
        if name.startswith("experts."):
            expected = expected[first:first + e_local]
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-6, msg=f"{name} ep={ep_size} {ep_keys}")
    if layer.router.selection_bias is not None:
        end_router_step(layer, 0.01)  # all-reduces this rank's selection counts
        ref.router.end_step(ref.router.step_selections, 0.01)  # the reference counted every rank's chunk
        assert torch.equal(layer.router.selection_bias, ref.router.selection_bias)
        assert not torch.equal(layer.router.selection_bias, bias)
    if skewed:
        assert layer.last_stats.tokens_per_expert[:e_local].sum() == 0
        if ep_rank == 0:
            assert all(torch.count_nonzero(p.grad) == 0 for p in layer.experts.parameters())
    return y.detach(), {name: p.grad for name, p in layer.named_parameters()}


def _ep_equivalence_worker(rank, world_size, port):
    init(rank, world_size, port)
    for top_k, dropless in [(1, False), (1, True), (2, False), (2, True)]:
        for ep_size in (2, 4):
            check_ep_equals_single_process(rank, world_size, ep_size, top_k, dropless)
    check_ep_equals_single_process(rank, world_size, 2, 2, dropless=False, skewed=True)
    check_ep_equals_single_process(rank, world_size, 4, 1, dropless=True, skewed=True)
    for ep_size in (2, 4):  # routing policies: decided on each rank's own tokens, whatever the EP size
        check_ep_equals_single_process(rank, world_size, ep_size, 2, dropless=False, overflow="reroute")
        check_ep_equals_single_process(rank, world_size, ep_size, 2, dropless=False, balance="aux_free")
        check_ep_equals_single_process(rank, world_size, ep_size, 2, dropless=False, routing="expert_choice",
                                       balance="none")
    check_ep_equals_single_process(rank, world_size, 2, 2, dropless=False, overflow="reroute", balance="both",
                                   score="sigmoid")
    check_global_batch_aux_grad_equals_one_big_batch(rank, world_size)
    # expert-DP groups {0, 2}, {1, 3}. Stage 0 clips by the mean of per-rank norms (DeepSpeed's
    # runtime.utils.clip_grad_norm_), not the global norm, so it is compared without clipping.
    check_zero_ep2_updates_equal_single_process(rank, world_size, zero_stage=0)
    for zero_stage in (1, 2):
        check_zero_ep2_updates_equal_single_process(rank, world_size, zero_stage, clip=0.05)


def check_global_batch_aux_grad_equals_one_big_batch(rank, world_size):
    """aux_loss_scope=global_batch, one micro batch per rank: the router gradient averaged over the ranks
    (data parallelism) equals that of the micro-batch Switch loss on all ranks' tokens in one process."""
    cfg = config(top_k=2, dropless=True, aux_loss_scope="global_batch")
    torch.manual_seed(0)
    layer = MoELayer(cfg, None)
    torch.manual_seed(0)
    ref = MoELayer(config(top_k=2, dropless=True), None)
    xs, _ = global_batch(world_size, None)
    _, aux, _ = layer(xs[rank])
    aux.backward()
    grad = layer.router.weight.grad.clone()
    dist.all_reduce(grad)
    _, aux_ref, _ = ref(xs.flatten(0, 1))  # every rank's sequences as one batch
    aux_ref.backward()
    mean_aux = aux.detach().clone()
    dist.all_reduce(mean_aux)  # each rank's P is local, f global: their mean is the big batch's loss
    torch.testing.assert_close(mean_aux / world_size, aux_ref.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(grad / world_size, ref.router.weight.grad, rtol=1e-5, atol=1e-7)
    local = MoELayer(config(top_k=2, dropless=True), None)  # the micro-batch loss: a different gradient
    local.load_state_dict(ref.state_dict())
    local(xs[rank])[1].backward()
    assert not torch.allclose(local.router.weight.grad, layer.router.weight.grad, rtol=1e-3, atol=1e-6)


@pytest.mark.slow
def test_ep2_and_ep4_outputs_losses_grads_and_zero012_updates_equal_single_process():
    spawn(_ep_equivalence_worker, 4)


def _exchange_worker(rank, world_size, port):
    """Chunked, padded and hierarchical exchanges (nodes {0, 1} and {2, 3}; uneven nodes too) against the
    one-process model, and bitwise against the flat exchange of the same layout (the experts' arithmetic is the
    same)."""
    init(rank, world_size, port, ranks_per_node=2)
    for local_ranks in ((0, 1, 2, 0), (0, 0, 1, 2)):  # uneven nodes {0, 1, 2} + {3}, then {0} + {1, 2, 3}
        os.environ["LOCAL_RANK"] = str(local_ranks[rank])
        groups._node_layouts.clear()  # the layout is cached per EP size for a run; here the "nodes" change
        flat = check_ep_equals_single_process(rank, world_size, 4, 2, True, ep_keys=dict(a2a_chunks=2))
        for exchange in ("ragged", "bounded"):  # bounded: forced small, so it also overflows and redoes
            uneven = check_ep_equals_single_process(rank, world_size, 4, 2, True, ep_keys=dict(
                exchange=exchange, a2a="hierarchical", a2a_chunks=2, bound_factor=0.01))
            assert torch.equal(uneven[0], flat[0]) and all(torch.equal(uneven[1][n], flat[1][n]) for n in flat[1])
    os.environ["LOCAL_RANK"] = str((0, 0, 1, 3)[rank])  # ranks 0 and 3 on one node: not node by node
    groups._node_layouts.clear()
    with pytest.raises(NodeLayoutError, match="moe.a2a"):
        node_layout(4)
    os.environ["LOCAL_RANK"] = str(rank % 2)
    groups._node_layouts.clear()
    for ep_size, chunks in ((2, 3), (4, 2)):  # 4 local experts in chunks of 1, 1, 2; 2 in chunks of 1, 1
        for top_k, dropless, shared_expert in ((2, False, True), (1, True, False), (2, True, True)):
            unchunked = {}
            settings = [("ragged", "flat", 1), ("ragged", "flat", chunks), ("padded", "flat", 1),
                        ("padded", "flat", chunks), ("padded", "hierarchical", 1), ("padded", "hierarchical", chunks),
                        ("ragged", "hierarchical", chunks)]
            if dropless:  # bounds forced small (8 rows): the first forward overflows and is redone (top_k=2)
                settings += [("bounded", "flat", 1), ("bounded", "flat", chunks), ("bounded", "hierarchical", chunks)]
            for exchange, a2a, a2a_chunks in settings:
                ep_keys = dict(exchange=exchange, a2a=a2a, a2a_chunks=a2a_chunks, bound_factor=0.01)
                redone = True if exchange == "bounded" and top_k == 2 and a2a_chunks == 1 else None  # ~18 > 8
                y, grads = check_ep_equals_single_process(rank, world_size, ep_size, top_k, dropless, redone=redone,
                                                          ep_keys=ep_keys, shared_expert=shared_expert)
                if exchange not in unchunked:
                    unchunked[exchange] = y, grads
                    continue
                y_ref, grads_ref = unchunked[exchange]
                assert torch.equal(y, y_ref), (ep_size, exchange, a2a, a2a_chunks)
                assert all(torch.equal(grads[name], grads_ref[name]) for name in grads), (ep_size, exchange, a2a)
            (y_ragged, grads_ragged), (y_padded, grads_padded) = unchunked["ragged"], unchunked["padded"]
            torch.testing.assert_close(y_padded, y_ragged, rtol=1e-5, atol=1e-6)
            for name in grads_ragged:  # padding slots add exact zeros; only the GEMMs' summation order may differ
                torch.testing.assert_close(grads_padded[name], grads_ragged[name], rtol=1e-5, atol=1e-6)
            if dropless:  # bounded: the experts see ragged's rows in ragged's order, padding past their counts
                y_bounded, grads_bounded = unchunked["bounded"]
                assert torch.equal(y_bounded, y_ragged)
                assert all(torch.equal(grads_bounded[name], grads_ragged[name]) for name in grads_ragged)
    for exchange in ("ragged", "padded"):  # EP rank 0 sends everything and receives nothing
        check_ep_equals_single_process(rank, world_size, 2, 2, False, skewed=True,
                                       ep_keys=dict(exchange=exchange, a2a_chunks=2))
    check_ep_equals_single_process(rank, world_size, 2, 2, True, skewed=True, redone=True,
                                   ep_keys=dict(exchange="bounded", a2a_chunks=2, bound_factor=0.01))
    check_redone_forward_draws_the_same_noise(rank, world_size)
    check_bounded_layer_has_no_host_sync(rank, world_size)
    engine = check_zero_ep2_updates_equal_single_process(rank, world_size, 2, clip=0.05, dropless=True,
                                                         exchange="bounded", bound_factor=0.01)
    assert engine.module.moe.exchange.rows_per_peer.limits[0] > 8  # it overflowed, and the steps still matched
    padded = dict(exchange="padded", a2a="hierarchical", a2a_chunks=2)  # routing policies bound by capacity too
    check_ep_equals_single_process(rank, world_size, 4, 2, False, ep_keys=padded, overflow="reroute")
    check_ep_equals_single_process(rank, world_size, 4, 2, False, ep_keys=padded, routing="expert_choice",
                                   balance="none")


def check_redone_forward_draws_the_same_noise(rank, world_size):
    """Router noise (jitter) in training: a bounded exchange that overflows and redoes its forward gives the
    ragged exchange's outputs, gradients and step counts (the redo restores the noise generator and counters)."""
    results = []
    for ep_keys in (dict(exchange="ragged"), dict(exchange="bounded", bound_factor=0.01)):
        cfg = config(top_k=2, dropless=True, ep_size=2, noise="jitter", noise_eps=0.3, balance="aux_free", **ep_keys)
        torch.manual_seed(0)
        layer = MoELayer(cfg, expert_parallel_group(2))
        x = global_batch(world_size, None)[0][rank]
        forwards = []
        y, aux, _ = forward_without_overflow(layer, lambda: forwards.append(1) or layer(x))
        (y.square().sum() + aux).backward()
        assert len(forwards) == (2 if ep_keys["exchange"] == "bounded" else 1)
        results.append((y, [p.grad for p in layer.parameters()], layer.router.step_selections.clone()))
    (y_ragged, grads_ragged, counts_ragged), (y_bounded, grads_bounded, counts_bounded) = results
    assert torch.equal(y_bounded, y_ragged) and torch.equal(counts_bounded, counts_ragged)
    assert all(torch.equal(a, b) for a, b in zip(grads_bounded, grads_ragged))


class HostSyncs(TorchDispatchMode):
    """Records what makes the host wait for the device: reading values (item, bool, int, tolist, numpy) and ops
    whose output size depends on the data (nonzero, boolean masks, repeat_interleave without output_size, unique)."""

    DATA_SIZED = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten._unique", "aten.unique")
    READERS = ("tolist", "numpy")  # they read the data without dispatching an op: spied on the class

    def __enter__(self):
        self.seen, self.originals = [], {name: getattr(torch.Tensor, name) for name in self.READERS}
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, lambda *a, _name=name, _f=original, **k: self.seen.append(_name) or _f(*a, **k))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs, name = kwargs or {}, str(func)
        if name.startswith(self.DATA_SIZED) or (
                name.startswith("aten.repeat_interleave.Tensor") and kwargs.get("output_size") is None) or (
                name.startswith("aten.index.Tensor") and any(i is not None and i.dtype == torch.bool for i in args[1])):
            self.seen.append(name)
        return func(*args, **kwargs)


def _masked_grouped_mm(x, w, tokens_per_expert, tiles=None):
    """grouped_mm with no host read (each row times its expert's weight, chosen by a device-side mask): the stand-in
    for the GPU backends, which take the counts on the device (the CPU loop reads them on the host)."""
    expert = torch.searchsorted(torch.cumsum(tokens_per_expert, 0), torch.arange(len(x)), right=True)
    return sum(torch.where((expert == e)[:, None], x @ w[e], 0.0) for e in range(len(w)))


def _masked_weight_grad(x, grad, tokens_per_expert, tiles=None):
    expert = torch.searchsorted(torch.cumsum(tokens_per_expert, 0), torch.arange(len(x)), right=True)
    return torch.stack([(x * (expert == e)[:, None]).t() @ grad for e in range(len(tokens_per_expert))])


def check_bounded_layer_has_no_host_sync(rank, world_size):
    """A bounded exchange's forward and backward make no host read (sync-free expert GEMMs in place of the CPU
    loop); the overflow check after it makes exactly one. The ragged exchange reads its split sizes (so the
    detector sees them). A forward of a Transformer with two bounded MoE layers makes that one read only."""
    from dist_moe.model.moe import experts
    from dist_moe.model.transformer import Transformer
    from dist_moe.parallel.exchange import check_overflows

    gemms = experts.grouped_mm, experts.grouped_mm_weight_grad
    experts.grouped_mm, experts.grouped_mm_weight_grad = _masked_grouped_mm, _masked_weight_grad
    try:
        x = global_batch(world_size, None)[0][rank].requires_grad_()
        syncs = {}
        for exchange in ("ragged", "bounded"):
            torch.manual_seed(0)
            layer = MoELayer(config(top_k=2, dropless=True, ep_size=4, a2a_chunks=2, exchange=exchange),
                             expert_parallel_group(4))
            with HostSyncs() as layer_syncs:
                y, aux, z = layer(x)
                (y.square().sum() + aux + z).backward()
            syncs[exchange] = layer_syncs.seen
        with HostSyncs() as check_syncs:
            assert check_overflows([layer.exchange.rows_per_peer]) == []
        assert syncs["bounded"] == [] and check_syncs.seen == ["tolist"], (syncs, check_syncs.seen)
        assert "tolist" in syncs["ragged"], syncs
        torch.manual_seed(0)
        cfg = tiny_transformer_config("moe.exchange=bounded", "moe.bound_factor=4")
        model = apply_bounded_exchange(Transformer(cfg, expert_parallel_group(4)))
        tokens = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(rank))
        with HostSyncs() as model_syncs:
            model(tokens)
        assert model_syncs.seen == ["tolist"], model_syncs.seen
    finally:
        experts.grouped_mm, experts.grouped_mm_weight_grad = gemms


def tiny_transformer_config(*overrides):
    from dist_moe.config import load_config

    return load_config("tiny", ["model.vocab_size=97", "model.d_model=32", "model.num_layers=2", "model.num_heads=4",
                                "model.num_kv_heads=2", "model.d_ff=48", "moe.num_experts=8", "moe.dropless=true",
                                "moe.ep_size=4", *overrides])


@pytest.mark.slow
def test_chunked_padded_hierarchical_exchanges_equal_single_process_and_unchunked_bitwise():
    spawn(_exchange_worker, 4)


class TinyMoEModel(torch.nn.Module):
    """Linear -> MoE FFN (residual) -> Linear: the smallest model with dense and expert parameters."""

    def __init__(self, cfg: Config, ep_group):
        super().__init__()
        self.inp = torch.nn.Linear(D, D)
        self.moe = MoELayer(cfg, ep_group)
        self.out = torch.nn.Linear(D, D)

    def forward(self, x):
        h = self.inp(x)
        y, aux, z = self.moe(h)
        return self.out(h + y), aux, z


def tiny_loss(model, x, target):
    out, aux, z = model(x)
    return F.mse_loss(out, target) + 0.01 * aux + 0.001 * z


def deepspeed_engine(cfg: Config, zero_stage: int = 2, clip: float = 0.0):
    import deepspeed

    from dist_moe.train.engine import optimizer_param_groups

    torch.manual_seed(0)
    model = apply_deepspeed_moe(apply_bounded_exchange(TinyMoEModel(cfg, expert_parallel_group(cfg.moe.ep_size))), cfg)
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, 0.1), lr=1e-2)
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": clip,
                 "zero_optimization": {"stage": zero_stage}, "zero_allow_untested_optimizer": True,
                 "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    assert engine.has_moe_layers  # the engine recognised the layer: expert grads go over the expert-DP group
    return engine


def check_zero_ep2_updates_equal_single_process(rank, world_size, zero_stage, clip=0.0, steps=3, **moe):
    """AdamW steps through the engine equal plain torch on the full model with the rank-averaged loss. With
    clip > 0 the clipping is active (grad norms here are ~0.3): ZeRO-1/2 compute the true global norm. moe: keys
    of both models (exchange keys act on the EP one only)."""
    engine = deepspeed_engine(config(top_k=2, ep_size=2, **moe), zero_stage, clip)
    ref_cfg = config(top_k=2, **moe)
    torch.manual_seed(0)
    ref = TinyMoEModel(ref_cfg, None)
    from dist_moe.train.engine import optimizer_param_groups

    ref_opt = torch.optim.AdamW(optimizer_param_groups(ref, 0.1), lr=1e-2)
    xs, targets = global_batch(world_size, None)
    for _ in range(steps):
        loss = tiny_loss(engine, xs[rank], targets[rank])
        engine.backward(loss)
        engine.step()
        ref_opt.zero_grad()
        (sum(tiny_loss(ref, xs[j], targets[j]) for j in range(world_size)) / world_size).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        ref_opt.step()
    first = (rank % 2) * 4
    ref_params = dict(ref.named_parameters())
    assert all(torch.count_nonzero(p.grad) for p in ref.parameters())  # every parameter took part
    for name, p in engine.module.named_parameters():
        expected = ref_params[name]
        if name.startswith("moe.experts."):
            expected = expected[first:first + 4]
        torch.testing.assert_close(p.detach(), expected.detach(), rtol=1e-4, atol=1e-5, msg=f"{name} {zero_stage}")
    return engine


def check_training_loss_falls(rank, world_size, impl):
    engine = deepspeed_engine(config(top_k=2, ep_size=2, impl=impl))
    xs, targets = global_batch(world_size, None)
    losses = []
    for _ in range(30):
        loss = tiny_loss(engine, xs[rank], targets[rank])
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (impl, losses)
    return engine


def check_checkpoint_has_one_file_per_global_expert(rank, engine, ckpt_dir):
    """save_checkpoint writes each expert into its own file under its global id (DeepSpeed's MoE format),
    and load_checkpoint restores it, also into a model with another EP size (weights only)."""
    engine.save_checkpoint(ckpt_dir, tag="t")
    dist.barrier()
    files = [torch.load(os.path.join(ckpt_dir, "t", f"layer_0_expert_{e}_mp_rank_00_model_states.pt"))
             for e in range(8)]
    linear = {name: torch.stack([files[e][f"moe.deepspeed_moe.experts.deepspeed_experts.{e}.{name}.weight"].t()
                                 for e in range(8)]) for name in ("w1", "w2", "w3")}  # (E, in, out)
    experts = {"w13": torch.cat([linear["w1"], linear["w3"]], dim=2), "w2": linear["w2"]}  # SwiGLUExperts' layout
    dense = torch.load(os.path.join(ckpt_dir, "t", "mp_rank_00_model_states.pt"), weights_only=False)["module"]
    assert "moe.deepspeed_moe.gate.wg.weight" in dense and not any("deepspeed_experts" in k for k in dense)
    saved = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    first = (rank % 2) * 4
    for name in experts:
        torch.testing.assert_close(saved[f"moe.experts.{name}"], experts[name][first:first + 4])
    for ep_size in (2, 1):
        fresh = deepspeed_engine(config(top_k=2, ep_size=ep_size), zero_stage=2)
        fresh.load_checkpoint(ckpt_dir, tag="t", load_module_only=ep_size != 2)  # ZeRO shards are per EP size
        for name, p in fresh.module.named_parameters():
            expected = experts[name.rsplit(".", 1)[1]] if name.startswith("moe.experts.") and ep_size == 1 \
                else saved[name]
            torch.testing.assert_close(p, expected, rtol=0, atol=0, msg=f"{name} ep={ep_size}")


def _zero2_worker(rank, world_size, port, ckpt_dir):
    init(rank, world_size, port)
    check_zero_ep2_updates_equal_single_process(rank, world_size, zero_stage=2, clip=0.05)
    engine = check_training_loss_falls(rank, world_size, "dist_moe")
    check_checkpoint_has_one_file_per_global_expert(rank, engine, ckpt_dir)
    check_training_loss_falls(rank, world_size, "deepspeed")


@pytest.mark.slow
def test_zero2_ep2_deepspeed_training_equals_single_process_and_learns(tmp_path):
    spawn(_zero2_worker, 2, str(tmp_path))


def _gpu_sync_free_worker(rank, world_size, port):
    """NCCL, bf16 (the GPU GEMMs apply), with torch's sync debug mode raising on any host sync: a bounded exchange's
    forward and backward run through; a ragged one stops at its split sizes (so the mode sees syncs)."""
    os.environ.update(DS_ACCELERATOR="cuda", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
                      NCCL_NVLS_ENABLE="0")
    torch.cuda.set_device(rank)
    import deepspeed

    from dist_moe.parallel.exchange import check_overflows

    deepspeed.init_distributed(dist_backend="nccl", auto_mpi_discovery=False, verbose=False)
    x = torch.randn(256, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layers = {}
    for exchange in ("bounded", "ragged"):
        torch.manual_seed(0)
        layer = MoELayer(config(top_k=2, dropless=True, ep_size=2, a2a_chunks=2, exchange=exchange),
                         expert_parallel_group(2)).to("cuda", torch.bfloat16)
        rows_per_peer = [layer.exchange.rows_per_peer] if exchange == "bounded" else []

        def step():
            y, aux, z = layer(x)
            (y.float().square().sum() + aux + z).backward()

        layers[exchange] = layer
        for _ in range(2):  # compiles the kernels, times the weight-gradient GEMMs, sets NCCL up, fits the bound
            step()
            check_overflows(rows_per_peer)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            if exchange == "bounded":
                step()
            else:
                with pytest.raises(RuntimeError, match="synchroniz"):
                    step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert check_overflows(rows_per_peer) == []
    with warnings.catch_warnings(record=True) as caught:  # the whole forward with its check: that one read only
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            forward_without_overflow(layers["bounded"], lambda: layers["bounded"](x))
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs
    dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_bounded_exchange_layer_makes_no_host_sync_on_gpus():
    spawn(_gpu_sync_free_worker, 2)
