"""Which transformers architecture represents a dist_moe config exactly, and weight names ours <-> theirs.

Choice per config (docs/export.md has the table):
- Mixtral (`MixtralForCausalLM`): every layer MoE, no shared expert, top-k >= 2 with renormalised weights
  (Mixtral always renormalises), optional sliding window on every layer.
- Qwen2-MoE (`Qwen2MoeForCausalLM`) otherwise: dense layers between MoE layers (decoder_sparse_step =
  moe.moe_every), top-1 or un-normalised weights (norm_topk_prob off keeps the raw probability, as ours at
  k=1), a shared expert. Qwen2-MoE always has a shared expert behind a sigmoid gate: the gate is written as
  zeros (sigmoid(0) = 1/2) with the shared expert's down projection doubled, which is exact in every
  float format; without a shared expert it is one hidden unit of zeros. q/k/v have no bias (qkv_bias off).
- Qwen3-MoE (`Qwen3MoeForCausalLM`) whenever model.qk_norm is on: the one MoE class with per-head q/k
  RMSNorm; otherwise Qwen2-MoE's layout (decoder_sparse_step, norm_topk_prob) without a shared expert.
Refused, with one line naming the key: moe.moe_every=0 (a dense model), model.rope_scaling=ntk
(transformers' `dynamic` rescales with the sequence length: another model), and a shared expert with
model.qk_norm (Qwen3-MoE has none).

Names (as torchtitan's state_dict_adapter): ours are the plain Transformer's own state dict with every expert
(moe.ep_size=1): `ffn.router.weight`, stacked `ffn.experts.w13` (E, D, 2F, model/moe/experts.py's layout)
and `ffn.experts.w2` (E, F, D). transformers' names are its per-expert checkpoint layout, which every 4.x/5.x
version reads; import also takes transformers 5's own names (fused experts; Mixtral's MoE under `mlp.`).
Nothing here knows checkpoint files: train/checkpoint_reader.py reads a run's checkpoint into our names.
"""

from __future__ import annotations

from typing import Callable

import torch

from dist_moe.config import Config, ConfigError, expert_width, head_dim, is_moe_layer
from dist_moe.model.moe.experts import split_w13, stack_w13

ATTENTION = {"attn_norm.weight": "input_layernorm.weight", "attn.wq.weight": "self_attn.q_proj.weight",
             "attn.wk.weight": "self_attn.k_proj.weight", "attn.wv.weight": "self_attn.v_proj.weight",
             "attn.wo.weight": "self_attn.o_proj.weight", "ffn_norm.weight": "post_attention_layernorm.weight"}
QK_NORM = {"attn.q_norm.weight": "self_attn.q_norm.weight", "attn.k_norm.weight": "self_attn.k_norm.weight"}
SWIGLU = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}  # ours (Shazeer's names) -> Llama's
TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
       "lm_head.weight": "lm_head.weight"}
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM"}
QK_NORM_KINDS = ("qwen3", "qwen3_moe")  # transformers' model_types with per-head q/k RMSNorm


