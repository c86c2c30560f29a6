"""The language-model loss: mean token cross-entropy, in float32 whatever the logits' dtype."""

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits (..., V) and targets (...) -> the mean cross-entropy, a float32 scalar. On CUDA through the Triton
    kernel (kernels/cross_entropy.py), which computes this same function without float32 copies of the logits."""
    logits, targets = logits.flatten(0, -2), targets.flatten()
    if logits.is_cuda:
        from dist_moe.kernels import cross_entropy as kernel

        if kernel.supports(logits, targets):
            return kernel.cross_entropy(logits, targets)
    return F.cross_entropy(logits.float(), targets)
