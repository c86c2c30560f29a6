"""The two-read cross-entropy kernel (kernels/cross_entropy.py) against a float64 log-softmax, forward and backward.

Without CUDA it runs under TRITON_INTERPRET=1 (fp32, fp16; bf16 on CUDA only). Vocabularies span one block, a
block and a ragged tail, and several blocks, so the online logsumexp carries its max and sum across blocks.
"""

import pytest
import torch

from dist_moe.kernels import cross_entropy as kernel
from dist_moe.model.loss import cross_entropy

CUDA = torch.cuda.is_available()  # without it, tests/conftest.py turns on TRITON_INTERPRET before triton loads
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}  # of the largest gradient; float32
# exp(x - logsumexp) is good to |x - logsumexp| ulps, ~1e-5 at the scale-30 logits


def cross_entropy_float64(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -torch.log_softmax(logits.double(), dim=-1).gather(1, targets[:, None]).mean()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, V, scale", [(5, 37, 1.0), (19, 1000, 3.0), (7, kernel.BLOCK_V + 1003, 30.0),
                                         (3, 3 * kernel.BLOCK_V, 1.0)])
def test_cross_entropy_kernel_matches_float64_forward_and_backward(dtype, N, V, scale):
    g = torch.Generator().manual_seed(N * V)
    logits = (scale * torch.randn(N, V, generator=g)).to(DEVICE, dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    targets[0] = V - 1  # the last column, in the ragged tail
    grad_out = torch.tensor(1.7, device=DEVICE)

    loss = kernel.cross_entropy(logits, targets)
    loss.backward(grad_out)
    logits64 = logits.detach().double().requires_grad_()
    loss64 = cross_entropy_float64(logits64, targets)
    loss64.backward(grad_out.double())

    tol = TOLERANCE[dtype]
    assert loss.dtype == torch.float32 and logits.grad.dtype == dtype
    assert abs(loss.item() - loss64.item()) <= 1e-5 * max(1.0, loss64.item())  # float32 from exact inputs
    grad_scale = logits64.grad.abs().max().item()
    assert (logits.grad.double() - logits64.grad).abs().max().item() <= tol * grad_scale
    # and it is the same function as the PyTorch path of dist_moe.model.loss.cross_entropy
    torch_path = cross_entropy(logits.detach().cpu(), targets.cpu())
    assert abs(loss.item() - torch_path.item()) <= 1e-5 * max(1.0, torch_path.item())


def test_cross_entropy_kernel_reads_rows_by_their_stride():
    """Rows with a stride wider than V (a slice of wider logits), and int32 targets from a transposed view."""
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(6, 70, generator=g).to(DEVICE)
    logits = wide[:, :50].requires_grad_()  # rows 70 apart
    targets = torch.randint(0, 50, (6, 2), generator=g).to(DEVICE, torch.int32).t()[0]  # stride 2
    loss = kernel.cross_entropy(logits, targets)
    loss.backward()
    logits64 = logits.detach().double().requires_grad_()
    loss64 = cross_entropy_float64(logits64, targets.long())
    loss64.backward()
    assert loss.item() == pytest.approx(loss64.item(), rel=1e-6)
    torch.testing.assert_close(logits.grad.double(), logits64.grad, rtol=1e-5, atol=1e-7)


def test_cross_entropy_kernel_flags_out_of_range_targets_and_refuses_what_it_does_not_support():
    logits = torch.randn(4, 10, device=DEVICE)
    assert torch.isnan(kernel.cross_entropy(logits, torch.tensor([0, 1, 10, 2], device=DEVICE)))
    assert torch.isfinite(kernel.cross_entropy(logits, torch.tensor([0, 1, 9, 2], device=DEVICE)))
    with pytest.raises(ValueError, match="cross_entropy kernel"):
        kernel.cross_entropy(logits.double(), torch.zeros(4, dtype=torch.long, device=DEVICE))
    assert not kernel.supports(logits.t(), torch.zeros(10, dtype=torch.long, device=DEVICE))  # columns not unit-stride
    assert not kernel.supports(logits[:0], torch.zeros(0, dtype=torch.long, device=DEVICE))  # no rows
