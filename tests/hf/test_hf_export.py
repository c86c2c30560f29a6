"""Export parity: transformers' model of an exported folder equals ours (float32, dropless, CPU).

Each case builds a tiny random dist_moe model, writes it with the export code and loads it with
`AutoModelForCausalLM.from_pretrained`: logits equal to 1e-4 (max abs) and 32 greedy tokens the same ids.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dist_moe.config import Config, ConfigError, load_config
from dist_moe.hf import adapter
from dist_moe.hf.export import write_model
from dist_moe.model.transformer import Transformer, generate

transformers = pytest.importorskip("transformers")

BASE = ["model.vocab_size=96", "model.d_model=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        "model.d_ff=48", "model.max_seq_len=64", "data.seq_len=64", "moe.num_experts=4", "moe.top_k=2",
        "moe.d_expert=24", "moe.dropless=true", "model.init_std=0.15"]

CASES = {  # between them: top-1/2/3, MHA/GQA/MQA, shared expert, moe_every=2, sliding window, RoPE none/linear/YaRN,
    # per-head q/k norm
    "top2_gqa_sliding_window": (["model.attention_window=8"], "mixtral"),
    "top1_mqa_linear": (["moe.top_k=1", "model.num_kv_heads=1", "model.rope_scaling=linear", "model.rope_factor=2",
                         "model.tie_embeddings=false"], "qwen2_moe"),
    "top3_mha_yarn": (["moe.num_experts=6", "moe.top_k=3", "model.num_kv_heads=4", "model.rope_scaling=yarn",
                       "model.rope_factor=4", "model.rope_original_max_position_embeddings=16"], "mixtral"),
    "shared_expert_moe_every_2_sliding_yarn_mscale": (
        ["moe.shared_expert=true", "moe.moe_every=2", "model.num_layers=4", "model.head_dim=16",
         "moe.normalize_weights=false", "model.attention_window=8", "model.rope_scaling=yarn", "model.rope_factor=4",
         "model.rope_original_max_position_embeddings=16", "model.rope_mscale=0.8", "model.rope_mscale_all_dim=0.5",
         "model.rope_truncate=false"], "qwen2_moe"),
    "qk_norm_top2_moe_every_2_sliding_head_dim_16": (
        ["model.qk_norm=true", "moe.moe_every=2", "model.head_dim=16", "model.attention_window=8"], "qwen3_moe"),
    "qk_norm_top1_mqa_linear": (["model.qk_norm=true", "moe.top_k=1", "model.num_kv_heads=1",
                                 "model.rope_scaling=linear", "model.rope_factor=2"], "qwen3_moe"),
}


def tiny_model(overrides: list[str], seed: int = 0) -> tuple[Config, Transformer]:
    cfg = load_config("tiny", BASE + overrides)
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    for name, p in model.named_parameters():  # norms away from 1, so a mapping that mixes them up shows
        if name.endswith("norm.weight"):
            p.data.uniform_(0.5, 1.5)
    return cfg, model


@pytest.mark.parametrize("case", CASES)
def test_exported_model_equals_ours(case, tmp_path):
    overrides, architecture = CASES[case]
    cfg, model = tiny_model(overrides)
    assert adapter.architecture(cfg) == architecture
    write_model(adapter.to_hf(model.state_dict(), cfg), cfg, tmp_path, eos_id=1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == adapter.ARCHITECTURES[architecture]

    tokens = torch.randint(0, cfg.model.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens).logits, hf(tokens).logits
    assert ours.abs().max() > 1.0  # logits far from zero: a dropped layer would show
    assert (ours - theirs).abs().max() < 1e-4

    prompt = tokens[:1, :8]
    hf.generation_config.eos_token_id = None  # ours does not stop at EOS either
    expected = generate(model, prompt, 32, temperature=0)
    got = hf.generate(prompt, max_new_tokens=32, do_sample=False, top_k=None, temperature=None)
    assert got.tolist() == expected.tolist()


def test_sharded_above_the_size_limit(tmp_path):
    cfg, model = tiny_model([])
    write_model(adapter.to_hf(model.state_dict(), cfg), cfg, tmp_path, eos_id=1, max_shard_bytes=20_000)
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = torch.randint(0, cfg.model.vocab_size, (1, 16))
    with torch.no_grad():
        assert (model(tokens).logits - hf(tokens).logits).abs().max() < 1e-4


@pytest.mark.parametrize("overrides, key", [(["moe.moe_every=0"], "moe.moe_every"),
                                            (["model.rope_scaling=ntk"], "model.rope_scaling"),
                                            (["model.qk_norm=true", "moe.shared_expert=true"], "moe.shared_expert")])
def test_unrepresentable_config_is_refused_naming_the_key(overrides, key):
    cfg = load_config("tiny", BASE + overrides + ["model.rope_factor=2"])
    with pytest.raises(ConfigError, match=f"'{key}'") as info:
        adapter.architecture(cfg)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("overrides, key", [(["moe.score=sigmoid", "moe.noise=none"], "moe.score"),
                                            (["moe.routing=expert_choice", "moe.balance=none", "moe.dropless=false"], "moe.routing"),
                                            (["moe.balance=both", "moe.noise=jitter"], "moe.balance")])
def test_routing_transformers_cannot_run_is_refused_naming_the_key(overrides, key):
    cfg = load_config("tiny", BASE + overrides)
    with pytest.raises(ConfigError, match=f"'{key}'") as info:
        adapter.architecture(cfg)
    assert "\n" not in str(info.value)
