"""kernels/expert_gemm.py: the backend choice, and the loop path both products take on CPU, against float64."""

import torch

from dist_moe.kernels.expert_gemm import choose_backend, grouped_mm, grouped_mm_weight_grad


def test_cpu_tensors_take_the_loop_backend_for_both_products():
    x, w = torch.randn(8, 16), torch.randn(2, 16, 8)
    assert choose_backend(x, w, None) == choose_backend(x, torch.randn(8, 8), None, weight_grad=True) == "loop"


def test_weight_gradient_is_each_segments_xt_grad_and_zero_for_empty_segments():
    torch.manual_seed(0)
    counts = torch.tensor([4, 0, 7, 2])
    x, grad = torch.randn(15, 6, dtype=torch.float64), torch.randn(15, 5, dtype=torch.float64)  # 2 rows unused
    ends = [0, 4, 4, 11, 13]
    expected = torch.stack([x[a:b].t() @ grad[a:b] for a, b in zip(ends, ends[1:])])
    out = grouped_mm_weight_grad(x, grad, counts)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(out[1]) == 0
    w = torch.randn(4, 6, 5, dtype=torch.float64, requires_grad=True)  # the same as autograd through grouped_mm
    (grouped_mm(x, w, counts) * grad).sum().backward()
    torch.testing.assert_close(w.grad, expected, rtol=1e-12, atol=1e-12)
