import pytest
import torch
from deepspeed.moe.sharded_moe import _capacity
from kept_rows import w1_w3
from moe_reference import naive_moe

from dist_moe.config import Config, ConfigError, validate
from dist_moe.model.moe.layer import MoELayer
from dist_moe.train.deepspeed_baseline import DeepSpeedMoE
from dist_moe.train.deepspeed_moe import apply_deepspeed_moe


def build_moe_layer(cfg: Config, ep_group) -> torch.nn.Module:
    """The layer for moe.impl as DeepSpeed's engine gets it."""
    return apply_deepspeed_moe(MoELayer(cfg, ep_group), cfg)


def small_config(**moe) -> Config:
    cfg = Config()
    cfg.model.d_model, cfg.model.d_ff, cfg.model.init_std = 16, 24, 0.3
    cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.min_capacity = 6, 2, 1
    for key, value in moe.items():
        setattr(cfg.moe, key, value)
    return cfg


def ds_capacity(cfg: Config, num_tokens: int) -> int:
    m = cfg.moe
    gates = torch.empty(num_tokens, m.num_experts)
    return int(_capacity(gates, torch.tensor(m.capacity_factor * m.top_k), torch.tensor(m.min_capacity)))


def reference(layer: MoELayer, x: torch.Tensor, capacity):
    shared = None if layer.shared_mlp is None else tuple(
        lin.weight.t() for lin in (layer.shared_mlp.w1, layer.shared_mlp.w3, layer.shared_mlp.w2))
    m = layer.cfg.moe
    e = layer.experts
    return naive_moe(x, layer.router.weight, *w1_w3(e), e.w2, m.top_k, capacity, m.drop_policy,
                     m.normalize_weights, shared)


def assert_same_grads(layer: torch.nn.Module, x: torch.Tensor, ours: tuple, ref: tuple):
    """Gradients of every parameter and of x for a weighted sum of (y, aux, z). The router runs in fp32
    (its grads, and x's through it, get fp32 tolerances); the experts run in float64 on equal gates."""
    names = [n for n, _ in layer.named_parameters()] + ["x"]

    def grads(outputs):
        loss = sum(t.sum() * (i + 1) for i, t in enumerate(outputs))
        return torch.autograd.grad(loss, list(layer.parameters()) + [x])

    for name, a, b in zip(names, grads(ours), grads(ref)):
        fp32 = name.startswith("router.") or name == "x"
        torch.testing.assert_close(a, b, rtol=1e-4 if fp32 else 1e-7, atol=1e-6 if fp32 else 1e-10, msg=name)


@pytest.mark.parametrize("top_k,shared,dropless", [(1, False, True), (2, False, False), (2, True, True),
                                                   (3, False, False)])
