"""Rotary position embeddings (Su et al. 2021) with context-extension scaling: none | linear | ntk | yarn.

Layout: rotate-half (the two halves of each head are the pair), as in Llama and GPT-NeoX.
- linear: position interpolation, positions / s (Chen et al. 2023).
- ntk: "NTK-aware" base change, theta * s^(D / (D - 2)).
- yarn: NTK-by-parts (Peng et al. 2023): a dimension whose wavelength fits r = L_orig / lambda rotations
  into the original context keeps its frequency when r > beta_fast, is fully interpolated (freq / s) when
  r < beta_slow, and is blended linearly in between. The attention temperature sqrt(1/t) = 0.1 ln(s) + 1
  is folded into cos and sin, so both q and k carry it and the logits scale by (0.1 ln(s) + 1)^2.
"""

from __future__ import annotations

import math

import torch

from dist_moe.config import ModelConfig, head_dim


def base_inv_freq(dim: int, theta: float) -> torch.Tensor:
    """(dim/2,) angular frequencies theta^(-2i/dim) in float64."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def yarn_ramp(inv_freq: torch.Tensor, original_len: int, beta_fast: float, beta_slow: float) -> torch.Tensor:
    """Per dimension, 1 = keep the original frequency, 0 = interpolate fully, linear in rotations between."""
    rotations = original_len * inv_freq / (2 * math.pi)  # r = L_orig / wavelength
    return ((rotations - beta_slow) / (beta_fast - beta_slow)).clamp(0.0, 1.0)


def scaled_inv_freq(m: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq (D/2,) float64, attention scale folded into cos/sin) for the configured scaling."""
    dim, s = head_dim(m), m.rope_factor
    if m.rope_scaling == "none" or s == 1.0 and m.rope_scaling != "yarn":
        return base_inv_freq(dim, m.rope_theta), 1.0
    if m.rope_scaling == "linear":
        return base_inv_freq(dim, m.rope_theta) / s, 1.0
    if m.rope_scaling == "ntk":
        return base_inv_freq(dim, m.rope_theta * s ** (dim / (dim - 2))), 1.0
    inv_freq = base_inv_freq(dim, m.rope_theta)
    keep = yarn_ramp(inv_freq, m.rope_original_max_seq_len, m.yarn_beta_fast, m.yarn_beta_slow)
    blended = inv_freq / s * (1 - keep) + inv_freq * keep
    mscale = 0.1 * math.log(s) + 1.0 if s > 1 else 1.0
    return blended, mscale


def rope_cache(m: ModelConfig, seq_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (seq_len, D) in float32 (angles computed in float64), scale folded in."""
    inv_freq, scale = scaled_inv_freq(m)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)  # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, D): rotate-half pairs i and i + D/2
    return (angles.cos() * scale).float().to(device), (angles.sin() * scale).float().to(device)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """x (B, H, T, D) at positions offset..offset+T-1; computed in float32, returned in x's dtype. On CUDA
    through the one-pass Triton kernel (kernels/rope.py), which computes this same formula."""
    T = x.shape[-2]
    cos, sin = cos[offset:offset + T], sin[offset:offset + T]  # (T, D)
    if x.is_cuda:
        from dist_moe.kernels import rope as kernel

        if kernel.supports(x, cos, sin):
            return kernel.rope(x, cos, sin)
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
