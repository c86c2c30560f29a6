"""The fused router and routing plan (kernels/moe_router.py) against their PyTorch references.

fused_router must equal router.top_k_gating (weights, indices, aux and z losses, stats, and the gradients
of logits, x and the router weight, the reference run in float64); fused_route must give route's plan
bit for bit (integers) with equal combine weights and their gradient. Without CUDA the kernels run under
TRITON_INTERPRET=1 (tests/conftest.py). Token counts span several blocks and end in a partial one (blocks
are max(16, 1024 / E_PAD) tokens in the router, max(16, 4096 / E_PAD) in the plan); "skew" piles tokens
onto a few experts.
"""

import pytest
import torch
import triton

from dist_moe.kernels import moe_router
from dist_moe.kernels.moe_router import fused_route, fused_router, router_logits
from dist_moe.model.moe.dispatch import expert_capacity, route
from dist_moe.model.moe.router import top_k_gating

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# (T, E, k): E in {4, 8, 64}, k in {1, 2, 8}, k = 3 (f counts every assignment), several partial blocks.
SHAPES = [(2500, 4, 1), (1100, 8, 2), (150, 64, 8), (201, 64, 2), (90, 8, 3), (7, 4, 2)]


def random_logits(T, E, skew, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=gen, dtype=torch.float64) * 2
    if skew:
        logits[:, : max(1, E // 4)] += 3.0  # a quarter of the experts get most first choices
    return logits


def assert_close_scaled(got, exact, tolerance):
    """Elementwise within `tolerance` of the largest |exact| (fp32 rounding of sums that cancel)."""
    torch.testing.assert_close(got.cpu().double(), exact, rtol=0, atol=tolerance * exact.abs().max().item())


def weighted_sum(weights, aux, z, seed):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(weights.shape, generator=gen, dtype=torch.float64).to(weights.device, weights.dtype)
    return (weights * g).sum() + 3.0 * aux + 5.0 * z


@pytest.mark.parametrize("skew", [False, True], ids=["even", "skew"])
@pytest.mark.parametrize("T,E,k", SHAPES, ids=str)
def test_fused_router_equals_torch_gating_values_and_logit_gradients(T, E, k, skew):
    logits64 = random_logits(T, E, skew, seed=T + E + k).requires_grad_()
    logits = logits64.detach().float().to(DEVICE).requires_grad_()
    weights, indices, aux, z, stats = fused_router(logits, k)
    weights_ref, indices_ref, aux_ref, z_ref, stats_ref = top_k_gating(logits64, k)
    assert indices.dtype == torch.int64 and weights.dtype == aux.dtype == stats.dtype == torch.float32
    assert torch.equal(indices.cpu(), indices_ref)
    torch.testing.assert_close(weights.cpu().double(), weights_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(aux.cpu().double(), aux_ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(z.cpu().double(), z_ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(stats.cpu().double(), stats_ref, rtol=1e-5, atol=0)
    assert not stats.requires_grad
    weighted_sum(weights, aux, z, seed=1).backward()
    weighted_sum(weights_ref, aux_ref, z_ref, seed=1).backward()
    assert_close_scaled(logits.grad, logits64.grad, 1e-6)


@pytest.mark.parametrize("loss", ["aux", "z"])
def test_fused_router_gradient_of_one_loss_alone(loss):
    """Outputs that get no gradient (here the weights and the other loss) count as zero in the backward."""
    logits64 = random_logits(90, 8, False, seed=4).requires_grad_()
    logits = logits64.detach().float().to(DEVICE).requires_grad_()
    position = {"aux": 2, "z": 3}[loss]
    fused_router(logits, 2)[position].backward()
    top_k_gating(logits64, 2)[position].backward()
    assert_close_scaled(logits.grad, logits64.grad, 1e-5)  # aux alone: g nearly constant, p (g - sum p g) cancels


@pytest.mark.parametrize("T,E,k", [(150, 64, 8), (1100, 8, 2)], ids=str)
def test_fused_router_gradients_of_x_and_router_weight_equal_float64(T, E, k):
    """Through router_logits (fp32 on CPU, bf16 tensor cores on CUDA): d x and d w of the whole router."""
    D, dtype = 48, torch.bfloat16 if CUDA else torch.float32
    gen = torch.Generator().manual_seed(T)
    x = torch.randn(T, D, generator=gen).to(dtype)
    w = (torch.randn(E, D, generator=gen) * 0.3).to(dtype)
    x64, w64 = (t.double().requires_grad_() for t in (x, w))
    x, w = (t.to(DEVICE).requires_grad_() for t in (x, w))
    weights, _, aux, z, _ = fused_router(router_logits(x, w), k)
    weights_ref, _, aux_ref, z_ref, _ = top_k_gating(x64 @ w64.t(), k)
    torch.testing.assert_close(weights.cpu().double(), weights_ref, rtol=1e-5, atol=1e-6)
    weighted_sum(weights, aux, z, seed=2).backward()
    weighted_sum(weights_ref, aux_ref, z_ref, seed=2).backward()
    assert x.grad.dtype == x.dtype and w.grad.dtype == w.dtype
    for grad, ref in ((x.grad, x64.grad), (w.grad, w64.grad)):
        relative = ((grad.cpu().double() - ref).norm() / ref.norm()).item()
        assert relative < (4e-3 if CUDA else 1e-5)  # bf16: its own rounding of the result, nothing more


@pytest.mark.skipif(not CUDA, reason="the bf16 tensor-core router GEMM runs on CUDA only")
def test_bf16_router_logits_round_only_once():
    """bf16 products are exact in fp32: logits equal the float64 GEMM to fp32 accuracy, and the hi/lo split
    of d logits keeps d x and d w within their own final bf16 rounding of the float64 result."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 2048, generator=gen).bfloat16()
    w = (torch.randn(64, 2048, generator=gen) * 0.02).bfloat16()
    grad = torch.randn(4096, 64, generator=gen) * 1e-4
    grad -= grad.mean(-1, keepdim=True)  # d logits of a softmax sum to zero per token: cancellation
    xc, wc = (t.cuda().requires_grad_() for t in (x, w))
    logits = router_logits(xc, wc)
    assert logits.dtype == torch.float32
    ref = x.double() @ w.double().t()
    assert ((logits.cpu().double() - ref).norm() / ref.norm()).item() < 1e-5
    logits.backward(grad.cuda())
    for got, exact in ((xc.grad, grad.double() @ w.double()), (wc.grad, grad.double().t() @ x.double())):
        rounding = ((exact.bfloat16().double() - exact).norm() / exact.norm()).item()
        assert ((got.cpu().double() - exact).norm() / exact.norm()).item() < 1.25 * rounding


def routed(T, E, k, skew, seed):
    weights, indices, *_ = top_k_gating(random_logits(T, E, skew, seed).float(), k)
    return indices, weights


@pytest.mark.parametrize("normalize", [True, False], ids=["renormalised", "raw"])
@pytest.mark.parametrize("factor", [None, 1.0, 0.5], ids=["dropless", "cf1.0", "cf0.5"])
@pytest.mark.parametrize("skew", [False, True], ids=["even", "skew"])
@pytest.mark.parametrize("T,E,k", SHAPES, ids=str)
def test_fused_route_equals_route_bit_for_bit(T, E, k, skew, factor, normalize):
    indices, weights = routed(T, E, k, skew, seed=3 * T + k)
    capacity = None if factor is None else expert_capacity(T, E, k, factor, min_capacity=1)
    weights64 = weights.double().requires_grad_()  # the weight gradient's reference; the plan's is fp32
    plan = route(indices, weights, E, capacity, "position", normalize)
    fused_weights = weights.to(DEVICE).requires_grad_()
    token_index, row_index, combine, tokens_per_expert, kept, dropped = fused_route(
        indices.to(DEVICE), fused_weights, E, capacity, normalize)
    if factor == 0.5:
        assert not plan.kept.all()  # the case really drops
    for name, got, ref in [("token_index", token_index, plan.token_index), ("row_index", row_index, plan.row_index),
                           ("tokens_per_expert", tokens_per_expert, plan.tokens_per_expert),
                           ("kept", kept, plan.kept), ("dropped", dropped, plan.dropped)]:
        assert got.dtype == ref.dtype and torch.equal(got.cpu(), ref), name
    torch.testing.assert_close(combine.cpu(), plan.combine_weights, rtol=5e-7, atol=0)  # k-term sums: 2 ulp
    grad = torch.randn(T, k, generator=torch.Generator().manual_seed(T))
    (route(indices, weights64, E, capacity, "position", normalize).combine_weights * grad).sum().backward()
    (combine * grad.to(DEVICE)).sum().backward()
    assert_close_scaled(fused_weights.grad, weights64.grad, 1e-5)  # (dc - sum c dc) / S cancels


def test_fused_route_weight_gradient_when_every_choice_of_a_token_is_dropped():
    """Capacity 1: tokens that lose all choices get combine weight 0 and (clamped sum) d weights = 0."""
    indices = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1]])
    weights = torch.tensor([[0.6, 0.3], [0.5, 0.4], [0.7, 0.2], [0.9, 0.1]])
    ref_weights, fused_weights = weights.clone().requires_grad_(), weights.to(DEVICE).requires_grad_()
    plan = route(indices, ref_weights, 2, 1)
    _, _, combine, _, kept, _ = fused_route(indices.to(DEVICE), fused_weights, 2, 1)
    assert kept.cpu().tolist() == plan.kept.tolist() == [[True, False], [False, False], [True, False], [False, False]]
    assert torch.equal(combine.cpu(), plan.combine_weights)
    plan.combine_weights.sum().backward()
    combine.sum().backward()
    torch.testing.assert_close(fused_weights.grad.cpu(), ref_weights.grad)


@pytest.mark.parametrize("T,E,k", [(201, 64, 2), (2500, 4, 1)], ids=str)
def test_one_program_reduction_and_scan_carry_their_sums_across_many_steps(T, E, k, monkeypatch):
    """The router's reduction and the plan's scan walk their per-block rows in steps of _SERIAL_TILE values,
    one step at the shapes above: a small tile makes them take many, carrying the partial sums between."""
    monkeypatch.setattr(moe_router, "_SERIAL_TILE", 2 * triton.next_power_of_2(E))  # 2 rows a step: 2-7 steps
    test_fused_router_equals_torch_gating_values_and_logit_gradients(T, E, k, skew=True)
    test_fused_route_equals_route_bit_for_bit(T, E, k, skew=True, factor=0.5, normalize=True)
