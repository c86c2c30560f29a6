"""FLOPs per token and model FLOPs utilisation (MFU), counted as in PaLM (Chowdhery et al. 2022, appendix B).

Training FLOPs per token = 6 * N_active + 12 * d_attn * sum over layers of the keys a query attends to: the
weight matmuls forward and backward, plus the attention score and value matmuls with causal attention counted
in full (the customary PaLM convention, so our MFU is comparable with published numbers). Full attention
attends to S keys; a sliding window to min(S, window); a MoBA layer to its top_k chosen blocks plus its own
block, min(S, (top_k + 1) * block_size), the own block counted in full as causal attention is.
"""

from __future__ import annotations

import torch

from dist_moe.config import Config, head_dim, is_moba_layer

# Dense bf16 peak (no sparsity), FLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12}


def attended_keys(cfg: Config, layer_index: int) -> int:
    """Keys one query of a full-length sequence attends to in this layer, causal counted in full."""
    seq_len = cfg.data.seq_len
    if is_moba_layer(cfg, layer_index):
        return min(seq_len, (cfg.moba.top_k + 1) * cfg.moba.block_size)
    if cfg.model.attention_window > 0:
        return min(seq_len, cfg.model.attention_window)
    return seq_len


def training_flops_per_token(cfg: Config, active_params: int) -> float:
    m = cfg.model
    d_attn = m.num_heads * head_dim(m)
    keys = sum(attended_keys(cfg, layer) for layer in range(m.num_layers))
    return 6.0 * active_params + 12.0 * d_attn * keys


def peak_flops(device: torch.device) -> float | None:
    """The GPU's dense bf16 peak, or None where MFU means nothing (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def mfu(flops_per_token: float, tokens_per_second_per_device: float, peak: float | None) -> float | None:
    return None if peak is None else flops_per_token * tokens_per_second_per_device / peak