def architecture(cfg: Config) -> str:
    """transformers' model_type that represents cfg exactly; ConfigError naming the key when none does."""
    m, moe = cfg.model, cfg.moe
    if moe.moe_every == 0:
        raise ConfigError("config key 'moe.moe_every' = 0: a dense model; export writes transformers' MoE "
                          "architectures (Mixtral, Qwen2-MoE, Qwen3-MoE)")
    if m.attention == "moba":
        raise ConfigError("config key 'model.attention' = 'moba': transformers has no mixture-of-block attention "
                          "(an exported model would attend to every key); expected full")
    if m.rope_scaling == "ntk":
        raise ConfigError("config key 'model.rope_scaling' = 'ntk': transformers has no static NTK-aware scaling "
                          "(its 'dynamic' rescales with the sequence length); expected none | linear | yarn")
    for key, value, expected in (("moe.score", moe.score, "softmax"), ("moe.routing", moe.routing, "token_choice")):
        if value != expected:
            raise ConfigError(f"config key '{key}' = {value!r}: transformers' MoE classes route by "
                              f"{expected} only; expected {expected!r} (docs/routing.md)")
    if moe.balance in ("aux_free", "both"):
        raise ConfigError(f"config key 'moe.balance' = {moe.balance!r}: its selection bias changes which experts a "
                          "token gets, and transformers' MoE classes have none; expected aux or none")
    if m.qk_norm:
        if moe.shared_expert:
            raise ConfigError("config key 'moe.shared_expert' = True: with model.qk_norm the model exports as "
                              "Qwen3-MoE, which has no shared expert; expected false")
        return "qwen3_moe"
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
        return transformers.MixtralConfig(**common, intermediate_size=expert_width(cfg),
                                          num_local_experts=moe.num_experts,
                                          sliding_window=m.attention_window or None, router_jitter_noise=0.0)
    window = m.attention_window > 0
    qwen = dict(intermediate_size=m.d_ff, moe_intermediate_size=expert_width(cfg), num_experts=moe.num_experts,
                decoder_sparse_step=moe.moe_every, mlp_only_layers=[],
                norm_topk_prob=moe.normalize_weights and moe.top_k > 1, use_sliding_window=window,
                sliding_window=m.attention_window or None)
    if kind == "qwen3_moe":  # the window, when set, is on every layer
        return transformers.Qwen3MoeConfig(**common, **qwen, attention_bias=False)
    return transformers.Qwen2MoeConfig(
        **common, **qwen, shared_expert_intermediate_size=expert_width(cfg) if moe.shared_expert else 1,
        qkv_bias=False, max_window_layers=m.num_layers if window else 0,
        layer_types=["sliding_attention" if window else "full_attention"] * m.num_layers)


def attention_names(m) -> dict[str, str]:
    """A block's attention and norm weights, ours -> transformers'."""
    return {**ATTENTION, **QK_NORM} if m.qk_norm else ATTENTION


def _moe_names(kind: str, layer: int) -> tuple[str, str, Callable[[int, str], str]]:
    """(router key, shared-expert prefix, expert key(e, ours w1|w2|w3)) of an MoE layer in transformers' names."""
    prefix = f"model.layers.{layer}."
    if kind == "mixtral":
        moe = prefix + "block_sparse_moe."
        return moe + "gate.weight", "", lambda e, w: f"{moe}experts.{e}.{w}.weight"
    return (prefix + "mlp.gate.weight", prefix + "mlp.shared_expert.",  # Qwen2-MoE and Qwen3-MoE
            lambda e, w: f"{prefix}mlp.experts.{e}.{SWIGLU[w]}.weight")


