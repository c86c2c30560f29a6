import pytest
import torch

from dist_moe.config import load_config
from dist_moe.model.transformer import Transformer, generate, num_parameters
from dist_moe.train.deepspeed_moe import apply_deepspeed_moe


def tiny(*overrides):
    cfg = load_config("tiny", ["model.vocab_size=97", "model.d_model=32", "model.num_layers=2", "model.num_heads=4",
                               "model.num_kv_heads=2", "model.d_ff=48", "moe.num_experts=4", "moe.d_expert=40",
                               "moe.dropless=true", *overrides])
    return cfg


def test_logits_shape_and_losses():
    torch.manual_seed(0)
    model = Transformer(tiny())
    out = model(torch.randint(0, 97, (3, 11)))
    assert out.logits.shape == (3, 11, 97)
    assert out.aux_loss.item() > 0 and out.z_loss.item() > 0
    dense = Transformer(tiny("moe.moe_every=0"))(torch.randint(0, 97, (3, 11)))
    assert dense.aux_loss.item() == 0 and dense.z_loss.item() == 0


@pytest.mark.parametrize("moe_every", [0, 1])
def test_future_tokens_do_not_change_earlier_logits(moe_every):
    torch.manual_seed(0)
    model = Transformer(tiny(f"moe.moe_every={moe_every}")).eval()
    tokens = torch.randint(0, 97, (2, 16))
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 97
    a, b = model(tokens).logits, model(changed).logits
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_tied_embeddings_share_storage_and_backward_reaches_every_parameter():
    torch.manual_seed(0)
    model = Transformer(tiny())
    assert model.lm_head.weight is model.embed.weight
    out = model(torch.randint(0, 97, (2, 8)))
    (out.logits.logsumexp(-1).mean() + out.aux_loss + out.z_loss).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("impl", ["dist_moe", "deepspeed"])
@pytest.mark.parametrize("shared_expert", [False, True])
def test_parameter_counts_by_hand(impl, shared_expert):
    cfg = tiny("moe.moe_every=2", f"moe.impl={impl}", f"moe.shared_expert={shared_expert}")  # layer 1 is MoE
    model = apply_deepspeed_moe(Transformer(cfg), cfg)  # as the engine gets it: DeepSpeed's layer for impl=deepspeed
    d, V, hd, dff, f, E, k = 32, 97, 8, 48, 40, 4, cfg.moe.top_k
    attention = d * 4 * hd + 2 * d * 2 * hd + 4 * hd * d  # wq, wk, wv, wo
    norms = 2 * d * 2 + d
    dense_ffn = 3 * d * dff
    router = d * E
    shared = V * d + 2 * attention + norms + dense_ffn + router + shared_expert * 3 * d * f  # always active
    assert num_parameters(model) == (shared + E * 3 * d * f, shared + k * 3 * d * f)
    untied_cfg = tiny("moe.moe_every=2", f"moe.impl={impl}", f"moe.shared_expert={shared_expert}",
                      "model.tie_embeddings=false")
    untied = apply_deepspeed_moe(Transformer(untied_cfg), untied_cfg)
    assert num_parameters(untied)[0] == num_parameters(model)[0] + V * d


def test_generation_with_kv_cache_equals_full_recomputation():
    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    prompt = torch.randint(0, 97, (2, 5))
    fast = generate(model, prompt, max_new_tokens=6, temperature=0)
    tokens = prompt
    for _ in range(6):  # no cache: the whole sequence every step
        tokens = torch.cat([tokens, model(tokens).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(fast, tokens)
    sampled = generate(model, prompt, 4, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    assert sampled.shape == (2, 9) and torch.equal(sampled[:, :5], prompt)


def test_first_token_is_drawn_only_from_the_allowed_ids():
    """Token healing's constraint: greedy picks the best allowed id (by a full forward), sampling never leaves
    the set even when the allowed ids are the least likely, and later tokens are free again."""
    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    prompt = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        logits = model(prompt).logits[:, -1]  # (B, V)
    unlikely = logits[0].argsort()[:3]  # the three least likely ids for the first row
    greedy = generate(model, prompt, 3, temperature=0, first_allowed=unlikely)
    expected = unlikely[logits[:, unlikely].argmax(-1)]
    assert torch.equal(greedy[:, 5], expected)
    rest = torch.cat([prompt, greedy[:, 5:6]], dim=1)
    assert torch.equal(greedy, generate(model, rest, 2, temperature=0))  # the constraint ends after one token
    for seed in range(5):
        sampled = generate(model, prompt, 1, temperature=2.0, top_k=5, generator=torch.Generator().manual_seed(seed),
                           first_allowed=unlikely)
        assert torch.isin(sampled[:, 5], unlikely).all()


def test_sequence_longer_than_max_seq_len_is_refused():
    model = Transformer(tiny("model.max_seq_len=16", "data.seq_len=16"))
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model(torch.randint(0, 97, (1, 17)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_model_on_cuda_with_the_flash_kernel_matches_cpu():
    # head_dim 32: the kernel's path; no router noise (CPU and CUDA draw different numbers)
    cfg = tiny("model.d_model=128", "model.attention_window=6", "moe.noise=none")
    torch.manual_seed(0)
    model = Transformer(cfg)
    tokens = torch.randint(0, 97, (2, 16))
    expected = model(tokens)
    gpu = model.cuda()(tokens.cuda())
    torch.testing.assert_close(gpu.logits.cpu(), expected.logits, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(gpu.aux_loss.cpu(), expected.aux_loss, atol=1e-4, rtol=1e-4)
    (gpu.logits.logsumexp(-1).mean() + gpu.aux_loss).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x64 = x.double()
    return x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_and_its_gradients_match_a_float64_reference(dtype):
    from dist_moe.model.transformer import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(96, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(96))
    x = (3 * torch.randn(5, 7, 96)).to(dtype).requires_grad_()
    grad_out = torch.randn(5, 7, 96).to(dtype)
    y = norm(x)
    y.backward(grad_out)

    x64 = x.detach().double().requires_grad_()
    w64 = norm.weight.detach().double().requires_grad_()
    y64 = rms_norm_reference(x64, w64, 1e-5)
    y64.backward(grad_out.double())
    assert y.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]  # bf16: one rounding of a value of size ~1
    torch.testing.assert_close(y.double(), y64, rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(norm.weight.grad.double(), w64.grad, rtol=tol, atol=tol * 10)  # a sum of 35 terms
