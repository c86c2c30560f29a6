"""Import and upcycling: checkpoints made by transformers itself from a random init (nothing downloaded).

init.from_hf: our model with the folder's shape and weights gives transformers' logits (1e-4, float32,
dropless) and greedy tokens, for the per-expert layout every version reads and transformers 5's own names
(fused experts; Mixtral's MoE under `mlp.`). `generate --from-hf` samples transformers' greedy text from a
model shorter than the training default. A malformed folder is a one-line error naming what is wrong.
init.upcycle_from: a dense Llama or Qwen3 becomes our MoE whose loss at step 0 equals the dense model's.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dist_moe.config import ConfigError, load_config
from dist_moe.hf import load
from dist_moe.model.transformer import Transformer, generate

transformers = pytest.importorskip("transformers")

SHAPE = dict(vocab_size=80, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, rms_norm_eps=1e-6, initializer_range=0.2)


def save_random(config, path, edit=None, original_format=True):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    for name, p in model.named_parameters():  # norms away from 1, so a mix-up shows
        if name.endswith("norm.weight"):
            p.data.uniform_(0.5, 1.5)
    if edit:
        edit(model)
    model.save_pretrained(path, save_original_format=original_format)
    return model


def ours_from(key: str, path, overrides=()) -> Transformer:
    cfg = load_config("tiny", [f"init.{key}={path}", "moe.dropless=true", "data.seq_len=64", *overrides])
    cfg = load.apply_init_config(cfg)
    torch.manual_seed(1)
    model = Transformer(cfg).eval()
    load.load_init_weights(model, cfg)
    return model


def zero_shared_gate(model):
    for layer in model.model.layers:
        if hasattr(layer.mlp, "shared_expert_gate"):
            layer.mlp.shared_expert_gate.weight.data.zero_()


CASES = {
    "mixtral_top2_sliding": (transformers.MixtralConfig, dict(intermediate_size=48, num_local_experts=4,
                                                             num_experts_per_tok=2, sliding_window=8), None),
    "qwen2_moe_shared_moe_every_2_yarn": (
        transformers.Qwen2MoeConfig,
        dict(num_hidden_layers=4, intermediate_size=40, moe_intermediate_size=24, shared_expert_intermediate_size=24,
             num_experts=4, num_experts_per_tok=3, norm_topk_prob=True, decoder_sparse_step=2, qkv_bias=False,
             rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                              "original_max_position_embeddings": 16}), zero_shared_gate),
    "qwen3_moe_qk_norm_moe_every_2_sliding_head_dim_16": (
        transformers.Qwen3MoeConfig,
        dict(num_hidden_layers=4, intermediate_size=40, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
             norm_topk_prob=True, decoder_sparse_step=2, head_dim=16, use_sliding_window=True, sliding_window=8),
        None),
}


@pytest.mark.parametrize("original_format", [True, False], ids=["per_expert", "transformers5_names"])
@pytest.mark.parametrize("case", CASES)
def test_imported_model_gives_transformers_logits(case, original_format, tmp_path):
    config_class, shape, edit = CASES[case]
    hf = save_random(config_class(**{**SHAPE, **shape}), tmp_path, edit, original_format)
    fused = any(k.endswith("experts.gate_up_proj") for k in load.read_weights(tmp_path))
    assert fused == (not original_format)
    ours = ours_from("from_hf", tmp_path)
    assert ours.cfg.moe.shared_expert == (edit is not None)
    assert ours.cfg.model.qk_norm == (config_class is transformers.Qwen3MoeConfig)
    tokens = torch.randint(0, 80, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = hf(tokens).logits, ours(tokens).logits
    assert expected.abs().max() > 1.0
    assert (got - expected).abs().max() < 1e-4
    prompt = tokens[:1, :8]  # and 32 greedy tokens the same ids
    theirs = hf.generate(prompt, max_new_tokens=32, do_sample=False, top_k=None, temperature=None, eos_token_id=None)
    assert theirs.tolist() == generate(ours, prompt, 32, temperature=0).tolist()


def test_gated_shared_expert_is_refused_naming_the_weight(tmp_path):
    save_random(transformers.Qwen2MoeConfig(**SHAPE, intermediate_size=40, moe_intermediate_size=24,
                                            shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                                            qkv_bias=False), tmp_path)
    with pytest.raises(ConfigError, match="shared_expert_gate.weight is not zero"):
        ours_from("from_hf", tmp_path)


@pytest.mark.parametrize("config_class", [transformers.LlamaConfig, transformers.Qwen3Config])
def test_upcycled_moe_starts_at_the_dense_models_loss(config_class, tmp_path):
    dense = save_random(config_class(**SHAPE, intermediate_size=48, head_dim=8), tmp_path)
    ours = ours_from("upcycle_from", tmp_path, ["moe.num_experts=4", "moe.top_k=2"])
    assert ours.cfg.model.qk_norm == (config_class is transformers.Qwen3Config)
    block = ours.blocks[0].ffn
    assert block.experts.w13.shape == (4, 32, 96) and torch.equal(block.experts.w13[0], block.experts.w13[3])
    std = block.router.weight.std().item()  # the router: random at the init scale (initializer_range)
    assert 0.5 * ours.cfg.model.init_std < std < 1.5 * ours.cfg.model.init_std
    tokens = torch.randint(0, 80, (4, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dense_loss = F.cross_entropy(dense(tokens).logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        moe_out = ours(tokens)
        moe_loss = F.cross_entropy(moe_out.logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    assert moe_out.aux_loss > 0  # the routers do route
    assert abs(moe_loss.item() - dense_loss.item()) < 1e-5


def test_upcycling_at_top1_is_refused(tmp_path):
    save_random(transformers.LlamaConfig(**SHAPE, intermediate_size=48), tmp_path)
    with pytest.raises(ConfigError, match="moe.top_k"):
        ours_from("upcycle_from", tmp_path, ["moe.top_k=1"])


def save_char_tokenizer(path):
    """A character-level tokenizer for the folder (its ids cover the model's 80)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    chars = "abcdefghijklmnopqrstuvwxyz0123456789 ():=+-*/,.\n"
    tokenizer = Tokenizer(models.WordLevel({**{c: i for i, c in enumerate(chars)}, "<eos>": 79}, unk_token="<eos>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>").save_pretrained(path)
    return transformers.AutoTokenizer.from_pretrained(path)


def test_generate_from_hf_takes_a_model_shorter_than_the_training_default(tmp_path):
    config_class, shape, _ = CASES["mixtral_top2_sliding"]
    hf = save_random(config_class(**{**SHAPE, **shape}), tmp_path, original_format=False)  # 64 positions
    tokenizer = save_char_tokenizer(tmp_path)
    text = load.generate_from_hf(tmp_path, "def f(x):", max_new_tokens=16, temperature=0, top_k=0, seed=0)
    ids = tokenizer("def f(x):", return_tensors="pt", add_special_tokens=False).input_ids
    theirs = hf.generate(ids, max_new_tokens=16, do_sample=False, top_k=None, temperature=None, eos_token_id=None)
    assert text == tokenizer.decode(theirs[0])


def mixtral_folder(path, original_format=True):
    config_class, shape, _ = CASES["mixtral_top2_sliding"]
    save_random(config_class(**{**SHAPE, **shape}), path, original_format=original_format)
    return path


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))


