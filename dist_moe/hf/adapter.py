"""Which transformers architecture represents a dist_moe config exactly, and weight names ours <-> theirs.

Choice per config (docs/export.md has the table):
- Mixtral (`MixtralForCausalLM`): every layer MoE, no shared expert, top-k >= 2 with renormalised weights
  (Mixtral always renormalises), optional sliding window on every layer.
- Qwen2-MoE (`Qwen2MoeForCausalLM`) otherwise: dense layers between MoE layers (decoder_sparse_step =
  moe.moe_every), top-1 or un-normalised weights (norm_topk_prob off keeps the raw probability, as ours at
  k=1), a shared expert. Qwen2-MoE always has a shared expert behind a sigmoid gate: the gate is written as
  zeros (sigmoid(0) = 1/2) with the shared expert's down projection doubled, which is exact in every
  float format; without a shared expert it is one hidden unit of zeros. q/k/v have no bias (qkv_bias off).
Refused, with one line naming the key: moe.moe_every=0 (a dense model) and model.rope_scaling=ntk
(transformers' `dynamic` rescales with the sequence length: another model).

Names: "checkpoint" state dicts use the names DeepSpeed's files hold (the dense model file plus per-expert
`...deepspeed_moe.experts.deepspeed_experts.{global id}.w{1,2,3}.weight`); "module" state dicts are what
our plain modules load (`ffn.router.weight`, stacked `ffn.experts.w13` (E, D, 2F) and `ffn.experts.w2`
(E, F, D)). transformers' names are its per-expert checkpoint layout, which every 4.x/5.x version reads.
"""

from __future__ import annotations

import re

import torch

from dist_moe.config import Config, ConfigError, expert_width, head_dim, is_moe_layer

ATTENTION = {"attn_norm.weight": "input_layernorm.weight", "attn.wq.weight": "self_attn.q_proj.weight",
             "attn.wk.weight": "self_attn.k_proj.weight", "attn.wv.weight": "self_attn.v_proj.weight",
             "attn.wo.weight": "self_attn.o_proj.weight", "ffn_norm.weight": "post_attention_layernorm.weight"}
SWIGLU = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}  # ours (Shazeer's names) -> Llama's
TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
       "lm_head.weight": "lm_head.weight"}
EXPERT_KEY = re.compile(r"blocks\.(\d+)\.ffn\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(w[123])\.weight")
GATE_KEY = "deepspeed_moe.gate.wg.weight"


def architecture(cfg: Config) -> str:
    """transformers' model_type that represents cfg exactly; ConfigError naming the key when none does."""
    m, moe = cfg.model, cfg.moe
    if moe.moe_every == 0:
        raise ConfigError("config key 'moe.moe_every' = 0: a dense model; export writes transformers' MoE "
                          "architectures (Mixtral, Qwen2-MoE)")
    if m.rope_scaling == "ntk":
        raise ConfigError("config key 'model.rope_scaling' = 'ntk': transformers has no static NTK-aware scaling "
                          "(its 'dynamic' rescales with the sequence length); expected none | linear | yarn")
    mixtral = moe.moe_every == 1 and not moe.shared_expert and moe.top_k >= 2 and moe.normalize_weights
    return "mixtral" if mixtral else "qwen2_moe"


def _rope_parameters(cfg: Config) -> dict:
    m = cfg.model
    rope: dict = {"rope_type": "default", "rope_theta": m.rope_theta}
    if m.rope_scaling == "linear":
        rope.update(rope_type="linear", factor=m.rope_factor)
    elif m.rope_scaling == "yarn":
        rope.update(rope_type="yarn", factor=m.rope_factor, beta_fast=m.rope_beta_fast, beta_slow=m.rope_beta_slow,
                    original_max_position_embeddings=m.rope_original_max_position_embeddings,
                    truncate=m.rope_truncate)
        optional = {"attention_factor": m.rope_attention_factor, "mscale": m.rope_mscale,
                    "mscale_all_dim": m.rope_mscale_all_dim}
        rope.update({k: v for k, v in optional.items() if v})
    return rope


