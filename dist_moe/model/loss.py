"""The language-model loss: mean token cross-entropy, in float32 whatever the logits' dtype, and the MoE
router losses every objective adds to its own."""

import torch
import torch.nn.functional as F

from dist_moe.config import MoEConfig
from dist_moe.model.transformer import ModelOutput


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits (..., V) and targets (...) -> the mean cross-entropy, a float32 scalar. On CUDA through the Triton
    kernel (kernels/cross_entropy.py), which computes this same function without float32 copies of the logits."""
    logits, targets = logits.flatten(0, -2), targets.flatten()
    if logits.is_cuda:
        from dist_moe.kernels import cross_entropy as kernel

        if kernel.supports(logits, targets):
            return kernel.cross_entropy(logits, targets)
    return F.cross_entropy(logits.float(), targets)


def with_router_losses(moe: MoEConfig, loss: torch.Tensor, out: ModelOutput) -> tuple[torch.Tensor, dict]:
    """loss + the weighted MoE load-balancing and z losses, and the three for logging."""
    total = loss + moe.aux_loss_coef * out.aux_loss + moe.z_loss_coef * out.z_loss
    return total, {"loss": loss.detach(), "aux_loss": out.aux_loss.detach(), "z_loss": out.z_loss.detach()}