def to_hf(state: dict[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    """Our model's state dict (every expert) -> transformers' names, exactly representing."""
    kind, m = architecture(cfg), cfg.model
    out = {TOP[k]: v for k, v in state.items() if k in TOP and not (k == "lm_head.weight" and m.tie_embeddings)}
    for i in range(m.num_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        out.update({theirs + hf: state[ours + name] for name, hf in attention_names(m).items()})
        if not is_moe_layer(cfg, i):
            out.update({f"{theirs}mlp.{hf}.weight": state[f"{ours}ffn.{w}.weight"] for w, hf in SWIGLU.items()})
            continue
        router, shared, expert = _moe_names(kind, i)
        out[router] = state[f"{ours}ffn.router.weight"]
        w1, w3 = split_w13(state[f"{ours}ffn.experts.w13"])
        for w, stacked in {"w1": w1, "w3": w3, "w2": state[f"{ours}ffn.experts.w2"]}.items():
            out.update({expert(e, w): stacked[e].t() for e in range(len(stacked))})  # nn.Linear's (out, in)
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


# ----------------------------------------------------------------------------------------------------
# transformers -> ours (import, upcycling)


def _refuse(path: str, key: str, value, expected: str) -> ConfigError:
    return ConfigError(f"{path}: config key '{key}' = {value!r}: expected {expected} (no dist_moe model equals it)")


def apply_hf_config(hf: dict, cfg: Config, path: str, dense: bool = False) -> None:
    """Set cfg.model (and cfg.moe unless dense) from a transformers config.json dict, or refuse naming the key.

    MoE: mixtral, qwen2_moe, qwen3_moe. Dense (upcycling): llama, qwen3; the MoE shape then stays cfg.moe's.
    """
    kinds = ("llama", "qwen3") if dense else ("mixtral", "qwen2_moe", "qwen3_moe")
    kind = hf.get("model_type")
    if kind not in kinds:
        raise _refuse(path, "model_type", kind, " | ".join(kinds))
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse(path, "hidden_act", hf["hidden_act"], "'silu' (SwiGLU)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise _refuse(path, key, hf[key], "false")
    m = cfg.model
    m.vocab_size, m.d_model, m.num_layers = hf["vocab_size"], hf["hidden_size"], hf["num_hidden_layers"]
    m.num_heads, m.num_kv_heads = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
    m.head_dim = hf.get("head_dim") or 0
    m.d_ff, m.max_seq_len = hf["intermediate_size"], hf["max_position_embeddings"]
    m.norm_eps, m.tie_embeddings = hf["rms_norm_eps"], bool(hf.get("tie_word_embeddings", False))
    m.init_std = hf.get("initializer_range", m.init_std)
    m.qk_norm = kind in QK_NORM_KINDS
    _apply_rope(hf, m, path)
    types = set(hf.get("layer_types") or [])
    on_every_layer = kind == "mixtral" or (kind == "qwen3_moe" and hf.get("use_sliding_window"))
    window = hf.get("sliding_window") if (on_every_layer or "sliding_attention" in types) else None
    if len(types) > 1:
        raise _refuse(path, "layer_types", sorted(types), "one attention kind on every layer")
    m.attention_window = window or 0
    if dense:
        return
    moe = cfg.moe
    moe.top_k, moe.shared_expert = hf["num_experts_per_tok"], False
    if kind == "mixtral":
        moe.num_experts, moe.d_expert, moe.moe_every, moe.normalize_weights = hf["num_local_experts"], m.d_ff, 1, True
        return
    # transformers 5 writes Qwen3-MoE's num_experts as num_local_experts (its attribute_map); Qwen's files
    # say num_experts
    moe.num_experts = hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"]
    moe.d_expert = hf["moe_intermediate_size"]
    moe.moe_every = hf["decoder_sparse_step"]
    if hf.get("mlp_only_layers"):
        raise _refuse(path, "mlp_only_layers", hf["mlp_only_layers"], "[] (dense layers come from decoder_sparse_step)")
    if moe.top_k == 1 and hf.get("norm_topk_prob"):
        raise _refuse(path, "norm_topk_prob", True, "false at top-1 (dist_moe keeps the raw probability)")
    moe.normalize_weights = bool(hf.get("norm_topk_prob"))


def _apply_rope(hf: dict, m, path: str) -> None:
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    m.rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear", "yarn"):
        raise _refuse(path, "rope_parameters.rope_type", kind, "default | linear | yarn")
    m.rope_scaling = {"default": "none"}.get(kind, kind)
    m.rope_factor = float(rope.get("factor") or 1.0)
    if kind == "yarn":
        m.rope_original_max_position_embeddings = rope.get("original_max_position_embeddings") or m.max_seq_len
        m.rope_beta_fast, m.rope_beta_slow = rope.get("beta_fast") or 32.0, rope.get("beta_slow") or 1.0
        m.rope_attention_factor = rope.get("attention_factor") or 0.0
        m.rope_mscale, m.rope_mscale_all_dim = rope.get("mscale") or 0.0, rope.get("mscale_all_dim") or 0.0
        m.rope_truncate = rope.get("truncate", True)


def _moe_layout(hf_state: dict, kind: str, layer: int) -> tuple[str, dict[str, str]]:
    """(prefix, ours w1|w2|w3 -> per-expert names) of an MoE layer as the folder holds it: Mixtral's original
    `block_sparse_moe.` with w1/w2/w3, or `mlp.` with Llama's names (Qwen, and Mixtral saved by transformers 5
    in its own names, `save_pretrained(save_original_format=False)`, whose experts are fused)."""
    prefix = f"model.layers.{layer}."
    if kind == "mixtral" and prefix + "block_sparse_moe.gate.weight" in hf_state:
        return prefix + "block_sparse_moe.", {w: w for w in SWIGLU}
    return prefix + "mlp.", SWIGLU


def _experts(hf_state: dict, prefix: str, names: dict[str, str], num_experts: int,
             path: str) -> dict[str, list[torch.Tensor]]:
    """ours w1|w2|w3 -> per-expert nn.Linear weights, from per-expert keys or transformers 5's fused
    `experts.gate_up_proj` (E, 2F, D) and `experts.down_proj` (E, D, F)."""
    if f"{prefix}experts.gate_up_proj" not in hf_state:
        return {w: [hf_state[f"{prefix}experts.{e}.{names[w]}.weight"] for e in range(num_experts)] for w in names}
    gate_up, down = hf_state[f"{prefix}experts.gate_up_proj"], hf_state[f"{prefix}experts.down_proj"]
    if gate_up.dim() != 3 or len(gate_up) != num_experts or len(down) != num_experts or gate_up.shape[1] % 2:
        raise ConfigError(f"{path}: {prefix}experts.gate_up_proj {tuple(gate_up.shape)} / down_proj "
                          f"{tuple(down.shape)}: expected ({num_experts}, 2 x width, hidden) / ({num_experts}, hidden, "
                          "width) for the config's experts")
    w1, w3 = gate_up.chunk(2, dim=1)
    return {"w1": list(w1), "w3": list(w3), "w2": list(down)}


def from_hf(hf_state: dict[str, torch.Tensor], cfg: Config, kind: str, path: str) -> dict[str, torch.Tensor]:
    """transformers' names -> our model's state dict with every expert (the inverse of to_hf); refuses what
    we cannot hold."""
    m = cfg.model
    out = {ours: hf_state[theirs] for ours, theirs in TOP.items() if theirs in hf_state}
    if m.tie_embeddings or "lm_head.weight" not in out:
        out["lm_head.weight"] = out["embed.weight"]
    for i in range(m.num_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj"):
            bias = hf_state.get(f"{theirs}self_attn.{proj}.bias")
            if bias is not None and bias.any():
                raise ConfigError(f"{path}: {theirs}self_attn.{proj}.bias is not zero (dist_moe's attention has "
                                  "no bias)")
        out.update({ours + name: hf_state[theirs + hf] for name, hf in attention_names(m).items()})
        if not is_moe_layer(cfg, i):
            out.update({f"{ours}ffn.{w}.weight": hf_state[f"{theirs}mlp.{hf}.weight"] for w, hf in SWIGLU.items()})
            continue
        moe_prefix, names = _moe_layout(hf_state, kind, i)
        out[f"{ours}ffn.router.weight"] = hf_state[moe_prefix + "gate.weight"]
        experts = {w: torch.stack([t.t() for t in weights])  # (E, in, out)
                   for w, weights in _experts(hf_state, moe_prefix, names, cfg.moe.num_experts, path).items()}
        out[f"{ours}ffn.experts.w13"] = stack_w13(experts["w1"], experts["w3"])
        out[f"{ours}ffn.experts.w2"] = experts["w2"]
        if kind == "qwen2_moe":
            _shared_from_qwen2(out, hf_state, ours, moe_prefix, cfg, path)
    return out


def qwen2_shared_expert(hf_state: dict[str, torch.Tensor], cfg: Config, path: str) -> bool:
    """Whether a Qwen2-MoE holds a shared expert we can represent (ungated: its gate weights zero); its
    all-zero shared expert (ours without one, exported) is none."""
    layer = next(i for i in range(cfg.model.num_layers) if is_moe_layer(cfg, i))
    prefix = f"model.layers.{layer}.mlp."
    if not any(hf_state[f"{prefix}shared_expert.{hf}.weight"].any() for hf in SWIGLU.values()):
        return False
    if hf_state[prefix + "shared_expert_gate.weight"].any():
        raise ConfigError(f"{path}: {prefix}shared_expert_gate.weight is not zero (a gated shared expert has no "
                          "dist_moe equivalent)")
    width = hf_state[f"{prefix}shared_expert.gate_proj.weight"].shape[0]
    if width != expert_width(cfg):
        raise _refuse(path, "shared_expert_intermediate_size", width, f"moe_intermediate_size = {expert_width(cfg)} "
                      "(dist_moe's shared expert is as wide as a routed one)")
    return True


def _shared_from_qwen2(out: dict, hf_state: dict, ours: str, prefix: str, cfg: Config, path: str) -> None:
    """Zero gate = x 1/2: our ungated shared expert has half the down projection."""
    if not cfg.moe.shared_expert:
        return
    if hf_state[prefix + "shared_expert_gate.weight"].any():
        raise ConfigError(f"{path}: {prefix}shared_expert_gate.weight is not zero (a gated shared expert has no "
                          "dist_moe equivalent)")
    for w, hf in SWIGLU.items():
        weight = hf_state[f"{prefix}shared_expert.{hf}.weight"]
        out[f"{ours}ffn.shared_mlp.{w}.weight"] = weight / 2 if w == "w2" else weight
