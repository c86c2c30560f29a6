"""Token cross-entropy over a vocabulary in two reads of the logits, forward and backward, in Triton.

`cross_entropy(logits, targets)` must equal the PyTorch path of dist_moe.model.loss.cross_entropy,
F.cross_entropy(logits.float(), targets): the mean over rows of logsumexp(row) - row[target], for logits (N, V)
in any float dtype and targets (N,) in [0, V). That path makes a float32 copy of the logits, keeps a float32
log-softmax for its backward, and writes a float32 gradient that is cast back: about 40 bytes moved and 4 held
per logit. Here the forward reads the logits once (an online logsumexp in float32) and keeps one float32 per
row; the backward reads them once more and writes softmax - one_hot in the logits' dtype: 6 bytes moved per
logit, and only the logits held. A target outside [0, V) gives a NaN loss (PyTorch's path raises).
"""

import torch
import triton
import triton.language as tl

from .runtime import runs_kernels

BLOCK_V = 4096  # logits a program reads at a time (the vocabulary is walked in blocks of this many)


@triton.jit
def _cross_entropy_forward_kernel(LOGITS, TARGETS, LOSS, LSE, V, stride_row, BLOCK: tl.constexpr):
    """One row: its logsumexp by an online max and sum, then loss = logsumexp - logit[target]."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    running_max = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), 0)
    running_sum = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, 0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), 0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    target = tl.load(TARGETS + row)
    valid = (target >= 0) & (target < V)
    target_logit = tl.load(base + target, mask=valid, other=float("nan")).to(tl.float32)
    tl.store(LSE + row, lse)
    tl.store(LOSS + row, lse - target_logit)


@triton.jit
def _cross_entropy_backward_kernel(LOGITS, TARGETS, LSE, GRAD_LOSS, GRAD, N, V, stride_row, stride_grad_row,
                                   BLOCK: tl.constexpr):
    """One row's BLOCK columns: d(mean loss)/d logit = (softmax - one_hot(target)) * grad_loss / N."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < V
    x = tl.load(LOGITS + row * stride_row + cols, mask=mask).to(tl.float32)
    lse = tl.load(LSE + row)
    target = tl.load(TARGETS + row)
    scale = tl.load(GRAD_LOSS).to(tl.float32) / N
    grad = (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)) * scale
    tl.store(GRAD + row * stride_grad_row + cols, grad.to(GRAD.dtype.element_ty), mask=mask)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets):
        N, V = logits.shape
        loss = torch.empty(N, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(loss)
        block = min(BLOCK_V, triton.next_power_of_2(V))
        _cross_entropy_forward_kernel[(N,)](logits, targets, loss, lse, V, logits.stride(0), BLOCK=block,
                                            num_warps=8)
        ctx.save_for_backward(logits, targets, lse)
        return loss.mean()

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, lse = ctx.saved_tensors
        N, V = logits.shape
        grad = torch.empty((N, V), dtype=logits.dtype, device=logits.device)
        block = min(BLOCK_V, triton.next_power_of_2(V))
        _cross_entropy_backward_kernel[(N, triton.cdiv(V, block))](logits, targets, lse, grad_loss, grad, N, V,
                                                                    logits.stride(0), grad.stride(0), BLOCK=block,
                                                                    num_warps=8)
        return grad, None


def supports(logits: torch.Tensor, targets: torch.Tensor) -> bool:
    """logits (N, V) float16/bfloat16/float32 with unit last stride and N >= 1, targets (N,) integer, both on
    CUDA (or on CPU under TRITON_INTERPRET=1)."""
    on_device = runs_kernels(logits)
    return (on_device and logits.dim() == 2 and logits.shape[0] > 0 and logits.stride(-1) == 1
            and logits.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and targets.shape == logits.shape[:1] and targets.dtype in (torch.int32, torch.int64)
            and targets.device == logits.device)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (float32 scalar) of logits (N, V) against targets (N,); differentiable in logits."""
    if not supports(logits, targets):
        raise ValueError(f"cross_entropy kernel: unsupported logits {tuple(logits.shape)} {logits.dtype} on "
                         f"{logits.device} with targets {tuple(targets.shape)} {targets.dtype} (see supports())")
    return _CrossEntropy.apply(logits, targets.contiguous())