def hf_config(cfg: Config, eos_id: int, dtype: torch.dtype):
    """The transformers config object for cfg (architecture() picks the class)."""
    from dist_moe.hf import require_transformers

    transformers = require_transformers()
    m, moe, kind = cfg.model, cfg.moe, architecture(cfg)
    common = dict(vocab_size=m.vocab_size, hidden_size=m.d_model, num_hidden_layers=m.num_layers,
                  num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads, head_dim=head_dim(m),
                  hidden_act="silu", max_position_embeddings=m.max_seq_len, initializer_range=m.init_std,
                  rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings, rope_parameters=_rope_parameters(cfg),
                  bos_token_id=None, eos_token_id=eos_id, pad_token_id=None, num_experts_per_tok=moe.top_k,
                  dtype=str(dtype).removeprefix("torch."), architectures=[ARCHITECTURES[kind]])
    if kind == "mixtral":
        return transformers.MixtralConfig(**common, intermediate_size=expert_width(cfg), num_local_experts=moe.num_experts,
                                          sliding_window=m.attention_window or None, router_jitter_noise=0.0)
    window = m.attention_window > 0
    return transformers.Qwen2MoeConfig(
        **common, intermediate_size=m.d_ff, moe_intermediate_size=expert_width(cfg), num_experts=moe.num_experts,
        shared_expert_intermediate_size=expert_width(cfg) if moe.shared_expert else 1,
        decoder_sparse_step=moe.moe_every, mlp_only_layers=[], norm_topk_prob=moe.normalize_weights and moe.top_k > 1,
        qkv_bias=False, use_sliding_window=window, sliding_window=m.attention_window or None,
        max_window_layers=m.num_layers if window else 0,
        layer_types=["sliding_attention" if window else "full_attention"] * m.num_layers)


ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}


def checkpoint_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module names (a whole model's stacked experts, in one process) -> checkpoint names; others unchanged."""
    out = {}
    for key, value in state.items():
        prefix, _, name = key.rpartition("ffn.")
        if name == "router.weight":
            out[f"{prefix}ffn.{GATE_KEY}"] = value
        elif name in ("experts.w13", "experts.w2"):
            stacks = dict(zip(("w1", "w3"), value.chunk(2, dim=2))) if name == "experts.w13" else {"w2": value}
            for w, stacked in stacks.items():  # (E, in, out) -> nn.Linear's (out, in) per expert
                out.update({f"{prefix}ffn.deepspeed_moe.experts.deepspeed_experts.{e}.{w}.weight": stacked[e].t()
                            for e in range(stacked.shape[0])})
        elif name != "router.noise_weight":
            out[key] = value
    return out


def _moe_names(kind: str, layer: int) -> tuple[str, str, callable]:
    """(router key, shared-expert prefix, expert key(e, ours w1|w2|w3)) of an MoE layer in transformers' names."""
    prefix = f"model.layers.{layer}."
    if kind == "mixtral":
        return prefix + "block_sparse_moe.gate.weight", "", lambda e, w: f"{prefix}block_sparse_moe.experts.{e}.{w}.weight"
    return (prefix + "mlp.gate.weight", prefix + "mlp.shared_expert.",
            lambda e, w: f"{prefix}mlp.experts.{e}.{SWIGLU[w]}.weight")


def checkpoint_to_hf(state: dict[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    """Our checkpoint names (dense file + every global expert) -> transformers' names, exactly representing."""
    kind, m = architecture(cfg), cfg.model
    state = checkpoint_names(state)
    out = {TOP[k]: v for k, v in state.items() if k in TOP and not (k == "lm_head.weight" and m.tie_embeddings)}
    for i in range(m.num_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        out.update({theirs + hf: state[ours + name] for name, hf in ATTENTION.items()})
        if not is_moe_layer(cfg, i):
            out.update({f"{theirs}mlp.{hf}.weight": state[f"{ours}ffn.{w}.weight"] for w, hf in SWIGLU.items()})
            continue
        router, shared, expert = _moe_names(kind, i)
        out[router] = state[f"{ours}ffn.{GATE_KEY}"]
        for key, value in state.items():
            match = EXPERT_KEY.fullmatch(key)
            if match and int(match[1]) == i:
                out[expert(int(match[2]), match[3])] = value
        if kind == "qwen2_moe":
            _shared_to_qwen2(out, state, ours, shared, cfg)
    return out


def _shared_to_qwen2(out: dict, state: dict, ours: str, shared: str, cfg: Config) -> None:
    """Qwen2-MoE's gated shared expert: gate zeros (x 1/2), down doubled; one zero unit when we have none."""
    d_model, like = cfg.model.d_model, state[f"{ours}ffn_norm.weight"]
    out[shared.replace("shared_expert.", "shared_expert_gate.weight")] = like.new_zeros(1, d_model)
    for w, hf in SWIGLU.items():
        if cfg.moe.shared_expert:
            weight = state[f"{ours}ffn.shared_mlp.{w}.weight"]
            out[f"{shared}{hf}.weight"] = weight * 2 if w == "w2" else weight
        else:
            out[f"{shared}{hf}.weight"] = like.new_zeros((d_model, 1) if w == "w2" else (1, d_model))
