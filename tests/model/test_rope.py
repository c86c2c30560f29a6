import math

import numpy as np
import pytest
import torch

from dist_moe.config import ModelConfig
from dist_moe.model.rope import apply_rope, base_inv_freq, rope_cache, scaled_inv_freq


def model_config(**kw) -> ModelConfig:
    return ModelConfig(d_model=64, num_heads=2, num_kv_heads=1, max_seq_len=256, rope_original_max_position_embeddings=64, **kw)


@pytest.mark.parametrize("scaling, factor", [("none", 1.0), ("linear", 4.0), ("ntk", 4.0), ("yarn", 4.0)])
def test_rotated_dot_product_depends_only_on_position_difference(scaling, factor):
    m = model_config(rope_scaling=scaling, rope_factor=factor)
    cos, sin = rope_cache(m, 256)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(32, generator=g, dtype=torch.float64), torch.randn(32, generator=g, dtype=torch.float64)

    def score(i: int, j: int) -> float:
        qi = apply_rope(q.float().view(1, 1, 1, 32).expand(1, 1, 256, 32), cos, sin)[0, 0, i]
        kj = apply_rope(k.float().view(1, 1, 1, 32).expand(1, 1, 256, 32), cos, sin)[0, 0, j]
        return float(qi @ kj)

    for delta in (0, 3, 17):
        values = [score(i + delta, i) for i in (0, 10, 100, 200)]
        assert max(values) - min(values) < 1e-4 * max(1.0, abs(values[0]))
    assert abs(score(5, 0) - score(0, 5)) > 1e-3  # and it does depend on the difference


def test_plain_rope_matches_the_complex_rotation_formula():
    m = model_config()
    cos, sin = rope_cache(m, 16)
    x = torch.randn(1, 1, 16, 32, dtype=torch.float64)
    got = apply_rope(x.float(), cos, sin)[0, 0].double()
    theta = base_inv_freq(32, m.rope_theta)
    pos = torch.arange(16, dtype=torch.float64)[:, None]
    z = torch.complex(x[0, 0, :, :16], x[0, 0, :, 16:]) * torch.polar(torch.ones(16, 16, dtype=torch.float64), pos * theta)
    assert torch.allclose(got, torch.cat([z.real, z.imag], -1), atol=1e-5)


def test_yarn_at_scale_one_equals_plain_rope():
    plain, yarn = rope_cache(model_config(), 128), rope_cache(model_config(rope_scaling="yarn", rope_factor=1.0), 128)
    assert torch.equal(plain[0], yarn[0]) and torch.equal(plain[1], yarn[1])


def yarn_reference(dim: int, theta: float, s: float, length: int, fast: float, slow: float):
    """The YaRN authors' code (jquesnelle/yarn, scaled_rope/LlamaYaRNScaledRotaryEmbedding) in float64 numpy:
    correction range in dimension index, floored/ceiled, linear ramp mask over the dim/2 pairs."""
    def correction_dim(rotations):
        return (dim * math.log(length / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(fast)), 0)
    high = min(math.ceil(correction_dim(slow)), dim - 1)
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low if high != low else 0.001), 0, 1)
    extrapolation_mask = 1 - ramp
    pos_freqs = theta ** (np.arange(0, dim, 2) / dim)
    inv_freq = (1 / (s * pos_freqs)) * (1 - extrapolation_mask) + (1 / pos_freqs) * extrapolation_mask
    return inv_freq, 0.1 * math.log(s) + 1


@pytest.mark.parametrize("s, fast, slow", [(8.0, 32.0, 1.0), (4.0, 16.0, 2.0), (2.5, 32.0, 1.0)])
def test_yarn_frequencies_equal_the_reference_implementation(s, fast, slow):
    inv_freq, scale = scaled_inv_freq(model_config(rope_scaling="yarn", rope_factor=s, rope_beta_fast=fast,
                                                   rope_beta_slow=slow))
    expected, expected_scale = yarn_reference(32, 10000.0, s, 64, fast, slow)
    assert np.allclose(inv_freq.numpy(), expected, rtol=1e-12, atol=0)
    assert scale == pytest.approx(expected_scale, rel=1e-12)
    base = base_inv_freq(32, 10000.0).numpy()
    kept, divided = np.isclose(expected, base), np.isclose(expected, base / s)
    assert kept.any() and divided.any() and not (kept | divided).all()  # both ends and a blend band in between


@pytest.mark.parametrize("params", [
    dict(rope_factor=4.0),
    dict(rope_factor=8.0, rope_beta_fast=16.0, rope_beta_slow=2.0, rope_truncate=False),
    dict(rope_factor=4.0, rope_mscale=0.707, rope_mscale_all_dim=0.707),
    dict(rope_factor=4.0, rope_mscale=1.0, rope_mscale_all_dim=0.5),
    dict(rope_factor=4.0, rope_attention_factor=1.3),
])
def test_yarn_equals_transformers(params):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    m = model_config(rope_scaling="yarn", **params)
    names = {"rope_factor": "factor", "rope_beta_fast": "beta_fast", "rope_beta_slow": "beta_slow",
             "rope_truncate": "truncate", "rope_mscale": "mscale", "rope_mscale_all_dim": "mscale_all_dim",
             "rope_attention_factor": "attention_factor"}
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "original_max_position_embeddings": 64,
            **{names[k]: v for k, v in params.items()}}
    hf = transformers.LlamaConfig(hidden_size=64, num_attention_heads=2, max_position_embeddings=256,
                                  rope_parameters=rope)
    expected, expected_scale = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    inv_freq, scale = scaled_inv_freq(m)
    assert torch.allclose(inv_freq.float(), expected, rtol=1e-6, atol=0)
    assert scale == pytest.approx(expected_scale, rel=1e-6)


def test_yarn_temperature_scales_logits_by_mscale_squared():
    m = model_config(rope_scaling="yarn", rope_factor=4.0)
    cos, sin = rope_cache(m, 8)
    q = torch.randn(1, 1, 8, 32)
    rotated = apply_rope(q, cos, sin)
    mscale = 0.1 * math.log(4.0) + 1
    assert torch.allclose(rotated.norm(dim=-1), q.norm(dim=-1) * mscale, rtol=1e-5)


def test_linear_scaling_is_plain_rope_at_positions_over_s():
    s = 4.0
    inv_linear, _ = scaled_inv_freq(model_config(rope_scaling="linear", rope_factor=s))
    assert torch.allclose(inv_linear, base_inv_freq(32, 10000.0) / s)
    cos_lin, _ = rope_cache(model_config(rope_scaling="linear", rope_factor=s), 64)
    cos_plain, _ = rope_cache(model_config(), 64)
    assert torch.allclose(cos_lin[8], cos_plain[2], atol=1e-6)  # position 8 / 4 = 2


def test_ntk_changes_the_base():
    s = 4.0
    inv_ntk, _ = scaled_inv_freq(model_config(rope_scaling="ntk", rope_factor=s))
    assert torch.allclose(inv_ntk, base_inv_freq(32, 10000.0 * s ** (32 / 30)))
    assert inv_ntk[0] == 1.0 and inv_ntk[-1] < base_inv_freq(32, 10000.0)[-1]
