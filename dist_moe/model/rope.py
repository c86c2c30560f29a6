"""Rotary position embeddings (Su et al. 2021) with context-extension scaling: none | linear | ntk | yarn.

Layout: rotate-half (the two halves of each head are the pair), as in Llama and GPT-NeoX.
- linear: position interpolation, positions / s (Chen et al. 2023).
- ntk: "NTK-aware" base change, theta * s^(D / (D - 2)).
- yarn: NTK-by-parts (Peng et al. 2023) as transformers computes it (`_compute_yarn_parameters`, after the
  YaRN authors' code): the pair index d at which a frequency makes r rotations over the original context is
  d(r) = D ln(L_orig / (2 pi r)) / (2 ln theta); pairs below d(beta_fast) keep their frequency, pairs above
  d(beta_slow) are fully interpolated (freq / s), and between them the blend is linear in the pair index
  (the bounds floored/ceiled when truncate). The attention factor (0.1 ln(s) + 1, or the ratio of two
  mscales, or given) is folded into cos and sin, as transformers does.
"""

from __future__ import annotations

import math

import torch

from dist_moe.config import ModelConfig, head_dim


def base_inv_freq(dim: int, theta: float) -> torch.Tensor:
    """(dim/2,) angular frequencies theta^(-2i/dim) in float64."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def yarn_correction_range(m: ModelConfig) -> tuple[float, float]:
    """(low, high) pair indices of the blend band: where beta_fast and beta_slow rotations fit L_orig."""
    dim, theta, length = head_dim(m), m.rope_theta, m.rope_original_max_position_embeddings

    def pair_index(rotations: float) -> float:
        return dim * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_index(m.rope_beta_fast), pair_index(m.rope_beta_slow)
    if m.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def yarn_attention_factor(m: ModelConfig) -> float:
    """The cos/sin scale: given, or mscale(s, mscale) / mscale(s, mscale_all_dim), or 0.1 ln(s) + 1."""
    def mscale(scale: float, weight: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * weight * math.log(scale) + 1.0

    if m.rope_attention_factor:
        return m.rope_attention_factor
    if m.rope_mscale and m.rope_mscale_all_dim:
        return mscale(m.rope_factor, m.rope_mscale) / mscale(m.rope_factor, m.rope_mscale_all_dim)
    return mscale(m.rope_factor)


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
    low, high = yarn_correction_range(m)
    pair = torch.arange(dim // 2, dtype=torch.float64)
    span = high - low if high != low else 1e-3  # transformers' guard against a zero-width band
    interpolated = ((pair - low) / span).clamp(0.0, 1.0)  # 0 = keep the frequency, 1 = divide it by s
    return inv_freq / s * interpolated + inv_freq * (1 - interpolated), yarn_attention_factor(m)


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