def drop_weight(path, name):
    from safetensors.torch import load_file, save_file

    state = load_file(str(path / "model.safetensors"))
    del state[name]
    save_file(state, str(path / "model.safetensors"))


MALFORMED = {
    "missing_config_key": (True, lambda p: edit_config(p, hidden_size=None), "no key 'hidden_size'"),
    "config_not_json": (True, lambda p: (p / "config.json").write_text("{not json"), "not JSON"),
    "missing_router": (False, lambda p: drop_weight(p, "model.layers.1.mlp.gate.weight"),
                       "no weight 'model.layers.1.mlp.gate.weight'"),
    "missing_expert": (True, lambda p: drop_weight(p, "model.layers.0.block_sparse_moe.experts.3.w2.weight"),
                       "no weight 'model.layers.0.block_sparse_moe.experts.3.w2.weight'"),
    "fused_experts_of_another_count": (False, lambda p: edit_config(p, num_local_experts=3), "gate_up_proj (4, 96, 32)"),
    "weights_of_another_width": (True, lambda p: edit_config(p, intermediate_size=40), "config.json makes it"),
    "torn_safetensors": (True, lambda p: (p / "model.safetensors").write_bytes(b"\x08\x00"),
                         "not a readable safetensors file"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_folder_is_a_one_line_error(case, tmp_path):
    original_format, damage, expected = MALFORMED[case]
    damage(mixtral_folder(tmp_path, original_format))
    with pytest.raises(ConfigError) as refused:
        ours_from("from_hf", tmp_path)
    assert expected in str(refused.value) and "\n" not in str(refused.value)


def test_generate_from_hf_on_a_malformed_folder_says_one_line(tmp_path):
    drop_weight(mixtral_folder(tmp_path, original_format=False), "model.layers.1.mlp.gate.weight")
    save_char_tokenizer(tmp_path)
    done = subprocess.run([sys.executable, "-m", "dist_moe.cli", "generate", "--from-hf", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no weight 'model.layers.1.mlp.gate.weight'" in errors[0]
