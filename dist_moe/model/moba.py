"""MoBA: mixture of block attention (Lu et al. 2025), with FlashMoBA's key convolution (Xiao et al. 2025).

The keys are cut into blocks of `block_size`. A parameter-free gate scores every *past, complete* block for
each query by q . mean(K_block) and keeps the top_k best; the query then attends, causally, to those blocks
plus its own (current) block. The gate runs per query head (each of a KV group's query heads picks its own
blocks, as in MoBA's reference; docs/moba.md says why) on the post-RoPE keys, which is what the reference's
attention function receives. The PyTorch path here is dense attention under the MoBA mask, the reference that
kernels/moba.py must equal; on CUDA the seam takes the kernels.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn


_notified: set[tuple] = set()


def select_blocks(q: torch.Tensor, k: torch.Tensor, block_size: int, top_k: int) -> torch.Tensor:
    """(B, Hq, Tq, top_k) int64: the past blocks each query attends to besides its own, best first; -1 where
    fewer than top_k past blocks exist. q (B, Hq, Tq, D) are the last Tq of k's (B, Hkv, Tk, D) positions.
    Scores are computed in at least float32."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    num_blocks = Tk // block_size  # complete blocks; a ragged tail block is never a past block
    own = torch.arange(Tk - Tq, Tk, device=q.device) // block_size  # (Tq,) each query's own block
    chosen = torch.full((B, Hq, Tq, top_k), -1, dtype=torch.long, device=q.device)
    if num_blocks == 0:
        return chosen
    dtype = torch.promote_types(q.dtype, torch.float32)
    means = k[:, :, :num_blocks * block_size].to(dtype).view(B, Hkv, num_blocks, block_size, D).mean(3)
    means = means.repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, NB, D)
    scores = q.to(dtype) @ means.transpose(-1, -2)  # (B, Hq, Tq, NB)
    past = torch.arange(num_blocks, device=q.device)[None, :] < own[:, None]  # (Tq, NB)
    scores = scores.masked_fill(~past, float("-inf"))
    kept = min(top_k, num_blocks)
    best, index = scores.topk(kept, dim=-1)  # (B, Hq, Tq, kept)
    chosen[..., :kept] = index.masked_fill(best == float("-inf"), -1)
    return chosen


def moba_mask(chosen: torch.Tensor, Tk: int, block_size: int) -> torch.Tensor:
    """(B, Hq, Tq, Tk) bool: query i sees key j if j's block was chosen, or j is in i's block and j <= i."""
    B, Hq, Tq, _ = chosen.shape
    device = chosen.device
    num_blocks = -(-Tk // block_size)
    picked = torch.zeros(B, Hq, Tq, num_blocks + 1, dtype=torch.bool, device=device)  # column 0 takes the -1s
    picked.scatter_(-1, chosen + 1, True)
    key_block = torch.arange(Tk, device=device) // block_size  # (Tk,)
    mask = picked[..., 1:][..., key_block]  # (B, Hq, Tq, Tk)
    i = torch.arange(Tk - Tq, Tk, device=device)[:, None]
    j = torch.arange(Tk, device=device)[None, :]
    return mask | ((key_block[None, :] == i // block_size) & (j <= i))


def moba_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, top_k: int,
                             chosen: torch.Tensor | None = None) -> torch.Tensor:
    """Dense softmax attention under the MoBA mask; q (B, Hq, Tq, D) are the last Tq positions of k, v
    (B, Hkv, Tk, D). `chosen` overrides the gate (the kernel tests feed both paths the same blocks)."""
    if chosen is None:
        chosen = select_blocks(q, k, block_size, top_k)
    mask = moba_mask(chosen, k.shape[2], block_size)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def moba_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, top_k: int) -> torch.Tensor:
    """The Triton kernels (gate, sparse forward and backward) on CUDA for a full sequence; the reference
    otherwise (CPU, and decoding against a KV cache, where Tq < Tk)."""
    if q.is_cuda and q.shape[2] == k.shape[2]:
        from dist_moe.kernels import moba as kernel

        if kernel.supports(q, k, v, block_size):
            return kernel.moba_attention(q, k, v, block_size, top_k)
        key = (q.shape[-1], q.dtype)
        if key not in _notified:
            _notified.add(key)
            warnings.warn(f"MoBA kernels do not support head_dim={q.shape[-1]} {q.dtype}; using the dense-masked "
                          "reference (memory grows with N^2)")
    return moba_attention_reference(q, k, v, block_size, top_k)


class KeyConv(nn.Module):
    """Causal depthwise convolution over positions on each key channel (FlashMoBA's kconv), so that a
    block's mean key carries some of its neighbours' context. Starts as the identity (last tap 1)."""

    def __init__(self, channels: int, taps: int):
        super().__init__()
        self.taps = taps
        self.weight = nn.Parameter(torch.zeros(channels, 1, taps))
        with torch.no_grad():
            self.weight[:, 0, -1] = 1.0

    def forward(self, k: torch.Tensor, past: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """k (B, T, C) pre-RoPE keys -> (convolved keys (B, T, C), the last taps - 1 input keys for the next
        call). `past` holds those from a previous call when decoding; zeros (causal padding) otherwise."""
        B, T, C = k.shape
        if past is None:
            past = k.new_zeros(B, self.taps - 1, C)
        x = torch.cat([past, k], dim=1)  # (B, taps - 1 + T, C)
        y = F.conv1d(x.transpose(1, 2), self.weight.to(k.dtype), groups=C).transpose(1, 2)  # (B, T, C)
        return y, x[:, x.shape[1] - (self.taps - 1):]