def test_layer_equals_naive_loop_when_nothing_is_dropped(top_k, shared, dropless):
    torch.manual_seed(top_k)
    cfg = small_config(top_k=top_k, shared_expert=shared, dropless=dropless, capacity_factor=6.0 / top_k)
    layer = MoELayer(cfg, None).double().train()
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    y, aux, z = layer(x)
    y_ref, kept, aux_ref, z_ref = reference(layer, x.view(-1, 16), None)
    assert all(all(row) for row in kept) and int(layer.last_stats.dropped) == 0
    torch.testing.assert_close(y.view(-1, 16), y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(aux, aux_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(z, z_ref, rtol=1e-6, atol=0)
    assert_same_grads(layer, x, (y, aux, z), (y_ref, aux_ref, z_ref))


@pytest.mark.parametrize("policy", ["position", "probs"])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_layer_drops_exactly_the_assignments_beyond_capacity(policy, top_k):
    torch.manual_seed(10 + top_k)
    cfg = small_config(top_k=top_k, drop_policy=policy, capacity_factor=0.5)
    layer = MoELayer(cfg, None).double().train()
    x = torch.randn(2, 15, 16, dtype=torch.float64, requires_grad=True)
    y, aux, z = layer(x)
    capacity = ds_capacity(cfg, 30)
    y_ref, kept, aux_ref, z_ref = reference(layer, x.view(-1, 16), capacity)
    dropped = sum(not k for row in kept for k in row)
    assert dropped > 0 and int(layer.last_stats.dropped) == dropped and layer.last_stats.capacity == capacity
    torch.testing.assert_close(y.view(-1, 16), y_ref, rtol=1e-10, atol=1e-12)
    assert_same_grads(layer, x, (y, aux, z), (y_ref, aux_ref, z_ref))


def test_expert_that_receives_no_tokens_gets_zero_gradient():
    torch.manual_seed(0)
    cfg = small_config(top_k=2, dropless=True)
    layer = MoELayer(cfg, None).double()
    with torch.no_grad():
        layer.router.weight[3] = -5.0  # inputs are positive: expert 3's logit is far below the others
    x = torch.rand(4, 5, 16, dtype=torch.float64)
    y, aux, z = layer(x)
    assert layer.last_stats.tokens_per_expert[3] == 0
    torch.testing.assert_close(y.view(-1, 16), reference(layer, x.view(-1, 16), None)[0])
    (y.sum() + aux + z).backward()
    for w in (layer.experts.w13, layer.experts.w2):
        assert torch.count_nonzero(w.grad[3]) == 0 and torch.count_nonzero(w.grad[0]) > 0


def test_eval_uses_eval_capacity_factor():
    cfg = small_config(capacity_factor=0.5, eval_capacity_factor=3.0)
    layer = MoELayer(cfg, None)
    x = torch.randn(1, 12, 16)
    layer.train()(x)
    assert layer.last_stats.capacity == ds_capacity(cfg, 12)
    layer.eval()(x)
    cfg.moe.capacity_factor = 3.0
    assert layer.last_stats.capacity == ds_capacity(cfg, 12)


def test_stats_count_kept_assignments_and_routing_entropy():
    torch.manual_seed(1)
    cfg = small_config(top_k=2, capacity_factor=0.75)
    layer = MoELayer(cfg, None)
    x = torch.randn(2, 9, 16)
    layer(x)
    s = layer.last_stats
    probs = torch.softmax(x.view(-1, 16) @ layer.router.weight.t(), -1)
    _, kept, _, _ = reference(layer, x.view(-1, 16), ds_capacity(cfg, 18))
    choices = torch.argsort(probs, -1, descending=True)[:, :2]
    expected = torch.bincount(choices[torch.tensor(kept)], minlength=6)
    assert torch.equal(s.tokens_per_expert, expected) and s.tokens_per_expert.dtype == torch.int64
    assert s.routed == 36 and s.num_tokens == 18 and int(s.dropped) == 36 - int(expected.sum())
    torch.testing.assert_close(s.router_entropy_sum, -(probs * probs.log()).sum())
    torch.testing.assert_close(s.top1_prob_sum, probs.max(-1).values.sum())


@pytest.mark.parametrize("top_k,factor", [(1, 8.0), (2, 0.75), (2, 8.0)])
def test_deepspeed_impl_matches_dist_moe_from_the_same_seed(top_k, factor):
    """moe.impl=deepspeed and dist_moe: same weights from the same seed, same state-dict keys, and the same
    outputs and losses (top-1 only without drops: DeepSpeed's top-1 drops by torch.topk tie order)."""
    cfg = small_config(top_k=top_k, capacity_factor=factor, shared_expert=True)
    torch.manual_seed(5)
    ours = build_moe_layer(cfg, None)
    cfg.moe.impl = "deepspeed"
    torch.manual_seed(5)
    theirs = build_moe_layer(cfg, None)
    assert isinstance(theirs, DeepSpeedMoE) and isinstance(ours, MoELayer)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 11, 16)
    y, aux, z = ours(x)
    y_ds, aux_ds, z_ds = theirs(x)
    torch.testing.assert_close(y, y_ds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((aux, z), (aux_ds, z_ds))
    assert torch.equal(ours.last_stats.tokens_per_expert, theirs.last_stats.tokens_per_expert)
    assert ours.last_stats.capacity == theirs.last_stats.capacity


def test_checkpoint_keys_load_across_implementations():
    cfg = small_config()
    ours = build_moe_layer(cfg, None)
    cfg.moe.impl = "deepspeed"
    theirs = build_moe_layer(cfg, None)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    fresh = build_moe_layer(small_config(), None)
    fresh.load_state_dict(theirs.state_dict(), strict=True)
    for p, q in zip(fresh.parameters(), ours.parameters()):
        assert torch.equal(p, q)
    assert not any("expert" in k for k in ours.state_dict() if "deepspeed_experts" not in k)


def test_deepspeed_impl_rejects_drop_by_probs():
    with pytest.raises(ConfigError, match="moe.drop_policy"):
        validate(small_config(impl="deepspeed", drop_policy="probs"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused router and routing plan run on CUDA")
@pytest.mark.parametrize("top_k,dropless", [(2, False), (8, True), (8, False)])
def test_layer_on_cuda_fused_router_and_plan_equal_the_cpu_path(top_k, dropless):
    """The CUDA layer (fused router, Triton plan) against the same layer on CPU (PyTorch path), fp32."""
    torch.manual_seed(top_k)
    cfg = small_config(top_k=top_k, dropless=dropless, capacity_factor=0.75)
    cfg.moe.num_experts = 64
    cpu = MoELayer(cfg, None)
    gpu = MoELayer(cfg, None).cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(3, 50, 16, requires_grad=True)
    xc = x.detach().cuda().requires_grad_()
    outputs, outputs_gpu = cpu(x), gpu(xc)
    s, t = cpu.last_stats, gpu.last_stats
    assert torch.equal(s.tokens_per_expert, t.tokens_per_expert.cpu()) and int(s.dropped) == int(t.dropped)
    assert dropless or int(s.dropped) > 0
    torch.testing.assert_close((s.router_entropy_sum, s.top1_prob_sum),
                               (t.router_entropy_sum.cpu(), t.top1_prob_sum.cpu()))
    for a, b in zip(outputs, outputs_gpu):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5)
    grads = torch.autograd.grad(sum(t.sum() * (i + 1) for i, t in enumerate(outputs)), [x, *cpu.parameters()])
    grads_gpu = torch.autograd.grad(sum(t.sum() * (i + 1) for i, t in enumerate(outputs_gpu)), [xc, *gpu.parameters()])
    for a, b in zip(grads, grads_gpu):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5)
