import pytest
import torch

from dist_moe.config import MoBAConfig, ModelConfig
from dist_moe.model.attention import GroupedQueryAttention, KVCache, attention
from dist_moe.model.moba import moba_attention_reference
from dist_moe.model.rope import apply_rope, rope_cache


def naive_attention(q, k, v, causal, window, offset=0):
    """Explicitly repeated K/V and a softmax loop, float64."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    Tq, Tk = q.shape[2], k.shape[2]
    out = torch.zeros_like(q)
    for i in range(Tq):
        pos = i + Tk - Tq
        visible = [j for j in range(Tk) if (not causal or j <= pos) and (window == 0 or j > pos - window)]
        scores = q[:, :, i:i + 1] @ k[:, :, visible].transpose(-1, -2) / q.shape[-1] ** 0.5
        out[:, :, i] = (scores.softmax(-1) @ v[:, :, visible])[:, :, 0]
    return out


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (8, 2), (4, 1)])  # MHA, GQA 4:1, MQA
@pytest.mark.parametrize("causal, window", [(True, 0), (False, 0), (True, 5)])
def test_attention_equals_naive_softmax_on_repeated_kv(num_heads, num_kv_heads, causal, window):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, num_heads, 19, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, num_kv_heads, 19, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, num_kv_heads, 19, 16, generator=g, dtype=torch.float64)
    assert torch.allclose(attention(q, k, v, causal, window), naive_attention(q, k, v, causal, window), atol=1e-10)


def test_queries_against_a_longer_cache_are_the_last_positions():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 3, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 10, 16, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, 10, 16, generator=g, dtype=torch.float64)
    for window in (0, 4):
        assert torch.allclose(attention(q, k, v, True, window), naive_attention(q, k, v, True, window), atol=1e-10)


def qk_norm_layer(m: ModelConfig, moba: MoBAConfig | None = None) -> GroupedQueryAttention:
    torch.manual_seed(4)
    layer = GroupedQueryAttention(m, moba).double()
    with torch.no_grad():
        layer.q_norm.weight.uniform_(0.5, 1.5)
        layer.k_norm.weight.uniform_(0.5, 1.5)
    return layer


@pytest.mark.parametrize("moba", [None, MoBAConfig(block_size=8, top_k=1, key_conv=3)])
def test_qk_norm_normalises_each_head_before_rope_as_a_float64_reference(moba):
    m = ModelConfig(d_model=64, num_heads=8, num_kv_heads=2, max_seq_len=40, qk_norm=True, norm_eps=1e-5)
    layer = qk_norm_layer(m, moba)
    cos, sin = (t.double() for t in rope_cache(m, 40))
    x = 3 * torch.randn(2, 40, 64, dtype=torch.float64)

    def head_rms_norm(y, heads, weight):  # (B, T, heads * D) -> (B, heads, T, D): y / rms(y) * weight per head
        y = y.view(2, 40, heads, 8)
        return (y / (y.pow(2).mean(-1, keepdim=True) + m.norm_eps).sqrt() * weight).transpose(1, 2)

    k = x @ layer.wk.weight.T
    if moba is not None:
        k = layer.key_conv(k)[0]
    q = apply_rope(head_rms_norm(x @ layer.wq.weight.T, 8, layer.q_norm.weight), cos, sin)
    k = apply_rope(head_rms_norm(k, 2, layer.k_norm.weight), cos, sin)
    v = (x @ layer.wv.weight.T).view(2, 40, 2, 8).transpose(1, 2)
    y = naive_attention(q, k, v, True, 0) if moba is None else moba_attention_reference(q, k, v, 8, 1)
    expected = y.transpose(1, 2).reshape(2, 40, 64) @ layer.wo.weight.T
    assert torch.allclose(layer(x, cos, sin), expected, atol=1e-10)


@pytest.mark.parametrize("window, qk_norm", [(0, False), (6, False), (6, True)])
def test_kv_cache_decoding_equals_the_full_forward(window, qk_norm):
    torch.manual_seed(3)
    m = ModelConfig(d_model=64, num_heads=8, num_kv_heads=2, max_seq_len=32, attention_window=window, qk_norm=qk_norm)
    layer = qk_norm_layer(m) if qk_norm else GroupedQueryAttention(m).double()
    cos, sin = rope_cache(m, 32)
    cos, sin = cos.double(), sin.double()
    x = torch.randn(2, 12, 64, dtype=torch.float64)
    full = layer(x, cos, sin)
    cache = KVCache()
    steps = [layer(x[:, :5], cos, sin, cache)] + [layer(x[:, t:t + 1], cos, sin, cache) for t in range(5, 12)]
    assert cache.length == 12
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-10)


def test_window_without_causal_is_refused():
    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match="window=3"):
        attention(q, q, q, causal=False, window=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("num_heads, num_kv_heads, window", [(8, 2, 0), (4, 1, 48)])
def test_cuda_seam_runs_the_flash_kernel_and_matches_the_naive_loop(num_heads, num_kv_heads, window):
    from dist_moe.kernels import flash_attention as flash

    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, h, 128, 64, generator=g, dtype=torch.float64)
               for h in (num_heads, num_kv_heads, num_kv_heads))
    qc, kc, vc = (t.to("cuda", torch.bfloat16) for t in (q, k, v))
    out = attention(qc, kc, vc, True, window)
    assert flash.supports(qc, kc, vc)
    assert torch.equal(out, flash.flash_attention(qc, kc, vc, causal=True, window=window))
    expected = naive_attention(*(t.double().cpu() for t in (qc, kc, vc)), True, window)
    assert (out.double().cpu() - expected).abs().max() < 2e-2
