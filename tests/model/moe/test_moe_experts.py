import pytest
import torch

from dist_moe.kernels.expert_gemm import grouped_mm
from dist_moe.model.moe.experts import SwiGLUExperts


def test_expert_weights_do_not_depend_on_the_ep_size():
    torch.manual_seed(0)
    full = SwiGLUExperts(8, 8, 0, 12, 20)
    full.reset_parameters(0.1)
    for ep_size in (2, 4):
        for ep_rank in range(ep_size):
            torch.manual_seed(0)
            local = SwiGLUExperts(8, 8 // ep_size, ep_rank * 8 // ep_size, 12, 20)
            local.reset_parameters(0.1)
            first = ep_rank * 8 // ep_size
            for name in ("w13", "w2"):
                assert torch.equal(getattr(local, name), getattr(full, name)[first:first + 8 // ep_size])


def test_expert_parameters_carry_deepspeed_moe_marks():
    from types import SimpleNamespace

    from dist_moe.train.deepspeed_moe import mark_expert_parameters

    experts = SwiGLUExperts(8, 2, 4, 12, 20)
    mark_expert_parameters(SimpleNamespace(experts=experts, ep_size=4))
    assert all(p.allreduce is False and p.group_name == "ep_size_4" for p in experts.parameters())


def test_grouped_mm_multiplies_each_segment_by_its_expert():
    x, w = torch.randn(11, 6, dtype=torch.float64), torch.randn(4, 6, 5, dtype=torch.float64)
    counts = torch.tensor([3, 0, 8, 0])
    expected = torch.cat([x[:3] @ w[0], x[3:11] @ w[2]])
    torch.testing.assert_close(grouped_mm(x, w, counts), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch._grouped_mm path runs on CUDA (bf16)")
def test_cuda_grouped_mm_path_equals_fp32_loop_forward_and_backward():
    torch.manual_seed(0)
    experts = SwiGLUExperts(8, 8, 0, 128, 256).cuda()
    experts.reset_parameters(0.05)
    counts = torch.tensor([0, 0, 100, 1, 7, 0, 33, 2], device="cuda")
    x = torch.randn(int(counts.sum()), 128, device="cuda")
    reference = {n: p.detach().bfloat16().float().requires_grad_() for n, p in experts.named_parameters()}
    experts.bfloat16()
    xb = x.bfloat16().requires_grad_()
    y = experts(xb, counts)
    y.float().square().sum().backward()
    xr = xb.detach().float().requires_grad_()
    segments = xr.split(counts.tolist())
    w1, w3 = reference["w13"].chunk(2, dim=2)
    yr = torch.cat([(torch.nn.functional.silu(s @ w1[i]) * (s @ w3[i])) @ reference["w2"][i]
                    for i, s in enumerate(segments)])
    yr.square().sum().backward()
    torch.testing.assert_close(y.float(), yr, rtol=2e-2, atol=2e-2 * yr.abs().max().item())
    for name, p in experts.named_parameters():
        scale = reference[name].grad.abs().max().item()
        torch.testing.assert_close(p.grad.float(), reference[name].grad, rtol=3e-2, atol=3e-2 * scale)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch._grouped_mm and the Triton passes run on CUDA")
@pytest.mark.parametrize("dropless", [True, False], ids=["dropless", "cf_0.5"])
def test_cuda_routed_experts_equal_the_fp32_cpu_path(dropless, monkeypatch):
    """Routed experts in bf16 on CUDA (token-major scatter, gate weight on the hidden rows, plain gather-sum;
    on Hopper our TMA grouped GEMM) against the same experts in fp32 on CPU: output and every gradient,
    the gate weights' included."""
    from dist_moe.kernels import grouped_gemm
    from dist_moe.model.moe.dispatch import expert_capacity, route

    name = "grouped_mm_gluon" if grouped_gemm.GLUON else "grouped_mm"  # the kernel the experts run on Hopper
    tma_gemm, calls = getattr(grouped_gemm, name), []
    monkeypatch.setattr(grouped_gemm, name, lambda *args: calls.append(args) or tma_gemm(*args))

    torch.manual_seed(1)
    T, E, k, D, F_ = 300, 8, 2, 128, 256
    cpu = SwiGLUExperts(E, E, 0, D, F_)
    cpu.reset_parameters(0.05)
    gpu = SwiGLUExperts(E, E, 0, D, F_).cuda().bfloat16()
    gpu.load_state_dict(cpu.state_dict())
    cpu.load_state_dict({n: p.bfloat16().float() for n, p in cpu.state_dict().items()})  # the same rounded weights
    x = torch.randn(T, D).bfloat16().float()
    weights, indices = torch.softmax(torch.randn(T, E), -1).topk(k)
    capacity = None if dropless else expert_capacity(T, E, k, 0.5, 4)
    outputs, grads = [], []
    for module, device, dtype in ((cpu, "cpu", torch.float32), (gpu, "cuda", torch.bfloat16)):
        xs = x.detach().to(device, dtype).requires_grad_()
        gate = weights.detach().to(device).requires_grad_()
        plan = route(indices.to(device), gate, E, capacity)
        assert dropless or int(plan.dropped) > 0
        y = module(xs, plan.tokens_per_expert, (plan.token_index, plan.row_index, plan.row_weights()))
        y.float().square().sum().backward()
        outputs.append(y.float().cpu())
        grads.append([t.grad.float().cpu() for t in (xs, gate, module.w13, module.w2)])
    scale = outputs[0].abs().max().item()
    torch.testing.assert_close(outputs[1], outputs[0], rtol=2e-2, atol=2e-2 * scale)
    for theirs, ours in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=3e-2, atol=3e-2 * theirs.abs().max().item())
    assert len(calls) == (4 if torch.cuda.get_device_capability()[0] == 9 else 0)  # up, down and their input grads


def test_weight_gradient_kernel_is_chosen_once_per_shape_and_both_choices_agree():
    """On Hopper with Triton 3.6 the experts time the Gluon weight-gradient kernel against torch._grouped_mm once
    per shape and keep the faster; whichever is kept, the gradient is the float64 one."""
    from dist_moe.kernels import expert_gemm as experts
    from dist_moe.kernels import grouped_gemm

    if not (torch.cuda.is_available() and grouped_gemm.GLUON and torch.cuda.get_device_capability()[0] == 9):
        pytest.skip("the Gluon weight-gradient kernel runs on Hopper with Triton 3.6")
    torch.manual_seed(2)
    counts = torch.tensor([300, 0, 1000, 129, 64], device="cuda")
    x = torch.randn(1500, 256, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(1500, 384, device="cuda", dtype=torch.bfloat16)
    tiles = grouped_gemm.expert_tiles(counts)
    pairs = zip(x[:1493].double().split(counts.tolist()), grad[:1493].double().split(counts.tolist()))
    expected = torch.stack([a.t() @ b for a, b in pairs])
    experts._GLUON_WEIGHT_GRAD_FASTER.clear()
    results = []
    for _ in range(2):
        out = experts.grouped_mm_weight_grad(x, grad, counts, tiles)
        ((key, verdict),) = experts._GLUON_WEIGHT_GRAD_FASTER.items()  # timed once, remembered
        results.append(out)
        experts._GLUON_WEIGHT_GRAD_FASTER[key] = not verdict  # the other kernel next
    for out in results:
        assert ((out.double() - expected).norm() / expected.norm()).item() < 1.6e-2
