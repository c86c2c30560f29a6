"""Grouped-query attention (Ainslie et al. 2023) and the one seam every attention call goes through.

`attention(q, k, v)` uses dist_moe's Triton flash kernel (kernels/flash_attention.py; its forward is a Gluon
kernel on Hopper at D = 128) on CUDA when it supports the shape, and PyTorch SDPA otherwise; K/V are never
repeated in memory on either path.
MHA (num_kv_heads = num_heads) and MQA (num_kv_heads = 1) are the two ends of GQA. A layer built with a
MoBAConfig attends through MoBA instead (model/moba.py: block-sparse, chosen per query by a gate).
With model.qk_norm each head's q and k get an RMSNorm over head_dim right before RoPE, as in Qwen3, so the
cache, the kernel and MoBA all see normalised keys.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from dist_moe.config import MoBAConfig, ModelConfig, head_dim
from dist_moe.model.moba import KeyConv, moba_attention
from dist_moe.model.norm import RMSNorm
from dist_moe.model.rope import apply_rope

_notified: set[tuple] = set()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, window: int = 0) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v. q (B, Hq, Tq, D); k, v (B, Hkv, Tk, D), Hq % Hkv == 0.

    With Tq < Tk (decoding against a KV cache) the queries are the last Tq positions. window > 0 (needs
    causal) limits query i to keys i - window < j <= i (Mistral-style sliding window).
    """
    if window < 0 or (window > 0 and not causal):
        raise ValueError(f"attention window={window}: expected 0 (off) or a positive window with causal=True")
    if q.is_cuda and q.shape[2] == k.shape[2]:
        from dist_moe.kernels import flash_attention as flash

        if flash.supports(q, k, v):
            return flash.flash_attention(q, k, v, causal=causal, window=window)
        key = (q.shape[-1], q.dtype)
        if key not in _notified:
            _notified.add(key)
            warnings.warn(f"flash attention kernel does not support head_dim={q.shape[-1]} {q.dtype}; using SDPA")
    return sdpa_attention(q, k, v, causal, window)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: int) -> torch.Tensor:
    Tq, Tk = q.shape[2], k.shape[2]
    if window == 0 and (not causal or Tq == Tk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    i = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]  # absolute query positions
    j = torch.arange(Tk, device=q.device)[None, :]
    mask = j <= i
    if window > 0:
        mask &= j > i - window
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # mask (Tq, Tk)


class KVCache:
    """Keys and values seen so far by one attention layer, for incremental decoding."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.key_conv_input: torch.Tensor | None = None  # MoBA's key convolution: its last taps - 1 inputs

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)  # (B, Hkv, T_total, D)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class GroupedQueryAttention(nn.Module):
    """Full causal attention, or MoBA when given a MoBAConfig (the layers config.is_moba_layer names)."""

    def __init__(self, m: ModelConfig, moba: MoBAConfig | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = m.num_heads, m.num_kv_heads, head_dim(m)
        self.window = m.attention_window
        self.moba = moba
        self.wq = nn.Linear(m.d_model, m.num_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(m.d_model, m.num_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(m.d_model, m.num_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(m.num_heads * self.head_dim, m.d_model, bias=False)
        use_conv = moba is not None and moba.key_conv > 0
        self.key_conv = KeyConv(m.num_kv_heads * self.head_dim, moba.key_conv) if use_conv else None
        self.q_norm = RMSNorm(self.head_dim, m.norm_eps) if m.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, m.norm_eps) if m.qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.q_norm(self.wq(x).view(B, T, self.num_heads, self.head_dim)).transpose(1, 2)  # (B, Hq, T, D)
        k = self.wk(x)  # (B, T, Hkv * D)
        if self.key_conv is not None:
            k, tail = self.key_conv(k, cache.key_conv_input if cache is not None else None)
            if cache is not None:
                cache.key_conv_input = tail
        k = self.k_norm(k.view(B, T, self.num_kv_heads, self.head_dim)).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.wv(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        offset = cache.length if cache is not None else 0
        q, k = apply_rope(q, cos, sin, offset), apply_rope(k, cos, sin, offset)
        if cache is not None:
            k, v = cache.append(k, v)
        if self.moba is not None:
            y = moba_attention(q, k, v, self.moba.block_size, self.moba.top_k)  # (B, Hq, T, D)
        else:
            y = attention(q, k, v, causal=True, window=self.window)  # (B, Hq, T, D)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))
