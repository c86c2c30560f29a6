"""Start from a transformers checkpoint folder: import (`init.from_hf`, `dist-moe generate --from-hf`) and
dense-to-MoE sparse upcycling (`init.upcycle_from`, Komatsuzaki et al. 2022).

Import takes the model's shape from its config.json (adapter.apply_hf_config) and its weights from the
safetensors files, each rank loading only its own experts. Upcycling takes a dense Llama or Qwen3:
attention (with Qwen3's q/k norms), norms, embeddings and the dense layers as they are, and in every MoE
layer each expert a copy of the dense FFN with the router kept at its small random init. With identical
experts and top-k weights renormalised to sum to 1, the MoE layer outputs the dense FFN for any router,
so the model starts at the dense model's loss (dropless: a dropped token would lose its FFN output). The
tokenizer comes with the folder: training needs its sentencepiece `tokenizer.model` (dist-moe export
writes one); generation uses transformers' tokenizer.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import torch

from dist_moe.config import Config, ConfigError, validate
from dist_moe.hf import adapter


class FolderEntries(dict):
    """A folder's config.json keys or weights: one the folder lacks is a one-line error naming it."""

    def __init__(self, entries: dict, missing: str):
        super().__init__(entries)
        self.missing = missing  # the error, with {} for the key

    def __missing__(self, key: str):
        raise ConfigError(self.missing.format(key))


def read_config(path: str | Path) -> FolderEntries:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ConfigError(f"'{path}': no config.json (expected a transformers checkpoint folder)")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"'{file}': not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"'{file}': expected a JSON object of config keys")
    return FolderEntries(config, f"'{file}': no key '{{}}' (expected in a {config.get('model_type')} config)")


def read_weights(path: str | Path) -> FolderEntries:
    """Every tensor of the folder's safetensors files (one file or transformers' shards), on the CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ConfigError(f"'{path}': no .safetensors files")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError) as exc:
            raise ConfigError(f"'{file}': not a readable safetensors file ({exc})") from None
    return FolderEntries(state, f"'{path}': no weight '{{}}' in its safetensors files (expected transformers' "
                                "names: per-expert or fused expert tensors)")


def _source(cfg: Config) -> tuple[str, bool]:
    """(folder, dense) of the configured init."""
    return (cfg.init.upcycle_from, True) if cfg.init.upcycle_from else (cfg.init.from_hf, False)


def apply_init_config(cfg: Config) -> Config:
    """A copy of cfg with the model's shape from the init folder's config.json (and its weights' shared expert)."""
    cfg = with_init_shape(cfg)
    validate(cfg)
    return cfg


def with_init_shape(cfg: Config) -> Config:
    """apply_init_config without validating the result."""
    cfg = copy.deepcopy(cfg)
    path, dense = _source(cfg)
    if cfg.moe.impl != "dist_moe":
        raise ConfigError(f"config key 'moe.impl' = {cfg.moe.impl!r}: expected 'dist_moe' with init.from_hf / "
                          "init.upcycle_from")
    adapter.apply_hf_config(read_config(path), cfg, path, dense=dense)
    if dense:
        cfg.moe.d_expert = cfg.model.d_ff  # every expert is a copy of the dense FFN
        if cfg.moe.shared_expert or cfg.moe.top_k < 2 or not cfg.moe.normalize_weights:
            raise ConfigError("config key 'moe.top_k' / 'moe.normalize_weights' / 'moe.shared_expert': upcycling "
                              "needs top_k >= 2 with normalize_weights=true and no shared expert, so that the MoE "
                              "starts equal to the dense model")
    elif read_config(path)["model_type"] == "qwen2_moe":
        cfg.moe.shared_expert = adapter.qwen2_shared_expert(read_weights(path), cfg, path)
    return cfg


def init_tokenizer(cfg: Config) -> Path | None:
    """The init folder's sentencepiece model, which training then uses instead of training one."""
    path, _ = _source(cfg)
    model = Path(path) / "tokenizer.model"
    return model if path and model.is_file() else None


def load_checkpoint_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a whole model's checkpoint-named weights into `model`, each MoE layer taking its own experts."""
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    module_state = {}
    for key, value in state.items():
        match = adapter.EXPERT_KEY.fullmatch(key)
        if match:
            experts.setdefault((int(match[1]), match[3]), {})[int(match[2])] = value
        else:
            module_state[key.replace(adapter.GATE_KEY, "router.weight")] = value
    for i, block in enumerate(model.blocks):
        if not block.is_moe:
            continue
        local = range(block.ffn.experts.first_expert, block.ffn.experts.first_expert + block.ffn.experts.w13.shape[0])
        w1, w2, w3 = (torch.stack([experts[(i, w)][e].t() for e in local]) for w in ("w1", "w2", "w3"))
        module_state[f"blocks.{i}.ffn.experts.w13"] = torch.cat([w1, w3], dim=2)  # (E_local, D, 2F)
        module_state[f"blocks.{i}.ffn.experts.w2"] = w2  # (E_local, F, D)
    missing, unexpected = model.load_state_dict(module_state, strict=False)
    assert not unexpected and all(k.endswith("noise_weight") for k in missing), (missing, unexpected)


def upcycled_state(hf_state: dict[str, torch.Tensor], cfg: Config, model: torch.nn.Module) -> dict:
    """Checkpoint-named weights of the MoE: the dense model's, its FFN copied into every expert, routers as
    the model initialised them."""
    dense_cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, moe_every=0))
    dense = adapter.hf_to_checkpoint(hf_state, dense_cfg, "dense", "")
    own = adapter.checkpoint_names(model.state_dict())
    state = {}
    for i in range(cfg.model.num_layers):
        ffn = {w: dense.pop(f"blocks.{i}.ffn.{w}.weight") for w in ("w1", "w2", "w3")}
        if not model.blocks[i].is_moe:
            state.update({f"blocks.{i}.ffn.{w}.weight": t for w, t in ffn.items()})
            continue
        state[f"blocks.{i}.ffn.{adapter.GATE_KEY}"] = own[f"blocks.{i}.ffn.{adapter.GATE_KEY}"]
        state.update({f"blocks.{i}.ffn." + adapter.DEEPSPEED_EXPERT_KEY.format(e, w): t
                      for e in range(cfg.moe.num_experts) for w, t in ffn.items()})
    return {**dense, **state}


