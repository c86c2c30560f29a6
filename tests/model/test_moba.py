"""MoBA in the model (dist_moe/model/moba.py and its seam in attention.py): the gate and mask against a
per-query loop in float64, the key convolution against an explicit sum, KV-cache decoding against the
full-sequence forward, and the config that selects it."""

import pytest
import torch

from dist_moe.config import ConfigError, load_config
from dist_moe.model.attention import KVCache
from dist_moe.model.moba import KeyConv, moba_attention_reference, select_blocks
from dist_moe.model.transformer import Transformer


def naive_moba(q, k, v, block_size, top_k):
    """Per query: mean key of each past complete block, the top_k by score, plus its own block up to itself."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                pos = i + Tk - Tq
                own = pos // block_size
                scores = {blk: (q[b, h, i] @ k[b, h, blk * block_size:(blk + 1) * block_size].mean(0)).item()
                          for blk in range(own)}
                picked = sorted(scores, key=scores.get, reverse=True)[:top_k]
                keys = [j for blk in picked for j in range(blk * block_size, (blk + 1) * block_size)]
                keys += list(range(own * block_size, pos + 1))
                weights = (k[b, h, keys] @ q[b, h, i] / D ** 0.5).softmax(0)
                out[b, h, i] = weights @ v[b, h, keys]
    return out


@pytest.mark.parametrize("num_heads, num_kv_heads, Tq", [(4, 2, 29), (2, 1, 3), (2, 2, 1)])  # full / decode
def test_moba_reference_equals_a_per_query_loop(num_heads, num_kv_heads, Tq):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, num_heads, Tq, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, num_kv_heads, 29, 8, generator=g, dtype=torch.float64) for _ in range(2))
    assert torch.allclose(moba_attention_reference(q, k, v, 4, 2), naive_moba(q, k, v, 4, 2), atol=1e-10)


def test_gate_never_picks_the_own_or_a_future_block_and_pads_with_minus_one():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 40, 8, generator=g), torch.randn(1, 1, 40, 8, generator=g)
    chosen = select_blocks(q, k, 8, 3)  # (1, 2, 40, 3)
    own = (torch.arange(40) // 8)[None, None, :, None]
    assert ((chosen < own) | (chosen == -1)).all()
    past = torch.arange(40) // 8  # queries of block b have b past blocks: min(b, 3) choices, the rest -1
    assert torch.equal((chosen >= 0).sum(-1)[0, 0], past.clamp(max=3))


def test_moba_with_every_block_chosen_is_full_causal_attention():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 50, 8, generator=g, dtype=torch.float64) for _ in range(3))
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(moba_attention_reference(q, k, v, 8, 7), full, atol=1e-12)
    assert not torch.allclose(moba_attention_reference(q, k, v, 8, 1), full, atol=1e-3)


def test_key_conv_is_a_causal_depthwise_sum_and_starts_as_the_identity():
    conv = KeyConv(channels=6, taps=3).double()
    k = torch.randn(2, 11, 6, dtype=torch.float64)
    assert torch.equal(conv(k)[0], k)
    torch.nn.init.normal_(conv.weight)
    w = conv.weight[:, 0]  # (C, taps); tap taps - 1 multiplies the current position
    want = sum(w[:, t] * torch.nn.functional.pad(k, (0, 0, 2 - t, 0))[:, :11] for t in range(3))
    got, tail = conv(k)
    assert torch.allclose(got, want, atol=1e-12) and torch.equal(tail, k[:, -2:])
    first, tail = conv(k[:, :4])  # in two calls, the second fed the first's tail, as in decoding
    assert torch.allclose(torch.cat([first, conv(k[:, 4:], tail)[0]], 1), want, atol=1e-12)


def _moba_model(key_conv: int) -> Transformer:
    cfg = load_config("tiny", ["model.vocab_size=61", "model.d_model=32", "model.num_heads=4", "model.num_kv_heads=2",
                               "model.max_seq_len=64", "data.seq_len=64", "moe.moe_every=0", "model.d_ff=32",
                               "model.attention=moba", "moba.block_size=16", "moba.top_k=1",
                               f"moba.key_conv={key_conv}", "moba.full_attention_last_layers=1"])
    torch.manual_seed(0)
    model = Transformer(cfg).double().eval()
    for block in model.blocks:
        if block.attn.key_conv is not None:
            torch.nn.init.normal_(block.attn.key_conv.weight)
    return model


def test_moba_kv_cache_decoding_equals_the_full_forward():
    model = _moba_model(key_conv=5)
    assert [b.attn.moba is not None for b in model.blocks] == [True, True, True, False]  # hybrid: last full
    tokens = torch.randint(0, 61, (2, 50))
    full = model(tokens).logits
    caches = [KVCache() for _ in model.blocks]  # a prefill ending mid-block, then decode steps across blocks
    steps = [model(tokens[:, :21], caches).logits] + [model(tokens[:, t:t + 1], caches).logits for t in range(21, 50)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-10)


@pytest.mark.parametrize("overrides, key, expected", [
    (["model.attention=sparse"], "model.attention", "full | moba"),
    (["model.attention=moba", "moba.key_conv=4"], "moba.key_conv", "0 (off), 3 or 5"),
    (["model.attention=moba", "moba.block_size=100"], "moba.block_size", "multiple of 16"),
    (["model.attention=moba", "moba.top_k=0"], "moba.top_k", "positive"),
    (["model.attention=moba", "moba.full_attention_last_layers=5"], "moba.full_attention_last_layers", "num_layers=4"),
])
def test_bad_moba_config_is_one_line_naming_the_key(overrides, key, expected):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", overrides)
    assert f"'{key}'" in str(info.value) and expected in str(info.value)


def test_small_at_32k_tokens_validates_and_builds():
    """The issue's long-context run: its config must load and its model build (training it needs a GPU)."""
    cfg = load_config("small", ["model.attention=moba", "data.seq_len=32768", "model.max_seq_len=32768",
                                "model.vocab_size=16384"])
    model = Transformer(cfg)
    assert model.rope_cos.shape[0] == 32768 and all(b.attn.moba is cfg.moba for b in model.blocks)


def test_hf_export_refuses_a_moba_model():
    """transformers would run full attention on MoBA weights: export must say so, not write a different model."""
    from dist_moe.hf.adapter import architecture

    with pytest.raises(ConfigError, match="'model.attention' = 'moba'"):
        architecture(load_config("tiny", ["model.attention=moba"]))