def load_init_weights(model: torch.nn.Module, cfg: Config) -> None:
    """Weights from init.from_hf or init.upcycle_from into a freshly built model (cfg from apply_init_config)."""
    path, dense = _source(cfg)
    hf_state = read_weights(path)
    if dense:
        state = upcycled_state(hf_state, cfg, model)
    else:
        state = adapter.hf_to_checkpoint(hf_state, cfg, read_config(path)["model_type"], path)
    _check_shapes(state, model, path)
    load_checkpoint_state(model, state)


def _check_shapes(state: dict[str, torch.Tensor], model: torch.nn.Module, path: str) -> None:
    """Every weight of the folder as large as its config.json makes ours (a rank holds only its own experts:
    expert keys compare with its first)."""
    expected = adapter.checkpoint_names(model.state_dict())
    for key, value in state.items():
        match = adapter.EXPERT_KEY.fullmatch(key)
        ours = f"blocks.{match[1]}.ffn." + adapter.DEEPSPEED_EXPERT_KEY.format(0, match[3]) if match else key
        if ours in expected and value.shape != expected[ours].shape:
            raise ConfigError(f"'{path}': the weight that becomes our {key} has shape {tuple(value.shape)}, but its "
                              f"config.json makes it {tuple(expected[ours].shape)}")


def generate_from_hf(path: str | Path, prompt: str, max_new_tokens: int, temperature: float, top_k: int,
                     seed: int) -> str:
    """`dist-moe generate --from-hf PATH`: our model with the folder's weights and transformers' tokenizer."""
    from dist_moe.config import load_config
    from dist_moe.hf import require_transformers
    from dist_moe.model.transformer import Transformer, generate

    transformers = require_transformers()
    cfg = with_init_shape(load_config(None, [f"init.from_hf={path}", "moe.dropless=true"]))
    # nothing trains: the training keys' defaults (data.seq_len = 128) must not refuse a model of fewer positions
    validate(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=cfg.model.max_seq_len)))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    model = Transformer(cfg)
    load_init_weights(model, cfg)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    if ids.shape[1] == 0:
        ids = torch.tensor([[tokenizer.eos_token_id]])
    room = cfg.model.max_seq_len - ids.shape[1]
    out = generate(model, ids, min(max_new_tokens, room), temperature, top_k,
                   generator=torch.Generator().manual_seed(seed))
    return tokenizer.decode(out[0])
